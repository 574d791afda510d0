"""Reddit TLDR: unseen-worker accuracy against the number of few-shot pairs.

    python RedditTLDR/vary_fewshot.py                  # needs RedditTLDR/data from prepare.py
    python RedditTLDR/vary_fewshot.py synthetic=True   # offline, CPU, no download

The basis (rank K) is learned once on the seen workers (split as in train_basis.py). In each of
`trials` draws, every unseen worker gets `shots` random pairs from its pool (at most max_fewshot_pairs = 100
of its train-split comparisons, as published; None: all of them) and is tested on its validation comparisons.
Workers with fewer pairs than a shot count are skipped for that count; the table reports how many.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from lorelib.baselines import TUNE_GRID, check_baselines, run_baselines_vary_shots  # noqa: E402
from lorelib.pipelines import check_shot_selection  # noqa: E402
from RedditTLDR import tldr  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
K = 5
alpha = 0.0
reference = "head"         # K = 0 and V_sft: "head" (score.weight) or "published" (the published scripts' direction)
num_shots = [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
trials = 20
num_iterations = 500       # joint fit, as published for vary_fewshot
learning_rate = 0.5
fewshot_iterations = 500
fewshot_learning_rate = 0.1
shot_selection = "random"  # how a user's few-shot pairs are picked from its pool: "random" (published),
                           # "uncertainty", "active" or the yardstick "variance" (asked one at a time, README
                           # "Choosing the comparisons"), or a list of them, run side by side:
                           # shot_selection=['random','uncertainty','active','variance']
protocol = "published"     # "published" or "paper" (see train_basis.py)
max_train_pairs = 150      # per seen worker
max_fewshot_pairs = 100    # pool of an unseen worker's shots, as published (None: all its train-split comparisons)
min_comparisons = 50       # paper protocol
split_seed = 0
seeds = None               # data seeds, e.g. [0, 1, 2]: each seed s redraws the data (synthetic comparisons, the
                           # worker split with split_seed + s, shot draws, basis init); the rules are compared over
                           # them with 95% intervals over users (README "Choosing the comparisons"); None: [seed]
stop_thresholds = None     # e.g. [0.1, 0.03, 0.01]: also run the stopping rule (active selection until the best
                           # remaining expected information, in nats, falls below each) and report what it saves
baselines = ["per_user_bt", "vpl", "pal"]  # the paper's other methods beside LoRe (lorelib/baselines.py); [] skips them
baseline_settings = {}     # overrides of their published settings (README, "Baselines"), e.g. {"vpl": {"beta": 0.0}}
tuned_settings = tldr.TUNED_SETTINGS  # each baseline's tuned row (README, "Tuned rows"); {}: released rows only
tune = False               # True: choose the tuned rows' settings here, on held-out seen-user training pairs
tune_grid = TUNE_GRID      # the grid tune=True sweeps jointly per baseline (lorelib/baselines.py)
seed = 0
pairs_dtype = "auto"       # the pairs' dtype in the fit: "auto" (the prepared files'), "float32" or "bfloat16"
synthetic = False
synthetic_features = 64
data_dir = None            # default: RedditTLDR/data
out_dir = None             # default: RedditTLDR/results
device = None
_types = {"shot_selection": (str, list), "seeds": list, "stop_thresholds": list}
# -----------------------------------------------------------------------------
config = utils.configure(globals(), script=__file__, writable={"out_dir": "results"},
                         checks=[check_baselines, check_shot_selection])  # every setting checked before any work
device = utils.get_device(device)

t0 = time.time()
results = []
for s in seeds or [seed]:
    utils.set_seed(s)
    data = tldr.load(data_dir=data_dir, synthetic=synthetic, synthetic_features=synthetic_features, protocol=protocol,
                     max_train_pairs=max_train_pairs, max_fewshot_pairs=max_fewshot_pairs,
                     min_comparisons=min_comparisons, split_seed=split_seed + (s if seeds else 0), seed=s,
                     reference=reference, pairs_dtype=pairs_dtype)
    results.append(utils.vary_shots(
        trials, [alpha], [K], num_shots, data.seen_train, data.unseen_fewshot, data.unseen_test, data.head, data.N,
        data.N_unseen, device, num_iterations=num_iterations, learning_rate=learning_rate,
        fewshot_iterations=fewshot_iterations, fewshot_learning_rate=fewshot_learning_rate, seed=s,
        shot_selection=shot_selection, full_pool=True, stop_thresholds=stop_thresholds, record=config.record))
baseline_results = run_baselines_vary_shots(  # one seed only (check_shot_selection)
    baselines, trials, num_shots, data.seen_train, data.unseen_fewshot, data.unseen_test, device,
    seed=seed, settings=baseline_settings,
    tuned_settings=tuned_settings, tune_grid=tune_grid if tune else None, record=config.record)
name = "vary_fewshot" + ("_paper" if protocol == "paper" else "") + ("_synthetic" if synthetic else "")
title = "Reddit TLDR" + (" paper split" if protocol == "paper" else "") + (" (synthetic)" if synthetic else "")
utils.report_shots(results if len(results) > 1 else results[0], config, utils.script_out_dir(__file__, out_dir), name,
                   title, extra={"workers": data.info["workers"], "seconds": time.time() - t0},
                   baselines=baseline_results, record=config.record)
print(f"done in {time.time() - t0:.0f}s")
