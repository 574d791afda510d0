"""Write the measured tables of each dataset README from the results JSONs stored beside it (<dataset>/figures/),
so that no number in those tables is typed by hand:

    python tests/readme_tables.py            # every dataset README's marked blocks

A README holds marked blocks, each rewritten from one stored JSON:
    <!-- table:results train_basis_synthetic.json -->  ... <!-- /table -->   every method, seen / unseen test accuracy
    <!-- table:times train_basis_synthetic.json vary_fewshot_synthetic.json --> ... <!-- /table -->   run times
    <!-- table:fewshot vary_fewshot_synthetic.json --> ... <!-- /table -->   unseen-user accuracy per shot count
    <!-- table:tuning tuning_synthetic.json --> ... <!-- /table -->   the tuned rows' searches (a tune=True run)
    <!-- table:choice train_basis_synthetic.json --> ... <!-- /table -->   choice quality of every method
The stored JSONs are copies of a script's output (`out_dir=...`, then copied into figures/).
"""
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ["PersonalLLM", "RedditTLDR", "PRISM"]
BLOCK = re.compile(r"<!-- table:(\w+) ([^>]*?) -->\n.*?<!-- /table -->", re.S)


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def interval(cell):
    lo, hi = cell["ci95"]
    return pct(cell["mean"]) + ("" if lo != lo else f" [{pct(lo)}, {pct(hi)}]")  # NaN: no interval


def results_table(run):
    """Every method's summary line (LoRe: its chosen K), with the comparison's 95% intervals."""
    comp = run.get("comparison", {}).get("rows", {})
    over = run.get("comparison", {}).get("over", "users")
    rows = ["| method | chosen | seen users' test % | unseen users' test % | unseen, worst 10% of users % | "
            "unseen: difference from the best other method (points) |", "|---|---|---|---|---|---|"]
    for family, line in run["summary"].items():
        c = comp.get(family)
        if c is None or "seen_test" not in line:
            continue
        chosen = ", ".join(f"{k} = {v:g}" for k, v in line.items() if k not in ("seen_test", "unseen_test"))
        vs = c["vs_best"].get("unseen_test")
        diff = "" if vs is None else (f"{100 * vs['mean']:+.1f} [{100 * vs['ci95'][0]:+.1f}, "
                                      f"{100 * vs['ci95'][1]:+.1f}]" + ("" if vs["clear"] else " (contains 0)")
                                      + f" vs {vs['other']}")
        rows.append(f"| {family} | {chosen} | {interval(c['seen_test'])} | {interval(c['unseen_test'])} | "
                    f"{pct(c['unseen_test']['worst10']['mean'])} | {diff} |")
    return "\n".join(rows) + f"\n\nIntervals: 95%, over {over} (paired by {'user' if over == 'users' else 'seed'} " \
                             "for the differences).\n"


def times_table(*runs):
    """Each stored run's command time and each method's seconds."""
    rows = ["| run | seconds | per method (seconds) |", "|---|---|---|"]
    for name, run in runs:
        per = run.get("baselines", {})
        methods = ", ".join(f"{b['label']} {b['seconds']:.0f}" for b in per.values() if "seconds" in b)
        command = name.replace("_synthetic.json", ".py synthetic=True").replace(".json", ".py")
        rows.append(f"| `{command}` | {run['seconds']:.0f} | {methods or '-'} |")
    return "\n".join(rows) + "\n"


def tuning_table(run):
    """Each tuned row: its grid's size, the chosen point (and its new-user path), the held-out score, the axes on an
    edge (with why) and the search's seconds; then every method's new-user path on pseudo-new seen users."""
    rows = ["| method | points tried | chosen (held-out seen-user training pairs) | held-out % | on an edge | "
            "new users (pseudo-new seen users) | seconds |", "|---|---|---|---|---|---|---|"]
    for b in run.get("baselines", {}).values():
        t = b.get("tuning") or {}
        if "points" not in t:
            continue
        best = max(p["validation"] for p in t["points"])
        edges = ", ".join(f"{k} ({e['limit']})" for k, e in t["edges"].items() if e["edge"]) or "none"
        new = t.get("new_users", {}).get("chosen") or {}
        rows.append(f"| {b['label']} | {len(t['points'])} | {_settings(t['chosen'])} | {pct(best)} | {edges} | "
                    f"{_settings(new) or '-'} | {t['seconds'] + t.get('new_users', {}).get('seconds', 0):.0f} |")
    for label, v in run.get("new_user_validation", {}).items():
        best = max(p["validation"] for p in v["points"]) if v["points"] else v["released"]
        rows.append(f"| {label}: new users only | {len(v['points'])} | {_settings(v['chosen'])} | "
                    f"{pct(best)} (released settings {pct(v['released'])}) | "
                    f"{', '.join(k for k, e in v['edges'].items() if e['edge']) or 'none'} | - | {v['seconds']:.0f} |")
    return "\n".join(rows) + "\n"


def choice_table(run):
    """Choice quality (best of each prompt's candidates): chance, LoRe at every (alpha, K), every other method; the
    mean over users of each metric for seen / unseen users."""
    c = run["choice"]
    metrics = c["metrics"]
    rows = ["| method | " + " | ".join(f"{g} {m}" for g in ("seen", "unseen") for m in metrics) + " |",
            "|---|" + "---|" * (2 * len(metrics))]

    def cells(r):
        return " | ".join("-" if r[g][m]["mean"] is None else f"{r[g][m]['mean']:.3f}"
                          for g in ("seen", "unseen") for m in metrics)
    rows.append(f"| chance | {cells(c['chance'])} |")
    for r in c["results"]:
        name = "ref" if r["K"] == 0 else "BT" if r["K"] == 1 else f"LoRe K = {r['K']}"
        rows.append(f"| {name}" + (f" (alpha {r['alpha']:g})" if len({x['alpha'] for x in c['results']}) > 1
                                    else "") + f" | {cells(r)} |")
    rows += [f"| {b['label']} | {cells(b)} |" for b in c["baselines"].values()]
    low = ", ".join(c["lower_is_better"])
    return "\n".join(rows) + (f"\n\n{low}: lower is better; the rest higher.\n" if low else "\n")


def _settings(d):
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items())


def fewshot_table(run):
    """Unseen-user test accuracy per shot count: LoRe and every other method."""
    shots = [r["shots"] for r in run["results"]]
    cols = {f"LoRe (K = {run['K']})": [r["unseen_test"]["mean"] for r in run["results"]]}
    for b in run.get("baselines", {}).values():
        cols[b["label"]] = [r["unseen_test"]["mean"] for r in b["results"]]
    rows = ["| shots | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    rows += [f"| {s} | " + " | ".join(pct(c[j]) for c in cols.values()) + " |" for j, s in enumerate(shots)]
    return "\n".join(rows) + "\n"


def rewrite(readme):
    text = readme.read_text()

    def fill(m):
        kind, files = m.group(1), m.group(2).split()
        missing = [f for f in files if not (readme.parent / "figures" / f).is_file()]
        if missing:  # a block whose run is not stored yet stays as it is
            print(f"{readme.relative_to(ROOT)}: no figures/{missing[0]} yet, its {kind} table left as it is")
            return m.group(0)
        runs = [(f, json.loads((readme.parent / "figures" / f).read_text())) for f in files]
        body = {"results": lambda: results_table(runs[0][1]), "times": lambda: times_table(*runs),
                "fewshot": lambda: fewshot_table(runs[0][1]), "tuning": lambda: tuning_table(runs[0][1]),
                "choice": lambda: choice_table(runs[0][1])}[kind]()
        return f"<!-- table:{kind} {m.group(2)} -->\n{body}<!-- /table -->"
    new = BLOCK.sub(fill, text)
    if new != text:
        tmp = readme.with_suffix(".tmp")
        tmp.write_text(new)
        os.replace(tmp, readme)
        print(f"rewrote the tables of {readme.relative_to(ROOT)}")


if __name__ == "__main__":
    for name in sys.argv[1:] or DATASETS:
        rewrite(ROOT / name / "README.md")
