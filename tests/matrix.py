"""The comparison matrix: every method on every synthetic population of the PersonalLLM and Reddit TLDR shapes, over
several seeds, each cell with its 95% interval over seeds. Each (dataset, population) is one train_basis.py run
(`seeds=5 tune=True`: the tuned rows chosen on the first seed's held-out training pairs and reused for the other
seeds of the same data); its JSON is stored under <dataset>/figures/matrix/<population>.json, and the table in the
top README is rendered from those files.

    python tests/matrix.py                        # run every cell missing a JSON, then render (about 4 h of one core)
    python tests/matrix.py cells=[personalllm:latent] rerun=True
    python tests/matrix.py render=True            # only the table, from the stored JSONs

Sizes (smaller than the scripts' defaults, so that a cell takes about half an hour on one busy core): PersonalLLM
shape 1,000 + 200 prompts, F = 32, 80 seen users with 47 pairs each (train_density 0.047), 60 unseen with 9
(fewshot_density 0.009), best of 8 on 50 test prompts; Reddit TLDR shape the default synthetic sizes (26 seen
workers, about 3,000 training pairs, F = 64).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lorelib.compare import paired  # noqa: E402

POPULATIONS = ["lowrank", "ideal_points", "latent", "nonlinear_mixture"]
DATASETS = {
    "personalllm": ("PersonalLLM", ["synthetic_prompts=[1000,200]", "synthetic_features=32", "N=80", "N_unseen=60",
                                    "train_density=0.047", "fewshot_density=0.009", "choice_prompts=50"]),
    "reddit": ("RedditTLDR", []),
}
# the rows of the table: the summary lines' families (report.summary_picks)
ROWS = ["ref", "BT", "LoRe", "per-user BT", "VPL (Pets config)", "VPL (tuned)", "PAL (TLDR config)", "PAL (tuned)",
        "MRM (Reddit config)", "MRM (tuned)"]

# -----------------------------------------------------------------------------
seeds = 5
cells = None          # e.g. ["personalllm:latent"]; None: every dataset x population
rerun = False         # True: run cells that already have a JSON again
render = False        # True: only render the table from the stored JSONs
readme = str(ROOT / "README.md")
for arg in sys.argv[1:]:  # key=value overrides
    key, value = arg.split("=", 1)
    globals()[key] = json.loads(value.replace("'", '"')) if value[:1] in "[{" else \
        {"True": True, "False": False}.get(value, int(value) if value.isdigit() else value)
# -----------------------------------------------------------------------------


def stored(dataset, population):
    return ROOT / DATASETS[dataset][0] / "figures" / "matrix" / f"{population}.json"


def run_cell(dataset, population):
    """One train_basis.py run of the cell; its JSON copied to the dataset's figures/matrix/."""
    folder, sizes = DATASETS[dataset]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        cmd = [sys.executable, str(ROOT / folder / "train_basis.py"), "synthetic=True", f"population={population}",
               f"seeds={seeds}", "tune=True", "save_models=False", f"out_dir={out}", *sizes]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        name = "train_basis_synthetic" + ("" if population == "lowrank" else f"_{population}")
        result = json.loads((Path(out) / f"{name}.json").read_text())
    result["matrix"] = {"command": " ".join(["python", f"{folder}/train_basis.py"] + [c for c in cmd[2:]
                                                                                  if not c.startswith("out_dir=")]),
                        "wall_seconds": time.time() - t0}
    path = stored(dataset, population)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    print(f"{dataset} {population}: {time.time() - t0:.0f}s -> {path.relative_to(ROOT)}", flush=True)


def cell_text(row, key):
    """'mean [low, high]' in %, or regret x 100; '-' when the row is missing."""
    if row is None or key not in row:
        return "-"
    m, (lo, hi) = row[key]["mean"], row[key]["ci95"]
    scale = 100
    return f"{scale * m:.1f} [{scale * lo:.1f}, {scale * hi:.1f}]"


def row_lines(cells_of):
    """'| name | cell | ... |' for each of ROWS whose cells_of(name) -> [text] are not all '-'."""
    rows = [[name] + cells_of(name) for name in ROWS]
    return ["| " + " | ".join(row) + " |" for row in rows if any(c != "-" for c in row[1:])]


def against_lore(results, key="unseen_test"):
    """Each method's unseen accuracy minus LoRe's, paired by seed: 'mean [low, high]' in points, bold where the
    interval excludes 0 (compare.paired) -> the table's lines."""
    def cell(name, rows):
        if name == "LoRe" or name not in rows or "LoRe" not in rows:
            return "-"
        d = paired([a - b for a, b in zip(rows[name][key]["per_seed"], rows["LoRe"][key]["per_seed"])])
        text = f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
        return f"**{text}**" if d["clear"] else text
    return ["", "Each method minus LoRe, unseen test accuracy in points, paired by seed (95% interval over seeds; "
                "bold: the interval excludes 0):", "",
            "| method | " + " | ".join(results) + " |", "|" + "---|" * (len(results) + 1)] + \
        row_lines(lambda name: [cell(name, r["comparison"]["rows"]) for r in results.values()])


def render_table():
    """The README's matrix (between its markers) from the stored JSONs -> the table's text."""
    lines = []
    for dataset, (folder, _) in DATASETS.items():
        results = {p: json.loads(stored(dataset, p).read_text()) for p in POPULATIONS if stored(dataset, p).exists()}
        if not results:
            continue
        keys = [("unseen_test", "unseen acc %")] + ([("unseen_regret", "unseen regret x100")]
                                                   if any(c["key"] == "unseen_regret" for r in results.values()
                                                          for c in r["comparison"]["compared"]) else [])
        lines.append(f"\n**{folder} shape** ({len(next(iter(results.values()))['seeds'])} seeds; 95% intervals over "
                     "seeds; the JSONs: " + ", ".join(f"[{p}]({folder}/figures/matrix/{p}.json)" for p in results)
                     + ")\n")
        header = ["method"] + [f"{p}: {label}" for p in results for _, label in keys]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        def cells(name):
            out = []
            for r in results.values():
                row = r["comparison"]["rows"].get(name)
                for key, _ in keys:
                    text = cell_text(row, key)
                    vs = (row or {}).get("vs_best", {}).get(key)
                    if vs is not None and (vs["mean"] > 0 if key != "unseen_regret" else vs["mean"] < 0):  # best
                        text = f"**{text}**" + ("" if vs["clear"] else " (tie)")
                    out.append(text)
            return out
        lines += row_lines(cells)
        lines += against_lore(results)
        hours = sum(r["matrix"]["wall_seconds"] for r in results.values()) / 3600
        cells_run = "this cell" if len(results) == 1 else f"these {len(results)} cells"
        lines.append(f"\nRun time of {cells_run}: {hours:.1f} h (`python tests/matrix.py`, one thread each).")
    return "\n".join(lines).strip() + "\n"


if __name__ == "__main__":
    if not render:
        todo = [c.split(":") for c in cells] if cells else [(d, p) for d in DATASETS for p in POPULATIONS]
        for dataset, population in todo:
            if rerun or not stored(dataset, population).exists():
                run_cell(dataset, population)
    table = render_table()
    print(table)
    if not Path(readme).exists():
        sys.exit(0)
    text = Path(readme).read_text()
    start, end = "<!-- matrix -->\n", "<!-- /matrix -->"
    if start in text and end in text:
        text = text[:text.index(start) + len(start)] + table + text[text.index(end):]
        tmp = Path(readme + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, readme)
        print(f"wrote the table into {readme}")
