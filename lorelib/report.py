"""Reporting: plain-text tables, the results JSON (never lost: a fallback folder when the output folder cannot be
written) and plots, for the structured results of pipelines.py and the baselines.

Imports: config, files, data (the names of the four pair sets).
"""
import json
from pathlib import Path

import numpy as np

from .config import note_written
from .data import RESULT_NAMES
from .files import atomic_path, jsonable, save_json, save_or_fallback


def print_table(header, rows, fmt="{:.4f}"):
    """Print a plain-text table: header [str], rows [[value, ...]]."""
    cells = [[str(h) for h in header]] + [
        [fmt.format(v) if isinstance(v, (float, np.floating)) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))


def save_plot(path, x, series, xlabel, ylabel, title, xticks=None, hlines=None):
    """Line plot with error bars, saved atomically as PNG.

    x: [n] values; series: {label: (mean [n], std [n])}; hlines: {label: (y, linestyle)} horizontal
    reference lines (methods with one value for the whole x axis).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (mean, std) in series.items():
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label)
    colors = {}
    for label, (y, style) in (hlines or {}).items():
        method = label.split(",")[0]  # one colour per method: "VPL, seen users" and "VPL, unseen users"
        colors.setdefault(method, f"C{(len(series) + len(colors)) % 10}")
        ax.axhline(y, color=colors[method], linestyle=style, linewidth=1.2, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if xticks is not None:
        ax.set_xticks(list(x))
        ax.set_xticklabels([str(t) for t in xticks])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def _method_of(K):
    """Row label of rank K in run tables: the reference head, one Bradley-Terry reward, or LoRe."""
    return "ref" if K == 0 else "BT" if K == 1 else "LoRe"


def _summary(means, K_list, alpha_list, selection, baselines):
    """{method: {rank settings..., "seen_test", "unseen_test"}}, printed one line per method: LoRe's K (and
    alpha) from select_rank's `selection`, a swept baseline's from its "chosen" entry, never from test pairs."""
    a = alpha_list.index(selection["alpha"]) if selection else 0
    lore = [K for K in K_list if K >= 2]
    lore_K = selection["K"] if selection else lore[0] if len(lore) == 1 else None
    picks = {_method_of(K): (K, {}) for K in K_list if K <= 1}
    if lore:
        picks["LoRe"] = (lore_K, {"K": lore_K} if len(alpha_list) == 1 else {"K": lore_K, "alpha": alpha_list[a]})
    out = {}
    for method, (K, ranks) in picks.items():
        k = K_list.index(K) if K is not None else None
        out[method] = ranks if k is None else {**ranks, "seen_test": float(means[1][a, k]),
                                               "unseen_test": float(means[3][a, k])}
    for method in dict.fromkeys(e["method"] for e in baselines.values()):
        group = [e for e in baselines.values() if e["method"] == method]
        pick = [e for e in group if e.get("chosen")] or (group if len(group) == 1 else [])
        out[method] = {k: None for k in group[0].get("sweep", {})} if not pick else {
            **pick[0].get("sweep", {}), "seen_test": pick[0]["seen_test"]["mean"],
            "unseen_test": pick[0]["unseen_test"]["mean"]}
    print("\none line per method (K chosen on held-out pairs of the seen users' training data, never on test pairs): "
          "seen / unseen users' test accuracy")
    for method, acc in out.items():
        if "seen_test" not in acc:
            print(f"  {method}: not chosen (validation_fraction = 0)")
            continue
        ranks = "".join(f"{k} = {v:g}, " for k, v in acc.items() if k not in ("seen_test", "unseen_test"))
        print(f"  {method}: {ranks}{acc['seen_test']:.4f} / {acc['unseen_test']:.4f}")
    return out


def report_run(result, config, out_dir, name, title, extra=None, baselines=None, selection=None, record=None):
    """Print the accuracy table of a fit_ranks result (a RankResult) and write `name`.json / .png.

    baselines: baselines.run_baselines' {entry: {"label", "settings", "seconds", result name: {"mean", "std"}}}:
    extra table rows, the JSON's "baselines" (each entry under its name) and horizontal lines in the plot.
    selection: LoRe's rank chosen by select_rank; with the baselines' choices it makes the one-line-per-method
    summary, printed and written as the JSON's "summary". record: the script's RunRecord (the files written).
    """
    K_list, alpha_list, means, stds = result.K_list, result.alpha_list, result.means, result.stds
    rows, results = [], []
    for a, al in enumerate(alpha_list):
        for k, K in enumerate(K_list):
            rows.append([_method_of(K), f"{al:g}", K] +
                        [f"{means[r][a, k]:.4f} ± {stds[r][a, k]:.4f}" for r in range(4)])
            results.append({"alpha": al, "K": K, **{n: {"mean": means[r][a, k], "std": stds[r][a, k]}
                                                    for r, n in enumerate(RESULT_NAMES)}})
    baselines = baselines or {}
    for acc in baselines.values():
        rows.append([acc["label"], "", ""] + [f"{acc[n]['mean']:.4f} ± {acc[n]['std']:.4f}" for n in RESULT_NAMES])
    print(f"\n{title}: accuracy, mean ± std over users (K = 0: reference head, K = 1: Bradley-Terry)")
    print_table(["method", "alpha", "K"] + RESULT_NAMES, rows)
    summary = _summary(means, list(K_list), list(alpha_list), selection, baselines)
    series = {f"{label} (alpha={al:g})": (means[r][a], stds[r][a]) for a, al in enumerate(alpha_list)
              for r, label in [(1, "seen users"), (3, "unseen users")]}
    hlines = {f"{acc['label']}, {label}": (acc[key]["mean"], style) for acc in baselines.values()
              for key, label, style in [("seen_test", "seen users", ":"), ("unseen_test", "unseen users", "--")]}
    write_report(out_dir, name, {"config": config, "results": results,
                                 **({"baselines": baselines} if baselines else {}), "summary": summary,
                                 **({"selection": selection} if selection else {}), **(extra or {})},
                 lambda p: save_plot(p, list(range(len(K_list))), series, "K (0 = reference head, 1 = BT)",
                                     "test accuracy", f"{title}: accuracy vs rank", xticks=K_list, hlines=hlines),
                 record)
    return results


def write_report(out_dir, name, payload, plot, record=None):
    """Write out_dir/`name`.json (payload) and `name`.png (plot(path) draws it), never losing the numbers:
    when a file cannot be written it goes to a fallback folder in the system temp dir (save_or_fallback),
    and when the JSON is not where it was asked for, the payload is also printed in full."""
    path = Path(out_dir) / f"{name}.json"
    json_path = save_or_fallback(path, lambda p: save_json(p, payload))
    if json_path != path:
        print(f"results in full ({name}.json):\n" + json.dumps(jsonable(payload), indent=2), flush=True)
    png_path = save_or_fallback(Path(out_dir) / f"{name}.png", plot)
    note_written(record, json_path)
    note_written(record, png_path)
    print(f"wrote {json_path} and {png_path}")


def report_shots(result, config, out_dir, name, title, extra=None, xlabel="few-shot pairs per user", baselines=None,
                 record=None):
    """Print and save (JSON, PNG) a vary_shots result (a ShotsResult) of one K and alpha.

    One rule: a table of its few-shot train and unseen test accuracy per shot count. Several rules: one table
    column, JSON entry ("results_by_selection") and curve per rule ("results" holds the first rule's entries).
    With the whole-pool accuracy (result.full_pool): a line in the plot, and per rule the fewest shots whose mean
    unseen-test accuracy reaches 95% and 99% of it ("shots_to_95pct_of_full_pool", ...).
    baselines: baselines.run_baselines_vary_shots'
    {method: {"label", "settings", "seconds", "accuracies": [4, len(num_shots)] in the same layout}}:
    extra table columns (unseen test), the JSON's "baselines" (each method under its name, its accuracies as
    "results") and extra curves in the plot. record: the script's RunRecord (the files written).
    """
    num_shots, K, alpha = result.num_shots, result.K_list[0], result.alpha_list[0]
    full = None if result.full_pool is None else [float(x) for x in result.full_pool[:, 0, 0]]
    rules = {rule: list(acc[:, 0, 0, :]) for rule, acc in result.acc.items()}
    one = len(rules) == 1
    fs_m, fs_s, ts_m, ts_s = next(iter(rules.values()))
    skipped = result.skipped
    baselines = baselines or {}
    curves = {m: [np.asarray(r).reshape(-1) for r in b["accuracies"][:4]] for m, b in baselines.items()}
    rows = [[s] + ([f"{fs_m[j]:.4f} ± {fs_s[j]:.4f}", f"{ts_m[j]:.4f} ± {ts_s[j]:.4f}"] if one else
                   [f"{c[2][j]:.4f} ± {c[3][j]:.4f}" for c in rules.values()]) +
            [f"{c[2][j]:.4f} ± {c[3][j]:.4f}" for c in curves.values()] + [skipped[j]]
            for j, s in enumerate(num_shots)]
    print(f"\n{title}: K = {K}, accuracy mean ± std over trials"
          + ("" if set(rules) == {"random"} else " (uncertainty and active shots: one deterministic run)"))
    print_table(["shots"] + (["few-shot train", "unseen test"] if one else [f"unseen test, {r} shots" for r in rules])
                + [f"{b['label']} unseen test" for b in baselines.values()] + ["users skipped"], rows)

    def entries(fs_m, fs_s, ts_m, ts_s):
        return [{"shots": s, "fewshot_train": {"mean": fs_m[j], "std": fs_s[j]},
                 "unseen_test": {"mean": ts_m[j], "std": ts_s[j]}, "users_skipped": skipped[j]}
                for j, s in enumerate(num_shots)]
    results = entries(fs_m, fs_s, ts_m, ts_s)
    series = ({f"LoRe K = {K}, unseen users, test": (ts_m, ts_s),
               f"LoRe K = {K}, unseen users, few-shot train": (fs_m, fs_s)} if one else
              {f"LoRe K = {K}, {r} shots, unseen users, test": (c[2], c[3]) for r, c in rules.items()})
    series.update({f"{b['label']}, unseen users, test": (curves[m][2], curves[m][3]) for m, b in baselines.items()})
    json_baselines = {m: {**{k: v for k, v in b.items() if k != "accuracies"}, "results": entries(*curves[m])}
                      for m, b in baselines.items()}
    more = {} if one else {"results_by_selection": {r: entries(*c) for r, c in rules.items()}}
    if full:
        more["full_pool"] = {"fewshot_train": {"mean": full[0], "std": full[1]},
                             "unseen_test": {"mean": full[2], "std": full[3]}, "std_over": "users"}
        print(f"w fit on each user's whole few-shot pool: unseen test {full[2]:.4f} ± {full[3]:.4f} (std over users)")
        for pct in (95, 99):
            more[f"shots_to_{pct}pct_of_full_pool"] = reach = {
                r: next((s for s, m in zip(num_shots, c[2]) if m >= pct / 100 * full[2]), None)
                for r, c in rules.items()}
            print(f"{pct}% of it ({pct / 100 * full[2]:.4f}) first reached at: " + ", ".join(
                f"{r} {'not within ' + str(max(num_shots)) if s is None else s} shots" for r, s in reach.items()))
    write_report(out_dir, name, {"config": config, "K": K, "alpha": alpha, "results": results, **more,
                                 **({"baselines": json_baselines} if baselines else {}), **(extra or {})},
                 lambda p: save_plot(p, list(num_shots), series, xlabel, "accuracy",
                                     f"{title}: accuracy vs shots (K = {K})",
                                     hlines={"LoRe, whole few-shot pool": (full[2], "--")} if full else None),
                 record)
    return results

