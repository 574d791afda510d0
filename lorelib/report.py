"""Reporting: plain-text tables, the results JSON (never lost: a fallback folder when the output folder cannot be
written) and plots; report_run writes a train_basis run from evaluate's results (every method, every metric).

Imports: config, files, data (the names of the four pair sets), metrics.
"""
import json
from pathlib import Path

import numpy as np

from .config import note_written
from .data import RESULT_NAMES, TIE_TOLERANCE
from .files import atomic_path, jsonable, save_json, save_or_fallback
from .metrics import HEADLINE

DEGENERATE_TIES = 0.5  # a method with near-ties on more than this share of a test set's pairs is flagged


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


def save_panels(path, panels, title):
    """Line plots with error bars, two a row, saved atomically as PNG. panels: a list of {"series": {label: (x [n],
    mean [n], err [n])}, "lines": {label: (x [n], y [n])} (dashed, no error bars), "xlabel", "ylabel", "title",
    "zero": draw y = 0}; a label keeps its colour across panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    colors = {}
    for ax, panel in zip(axes.flat, panels):
        for label, (x, mean, err) in panel["series"].items():
            color = colors.setdefault(label, f"C{len(colors) % 10}")
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=label, color=color)
        for label, (x, y) in panel.get("lines", {}).items():
            color = colors.setdefault(label, f"C{len(colors) % 10}")
            ax.plot(x, y, linestyle="--", color=color, label=label)
        if panel.get("zero"):
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.set_title(panel["title"], fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def _method_of(K):
    """Row label of rank K in run tables: the reference head, one Bradley-Terry reward, or LoRe."""
    return "ref" if K == 0 else "BT" if K == 1 else "LoRe"


def _json_sets(r):
    """{pair set: {"mean", "std" (the headline accuracy over users), every other metric's mean over users}}."""
    return {n: {"mean": r.mean(n), "std": r.std(n),
                **{m: float(np.mean(v)) for m, v in r.users[n].items() if m != HEADLINE}} for n in RESULT_NAMES}


def json_entry(r):
    """The results JSON's entry of a method other than LoRe (its "baselines" dict)."""
    out = r.run.fields()
    if r.validation is not None:
        out.update(validation=r.validation, chosen=r.chosen)
    return {**out, **_json_sets(r), "seconds": r.seconds}


def summary_picks(results):
    """{family: the MethodResult its summary line reports, or None}: a family of swept runs (LoRe's K, a baseline's
    swept setting) its run chosen on held-out training pairs (evaluate.choose; None when nothing was chosen), a
    family of one run that run, and one run per alpha (ref, BT) the run at LoRe's chosen alpha (else the first)."""
    lore = [r for r in results if r.chosen and r.run.name == "lore"]
    alpha = lore[0].run.settings["alpha"] if lore else None
    out = {}
    for family in dict.fromkeys(r.run.family for r in results):
        group = [r for r in results if r.run.family == family]
        if group[0].run.sweep:
            pick = [r for r in group if r.chosen] or (group if len(group) == 1 else [])
        else:
            pick = [r for r in group if r.run.settings.get("alpha") == alpha] or group
        out[family] = pick[0] if pick else None
    return out


def summary(results, log=print):
    """{family: {its swept settings..., "seen_test", "unseen_test"}} of summary_picks, printed one line per family
    (its swept settings None when nothing was chosen)."""
    out = {}
    for family, pick in summary_picks(results).items():
        group = [r for r in results if r.run.family == family]
        out[family] = {k: None for k in group[0].run.sweep} if pick is None else {
            **pick.run.sweep, "seen_test": pick.mean("seen_test"), "unseen_test": pick.mean("unseen_test")}
    log("\none line per method (K chosen on held-out pairs of the seen users' training data, never on test pairs): "
        "seen / unseen users' test accuracy")
    for family, acc in out.items():
        if "seen_test" not in acc:
            log(f"  {family}: not chosen (validation_fraction = 0)")
            continue
        ranks = "".join(f"{k} = {v:g}, " for k, v in acc.items() if k not in ("seen_test", "unseen_test"))
        log(f"  {family}: {ranks}{acc['seen_test']:.4f} / {acc['unseen_test']:.4f}")
    return out


def selection(results):
    """LoRe's (alpha, K) chosen on held-out pairs: {"alpha", "K", "validation": {"alpha=.. K=..": accuracy}}, or
    None when nothing was chosen."""
    lore = [r for r in results if r.run.name == "lore" and r.validation is not None]
    best = [r for r in lore if r.chosen]
    if not best:
        return None
    return {"alpha": best[0].run.settings["alpha"], "K": best[0].run.settings["K"],
            "validation": {f"alpha={r.run.settings['alpha']:g} K={r.run.settings['K']}": r.validation for r in lore}}


def _cells(r, sets):
    return [f"{r.mean(n):.4f} ± {r.std(n):.4f}" for n in sets]


def run_payload(results, title, log=print):
    """Print the accuracy table of evaluate's results (LoRe's runs by alpha and K, then every other method; a method
    that departs from its released code is marked) and the table of every other registered metric (test sets), the
    summary lines -> ({"results" (LoRe: one entry per alpha, K), "baselines" (every other method by entry),
    "summary", "selection"}, plot(path): accuracy against K with the other methods as lines)."""
    alphas = list(dict.fromkeys(r.run.settings["alpha"] for r in results if r.run.name == "lore"))
    lore = sorted([r for r in results if r.run.name == "lore"],  # a K added past an edge takes its place
                  key=lambda r: (alphas.index(r.run.settings["alpha"]), r.run.settings["K"]))
    others = [r for r in results if r.run.name != "lore"]
    results = lore + others
    rows, degenerate = [], []
    for r in results:
        ties = max(float(np.mean(r.users[n]["ties"])) for n in ("seen_test", "unseen_test"))
        flag = f" [ties {ties:.0%}]" if ties > DEGENERATE_TIES else ""
        degenerate += [r.run.label] if flag else []
        s = r.run.settings
        head = [_method_of(s["K"]), f"{s['alpha']:g}", s["K"]] if r.run.name == "lore" else [
            r.run.label + (" *" if r.run.info.get("departures") else ""), "", ""]
        rows.append([head[0] + flag] + head[1:] + _cells(r, RESULT_NAMES))
    log(f"\n{title}: accuracy, mean ± std over users (K = 0: reference head, K = 1: Bradley-Terry)")
    print_table(["method", "alpha", "K"] + RESULT_NAMES, rows)
    if any(r.run.info.get("departures") for r in others):
        log("*: departs from its released code on frozen embeddings; each departure is in the JSON (\"departures\") "
            "and DIFFERENCES.md")
    if degenerate:
        log(f"[ties x%]: a degenerate fit ({', '.join(degenerate)}): its margins are near-ties (|margin| <= "
            f"{TIE_TOLERANCE:g}) on more than {DEGENERATE_TIES:.0%} of a test set's pairs, and a tie counts as "
            "wrong; the JSON's \"ties_half\" counts them half")
    more = [m for m in results[0].users["seen_test"] if m != HEADLINE] if results else []
    if more:
        log(f"\n{title}: more metrics on the test sets, mean over users ({', '.join(more)}: metrics.py)")
        print_table(["method"] + [f"{g} {m}" for m in more for g in ("seen", "unseen")],
                    [[r.run.label] + [f"{np.mean(r.users[f'{g}_test'][m]):.4f}" for m in more
                                      for g in ("seen", "unseen")] for r in results])
    lines, chosen = summary(results, log), selection(results)
    payload = {"results": [{"alpha": r.run.settings["alpha"], "K": r.run.settings["K"], **_json_sets(r)}
                           for r in lore], **({"baselines": {r.run.entry: json_entry(r) for r in others}}
                                              if others else {}), "summary": lines,
               **({"selection": chosen} if chosen else {})}
    K_list = sorted(dict.fromkeys(r.run.settings["K"] for r in lore))
    at = {(r.run.settings["alpha"], r.run.settings["K"]): r for r in lore}
    series = {f"{label} (alpha={al:g})": ([at[al, K].mean(key) if (al, K) in at else np.nan for K in K_list],
                                          [at[al, K].std(key) if (al, K) in at else np.nan for K in K_list])
              for al in alphas for key, label in [("seen_test", "seen users"), ("unseen_test", "unseen users")]}
    hlines = {f"{r.run.label}, {label}": (r.mean(key), style) for r in others
              for key, label, style in [("seen_test", "seen users", ":"), ("unseen_test", "unseen users", "--")]}
    return payload, lambda p: save_plot(p, list(range(len(K_list))), series, "K (0 = reference head, 1 = BT)",
                                        "test accuracy", f"{title}: accuracy vs rank", xticks=K_list, hlines=hlines)


def report_run(results, config, out_dir, name, title, extra=None, record=None):
    """Print and write (`name`.json / .png) a train_basis run: run_payload's tables, JSON and plot, with the config
    and `extra`. record: the script's RunRecord (the files written). -> the JSON's "results"."""
    payload, plot = run_payload(results, title)
    write_report(out_dir, name, {"config": config, **payload, **(extra or {})}, plot, record)
    return payload["results"]


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


