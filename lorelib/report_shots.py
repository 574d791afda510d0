"""Reporting the few-shot curves (vary_fewshot.py): the table, results JSON and plot of one rule over one seed
(the published protocol), and the selection rules side by side over one or more seeds with intervals over users,
pair budgets and the stopping rule.

Imports: intervals, report.
"""
import numpy as np

from .intervals import paired_difference, stratified_mean
from .report import print_table, save_panels, save_plot, write_report


def report_shots(result, config, out_dir, name, title, extra=None, xlabel="few-shot pairs per user", baselines=None,
                 record=None):
    """Print and save (JSON, PNG) a vary_shots result (a ShotsResult, or a list of them: one per data seed) of one K
    and alpha.

    One rule, one seed (the published protocol): a table of its few-shot train and unseen test accuracy per shot
    count. With the whole-pool accuracy (result.full_pool): a line in the plot, and the fewest shots whose mean
    unseen-test accuracy reaches 95% and 99% of it ("shots_to_95pct_of_full_pool", ...). Several rules or seeds:
    the comparison of the rules (_report_comparison; the baselines are not shown there). With the stopping rule
    (result.stopping): its table and the JSON's "stopping" (_report_stopping).
    baselines: baselines.run_baselines_vary_shots'
    {method: {"label", "settings", "seconds", "accuracies": [4, len(num_shots)] in the same layout}}:
    extra table columns (unseen test), the JSON's "baselines" (each method under its name, its accuracies as
    "results") and extra curves in the plot. record: the script's RunRecord (the files written).
    """
    seeds = list(result) if isinstance(result, (list, tuple)) else [result]
    if len(seeds) > 1 or len(seeds[0].rules) > 1:
        return _report_comparison(seeds, config, out_dir, name, title, extra, xlabel, baselines, record)
    result = seeds[0]
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
    json_baselines = {m: {**{k: v for k, v in b.items() if k not in ("accuracies", "user_acc")},
                         "results": entries(*curves[m])}
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
    if result.stopping:
        more["stopping"] = _report_stopping(seeds)
    write_report(out_dir, name, {"config": config, "K": K, "alpha": alpha, "results": results, **more,
                                 **({"baselines": json_baselines} if baselines else {}), **(extra or {})},
                 lambda p: save_plot(p, list(num_shots), series, xlabel, "accuracy",
                                     f"{title}: accuracy vs shots (K = {K})",
                                     hlines={"LoRe, whole few-shot pool": (full[2], "--")} if full else None),
                 record)
    return results



def _point(acc, rules, rule):
    """One point of a rule: acc {rule: [S] per-user arrays (NaN: not in the point)} -> {"mean", "ci95", "per_seed",
    "users", and, beside random, "vs_random": {"mean", "ci95"} over the per-user differences (paired)}."""
    mean, err = stratified_mean(acc[rule])
    out = {"mean": mean, "ci95": [mean - err, mean + err], "users": int(sum((~np.isnan(a)).sum() for a in acc[rule])),
           "per_seed": [float(np.nanmean(a)) if (~np.isnan(a)).any() else None for a in acc[rule]]}
    if rule != "random" and "random" in rules:
        d, e = paired_difference(acc[rule], acc["random"])
        out["vs_random"] = {"mean": d, "ci95": [d - e, d + e]}
    return out


def _comparison_table(what, xname, xs, points, rules, extra=None):
    """Print the rules' points side by side (mean ± half-width), then their paired differences from random; rows
    without users are left out. points {rule: [point]}; extra {column: [str per x]}."""
    rows = [j for j in range(len(xs)) if points[rules[0]][j]["users"]]
    print(f"\n{what}: mean ± 95% interval half-width")
    half = {r: [(p["ci95"][1] - p["ci95"][0]) / 2 for p in points[r]] for r in rules}
    print_table([xname] + rules + list(extra or {}) + ["users"],
                [[xs[j]] + [f"{points[r][j]['mean']:.4f} ± {half[r][j]:.4f}" for r in rules]
                 + [c[j] for c in (extra or {}).values()] + [points[rules[0]][j]["users"]] for j in rows])
    others = [r for r in rules if "vs_random" in points[r][0]]
    if others:
        print(f"{what}, difference from random, paired per user: mean [95% interval]")
        print_table([xname] + others, [[xs[j]] + ["{:+.4f} [{:+.4f}, {:+.4f}]".format(
            points[r][j]["vs_random"]["mean"], *points[r][j]["vs_random"]["ci95"]) for r in others] for j in rows])


def _panels(xs, points, rules, xlabel, what, lines=None):
    """The accuracy panel and (beside random) the paired-difference panel of save_panels for points {rule: [point]}."""
    def series(key, rs):
        return {r: (xs, [p[key]["mean"] if key else p["mean"] for p in points[r]],
                    [(p[key]["ci95"][1] - p[key]["ci95"][0]) / 2 if key else (p["ci95"][1] - p["ci95"][0]) / 2
                     for p in points[r]]) for r in rs}
    out = [{"series": series(None, rules), "lines": lines or {}, "xlabel": xlabel,
            "ylabel": "unseen-user test accuracy", "title": f"{what} (95% interval over users)"}]
    others = [r for r in rules if "vs_random" in points[r][0]]
    if others:
        out.append({"series": series("vs_random", others), "xlabel": xlabel, "ylabel": "accuracy - random",
                    "zero": True, "title": f"{what}: difference from random (paired per user, 95%)"})
    return out


def _report_comparison(results, config, out_dir, name, title, extra, xlabel, baselines, record):
    """The rules side by side over one or more seeds (a list of ShotsResult of the same rules and shot counts).

    Per rule and shot count: the unseen-test accuracy (mean over seeds of the mean over users, 95% interval over
    users with the seeds as strata: intervals.stratified_mean), its paired per-user difference from random, the
    comparisons answered per user, and the whole-pool accuracy of the same users (their w fit on the whole pool),
    from which the fewest shots reaching 95% / 99% of it. With pair budgets (grouped shots): the same at exactly P
    answered comparisons. Tables, the JSON ("results_by_selection", "results_by_answered_pairs") and a plot.
    baselines: as in report_shots (one seed), or with each method's per-user accuracies of every seed
    ("user_acc_by_seed": [S] arrays [shots, C]) its curve with intervals over users, the seeds as strata, as the rules.
    """
    r0 = results[0]
    num_shots, K, alpha, rules = r0.num_shots, r0.K_list[0], r0.alpha_list[0], r0.rules
    full = r0.full_pool_users is not None
    points, pairs, refs = {}, {}, []
    for j in range(len(num_shots)):
        acc = {rule: [r.user_acc[rule][0, 0, j] for r in results] for rule in rules}
        seen = [~np.isnan(a) for a in acc[rules[0]]]
        refs.append(stratified_mean([np.where(m, r.full_pool_users[0, 0], np.nan) for m, r in zip(seen, results)])[0]
                    if full else float("nan"))
        for rule in rules:
            points.setdefault(rule, []).append(_point(acc, rules, rule))
            pairs.setdefault(rule, []).append(stratified_mean([r.pairs_asked[rule][0, 0, j] for r in results])[0])
    grouped = not all(np.allclose(p, num_shots, equal_nan=True) for p in pairs.values())
    by_rule = {rule: [{"shots": s, "fewshot_train": {
        "mean": float(np.mean([r.acc[rule][0, 0, 0, j] for r in results])),
        "std": float(np.mean([r.acc[rule][1, 0, 0, j] for r in results]))},
        "unseen_test": {**{k: v for k, v in points[rule][j].items() if k in ("mean", "ci95", "per_seed")},
                        "std": float(np.mean([r.acc[rule][3, 0, 0, j] for r in results]))},
        "users": points[rule][j]["users"], "users_skipped": int(sum(r.skipped[j] for r in results)),
        "pairs_asked": pairs[rule][j], **({"full_pool_same_users": refs[j]} if full else {}),
        **({"vs_random": points[rule][j]["vs_random"]} if "vs_random" in points[rule][j] else {})}
        for j, s in enumerate(num_shots)] for rule in rules}
    S = len(results)
    print(f"\n{title}: K = {K}, {S} seed(s); intervals over users, seeds as strata; the rules other than random: one "
          "deterministic run per seed")
    _comparison_table("unseen-user test accuracy per shot", "shots", num_shots, points, rules,
                      {"whole pool, same users": [f"{x:.4f}" for x in refs]} if full else None)
    if grouped:
        print("comparisons answered per user (mean)")
        print_table(["shots"] + rules, [[s] + [f"{pairs[r][j]:.2f}" for r in rules] for j, s in enumerate(num_shots)
                                        if points[rules[0]][j]["users"]])
    more, panels = {}, _panels(num_shots, points, rules, xlabel, "per shot",
                               {"whole pool, same users": (num_shots, refs)} if full else None)
    if full:
        fp = np.mean([r.full_pool[:, 0, 0] for r in results], 0)
        more["full_pool"] = {"fewshot_train": {"mean": fp[0], "std": fp[1]}, "unseen_test": {"mean": fp[2],
                             "std": fp[3]}, "std_over": "users", "users": "every user with a pool (mean over seeds)"}
        for pct in (95, 99):
            more[f"shots_to_{pct}pct_of_full_pool"] = reach = {
                r: next((s for s, p, ref in zip(num_shots, points[r], refs) if p["mean"] >= pct / 100 * ref), None)
                for r in rules}
            print(f"{pct}% of the whole-pool accuracy of the same users first reached at: " + ", ".join(
                f"{r} {'not within ' + str(max(num_shots)) if s is None else s} shots" for r, s in reach.items()))
    if r0.budget_acc is not None:
        budgets = r0.pair_budgets
        at = {rule: [_point({q: [r.budget_acc[q][0, 0, b] for r in results] for q in rules}, rules, rule)
                     for b in range(len(budgets))] for rule in rules}
        _comparison_table("unseen-user test accuracy at exactly P answered comparisons", "P", budgets, at, rules)
        more["results_by_answered_pairs"] = {rule: [{"pairs": P, **p} for P, p in zip(budgets, at[rule])]
                                             for rule in rules}
        panels += _panels(budgets, at, rules, "answered comparisons per user", "per answered comparison")
    if r0.stopping:
        more["stopping"] = _report_stopping(results)
    if baselines and "user_acc_by_seed" in next(iter(baselines.values())):  # several seeds: as the rules
        bpoints = {m: [stratified_mean([u[j] for u in b["user_acc_by_seed"]]) for j in range(len(num_shots))]
                   for m, b in baselines.items()}
        print("\nthe other methods (random shots): unseen-user test accuracy, mean over seeds of the mean over users ± "
              "95% interval half-width (users, seeds as strata)")
        print_table(["shots"] + [b["label"] for b in baselines.values()], [
            [s] + [f"{p[j][0]:.4f} ± {p[j][1]:.4f}" for p in bpoints.values()] for j, s in enumerate(num_shots)])
        more["baselines"] = {m: {**{k: v for k, v in b.items() if k not in ("accuracies", "user_acc",
                                                                             "user_acc_by_seed")}, "results": [
            {"shots": s, "unseen_test": {"mean": p[j][0], "ci95": [p[j][0] - p[j][1], p[j][0] + p[j][1]],
                                         "per_seed": [float(np.nanmean(u[j])) if (~np.isnan(u[j])).any() else None
                                                      for u in b["user_acc_by_seed"]]}}
            for j, s in enumerate(num_shots)]} for (m, b), p in zip(baselines.items(), bpoints.values())}
        panels[0]["series"].update({b["label"]: (num_shots, [x[0] for x in bpoints[m]], [x[1] for x in bpoints[m]])
                                    for m, b in baselines.items()})
    elif baselines:
        curves = {m: [np.asarray(x, dtype=np.float64).reshape(-1) for x in b["accuracies"][:4]]
                  for m, b in baselines.items()}
        print("\nbaselines (random shots, published settings): unseen-user test accuracy, mean ± std over trials")
        print_table(["shots"] + [b["label"] for b in baselines.values()], [
            [s] + [f"{c[2][j]:.4f} ± {c[3][j]:.4f}" for c in curves.values()] for j, s in enumerate(num_shots)])
        more["baselines"] = {m: {**{k: v for k, v in b.items() if k not in ("accuracies", "user_acc")}, "results": [
            {"shots": s, "fewshot_train": {"mean": c[0][j], "std": c[1][j]},
             "unseen_test": {"mean": c[2][j], "std": c[3][j]}, "users_skipped": r0.skipped[j]}
            for j, s in enumerate(num_shots)]} for (m, b), c in zip(baselines.items(), curves.values())}
        panels[0]["series"].update({b["label"]: (num_shots, curves[m][2], curves[m][3]) for m, b in baselines.items()})
    payload = {"config": config, "K": K, "alpha": alpha, "seeds": [r.seed for r in results],
               "intervals": "95%: mean over seeds of the mean over users +- 1.96 standard errors over users (seeds "
                            "as strata); vs_random: the same over the per-user differences (paired)",
               "results": by_rule[rules[0]], "results_by_selection": by_rule, **more, **(extra or {})}
    write_report(out_dir, name, payload, lambda p: save_panels(p, panels, f"{title} (K = {K}, {S} seed(s))"), record)
    return by_rule[rules[0]]


def _report_stopping(results):
    """Print and return the stopping rule's trade-off over seeds (ShotsResult.stopping of the first alpha and K):
    per threshold the answers asked and saved against the fixed budget (min(max shots, the user's pool)), the
    comparisons answered, the test accuracy at the stop and at the budget, and the cost (paired per user)."""
    key = (results[0].alpha_list[0], results[0].K_list[0])
    stops = [r.stopping[key] for r in results]
    rows, out = [], []
    budget = stratified_mean([s["budget"] for s in stops])[0]
    budget_pairs = stratified_mean([s["budget_pairs"] for s in stops])[0]
    acc_budget, acc_budget_err = stratified_mean([s["acc_budget"] for s in stops])
    for t, threshold in enumerate(stops[0]["thresholds"]):
        asked = stratified_mean([s["asked"][t] for s in stops])[0]
        pairs = stratified_mean([s["pairs"][t] for s in stops])[0]
        acc, acc_err = stratified_mean([s["acc"][t] for s in stops])
        cost, cost_err = paired_difference([s["acc_budget"] for s in stops], [s["acc"][t] for s in stops])
        out.append({"threshold": threshold, "asked": asked, "saved": budget - asked, "saved_fraction":
                    1 - asked / budget, "pairs_asked": pairs, "unseen_test": {"mean": acc, "ci95": [acc - acc_err,
                    acc + acc_err]}, "cost": {"mean": cost, "ci95": [cost - cost_err, cost + cost_err]}})
        rows.append([f"{threshold:g}", f"{asked:.2f}", f"{budget - asked:.2f} ({100 * (1 - asked / budget):.0f}%)",
                     f"{pairs:.2f}", f"{acc:.4f}", f"{cost:+.4f} [{cost - cost_err:+.4f}, {cost + cost_err:+.4f}]"])
    print(f"\nstopping rule (active; stop when the best remaining expected information < threshold, nats): against "
          f"a fixed budget of {budget:.2f} answers per user ({budget_pairs:.2f} comparisons), accuracy "
          f"{acc_budget:.4f} ± {acc_budget_err:.4f}")
    print_table(["threshold", "answers", "saved", "comparisons", "accuracy", "cost (paired, 95%)"], rows)
    return {"budget": budget, "budget_pairs": budget_pairs, "unseen_test_at_budget": {
        "mean": acc_budget, "ci95": [acc_budget - acc_budget_err, acc_budget + acc_budget_err]}, "thresholds": out}
