"""Comparing methods with intervals, over users (one seed) or over seeds (several): each method's mean with its 95%
Student-t interval, the mean of its worst 10% of users, and its paired difference from the best other method. One
seed pairs the methods by user (the same users, the same test pairs); several seeds pair them by seed (each seed's
mean over users), as the paper's 20 random splits. A difference whose interval contains 0 is no evidence that one
method beats the other, and the table says so.

    table = comparison([results_of_seed_0, results_of_seed_1, ...])   # evaluate's results, one list per seed
    table["rows"]["LoRe"]["unseen_test"]        # {"mean", "ci95", "per_seed", "worst10"}
    table["rows"]["LoRe"]["vs_best"]["unseen_test"]   # {"other", "mean", "ci95", "clear"}

Imports: intervals, report.
"""
import numpy as np

from .intervals import mean_interval, worst_share
from .report import print_table, save_panels, summary_picks

# (key, pair set or choice group, metric, higher is better): the numbers compared
COMPARED = [("seen_test", "seen_test", "accuracy", True), ("unseen_test", "unseen_test", "accuracy", True),
            ("unseen_regret", "unseen", "regret", False), ("unseen_top", "unseen", "top", True)]


def _per_user(result, where, metric):
    """[C] per-user values of a MethodResult: a pair set's metric, or a choice group's (None when not measured)."""
    if where in result.users:
        return np.asarray(result.users[where][metric], dtype=np.float64)
    users = getattr(result, "choice_users", None) or {}
    return None if metric not in users.get(where, {}) else np.asarray(users[where][metric], dtype=np.float64)


def paired(diff):
    """{"mean", "ci95", "clear"} of paired differences [n] (over users or seeds): "clear" when the 95% interval
    excludes 0."""
    m, lo, hi = mean_interval(diff)
    return {"mean": m, "ci95": [lo, hi], "clear": bool(np.isfinite(lo) and (lo > 0 or hi < 0))}


def comparison(per_seed, seeds=None):
    """{"over": "users" or "seeds", "seeds", "compared", "rows": {family: {key: {"mean", "ci95", "per_seed",
    "worst10"}, "vs_best": {key: {"other", "mean", "ci95", "clear"}}}}} of evaluate's results of each seed (a list
    of lists; each family's run chosen as in report.summary_picks)."""
    picks = [summary_picks(results) for results in per_seed]
    families = [f for f in picks[0] if all(p.get(f) is not None for p in picks)]
    over = "users" if len(per_seed) == 1 else "seeds"
    values = {f: {} for f in families}  # family -> key -> per seed [C] per-user values
    compared = []
    for key, where, metric, higher in COMPARED:
        got = {f: [_per_user(p[f], where, metric) for p in picks] for f in families}
        if any(v is None for vs in got.values() for v in vs):
            continue
        compared.append({"key": key, "higher_is_better": higher})
        for f in families:
            values[f][key] = got[f]
    rows = {}
    for f in families:
        rows[f] = {"vs_best": {}}
        for c in compared:
            key, v = c["key"], values[f][c["key"]]
            per_seed_means = [float(np.nanmean(x)) for x in v]
            m, lo, hi = mean_interval(v[0] if over == "users" else per_seed_means)
            worst = [worst_share(x) if c["higher_is_better"] else -worst_share(-x) for x in v]
            wm, wlo, whi = mean_interval(worst) if over == "seeds" else (worst[0], float("nan"), float("nan"))
            rows[f][key] = {"mean": m, "ci95": [lo, hi], "per_seed": per_seed_means,
                            "worst10": {"mean": wm, "ci95": [wlo, whi]}}
    for c in compared:
        key, sign = c["key"], 1 if c["higher_is_better"] else -1
        for f in families:
            others = [o for o in families if o != f]
            if not others:
                continue
            best = max(others, key=lambda o: sign * rows[o][key]["mean"])
            a, b = values[f][key], values[best][key]
            diff = a[0] - b[0] if over == "users" else np.array([np.nanmean(x) - np.nanmean(y) for x, y in zip(a, b)])
            rows[f]["vs_best"][key] = {"other": best, **paired(diff)}
    return {"over": over, "seeds": list(seeds) if seeds is not None else None, "compared": compared, "rows": rows}


def _cell(x, ci, signed=False):
    fmt = "{:+.4f}" if signed else "{:.4f}"
    return fmt.format(x) + ("" if not np.isfinite(ci[0]) else " [" + fmt.format(ci[0]) + ", " + fmt.format(ci[1]) + "]")


def print_comparison(table, title, log=print):
    """Print the comparison: one row per method, mean [95% interval] per compared number, the worst 10% of users and
    the paired difference from the best other method (unseen-user test accuracy), flagged where it is no evidence."""
    keys = [c["key"] for c in table["compared"]]
    over = table["over"]
    log(f"\n{title}: mean [95% interval over {over}]; worst 10%: the mean of each seed's lowest 10% of users; vs best "
        f"other: the paired difference (paired by {'user' if over == 'users' else 'seed'}) from the best other method")
    rows = []
    for f, r in table["rows"].items():
        vs = r["vs_best"].get("unseen_test")
        mark = "" if vs is None else _cell(vs["mean"], vs["ci95"], True) + (
            "" if vs["clear"] else " (interval contains 0)") + f" vs {vs['other']}"
        rows.append([f] + [_cell(r[k]["mean"], r[k]["ci95"]) for k in keys]
                    + [_cell(r["unseen_test"]["worst10"]["mean"], r["unseen_test"]["worst10"]["ci95"]), mark])
    print_table(["method"] + keys + ["unseen worst 10%", "unseen test vs best other"], rows)
    unclear = [f for f, r in table["rows"].items() if "unseen_test" in r["vs_best"]
               and r["vs_best"]["unseen_test"]["other"] != f and not r["vs_best"]["unseen_test"]["clear"]
               and r["unseen_test"]["mean"] >= table["rows"][r["vs_best"]["unseen_test"]["other"]]["unseen_test"][
                   "mean"]]
    if unclear:
        log(f"no clear winner on unseen-user test accuracy: {', '.join(unclear)} leads, but its paired interval "
            "contains 0")


def plot_comparison(path, table, title):
    """A dot per method with its 95% interval, one panel per compared number, saved as PNG (report.save_panels)."""
    keys = [c["key"] for c in table["compared"]]
    rows = list(table["rows"])
    panels = [{"series": {f: ([i], [table["rows"][f][k]["mean"]],
                              [np.nan_to_num(table["rows"][f][k]["mean"] - table["rows"][f][k]["ci95"][0])])
                          for i, f in enumerate(rows)},
               "xlabel": "method (legend)", "ylabel": k, "title": f"{k} (95% interval over {table['over']})"}
              for k in keys]
    return save_panels(path, panels, title)
