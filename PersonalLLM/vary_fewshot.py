"""PersonalLLM: unseen-user accuracy against the number of few-shot pairs.

    python PersonalLLM/vary_fewshot.py                  # needs PersonalLLM/data from prepare.py
    python PersonalLLM/vary_fewshot.py synthetic=True   # offline, CPU, no download

The basis (rank K) is learned once on the seen users; each unseen user has a pool of
int(fewshot_pool_density * P) pairs, from which `shots` are drawn in every trial.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from lorelib.baselines import TUNE_GRID, check_baselines, run_baselines_vary_shots  # noqa: E402
from lorelib.pipelines import check_shot_selection  # noqa: E402
from PersonalLLM import personalllm  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
K = 5
alpha = 0.0
reference = "head"         # K = 0 and V_sft: "head" (score.weight) or "published" (the published scripts' direction)
num_shots = [1, 2, 5, 9, 20, 45]
trials = 5
num_iterations = 1000
learning_rate = 0.5
fewshot_iterations = 500
fewshot_learning_rate = 0.1
shot_selection = "random"  # how a user's few-shot pairs are picked from its pool: "random" (published),
                           # "uncertainty", "active" or the yardstick "variance" (asked one at a time, README
                           # "Choosing the comparisons"), or a list of them, run side by side:
                           # shot_selection=['random','uncertainty','active','variance']
N = 1000
N_unseen = 500
train_density = 0.005
fewshot_pool_density = 0.005  # each unseen user's pool of pairs (47 of 9,402) to draw shots from
dirichlet_alpha = 0.1
baselines = ["per_user_bt", "vpl", "pal"]  # the paper's other methods beside LoRe (lorelib/baselines.py); [] skips them
baseline_settings = {}     # overrides of their published settings (README, "Baselines"), e.g. {"vpl": {"beta": 0.0}}
tuned_settings = personalllm.TUNED_SETTINGS  # each baseline's tuned row (README, "Tuned rows"); {}: released rows only
tune = False               # True: choose the tuned rows' settings here, on held-out seen-user training pairs
tune_grid = TUNE_GRID      # the grid tune=True sweeps jointly per baseline (lorelib/baselines.py)
seed = 0
seeds = None               # data seeds, e.g. [0, 1, 2]: each redraws the data (simulated users, shot draws, basis
                           # init); the rules are compared over them with 95% intervals over users (README
                           # "Choosing the comparisons"); None: [seed]
stop_thresholds = None     # e.g. [0.1, 0.03, 0.01]: also run the stopping rule (active selection until the best
                           # remaining expected information, in nats, falls below each) and report what it saves
pairs_dtype = "auto"       # the pairs' dtype in the fit: "auto" (the prepared files'), "float32" or "bfloat16"
synthetic = False
synthetic_features = 128
synthetic_prompts = [9402, 1000]
data_dir = None            # default: PersonalLLM/data
out_dir = None             # default: PersonalLLM/results
device = None
_types = {"shot_selection": (str, list), "seeds": list, "stop_thresholds": list}
# -----------------------------------------------------------------------------
config = utils.configure(globals(), script=__file__, writable={"out_dir": "results"},
                         checks=[check_baselines, check_shot_selection, personalllm.check_config])  # before any work
device = utils.get_device(device)

t0 = time.time()
results = []
for s in seeds or [seed]:
    utils.set_seed(s)
    data = personalllm.load(data_dir=data_dir, synthetic=synthetic, synthetic_prompts=synthetic_prompts,
                            synthetic_features=synthetic_features, N=N, N_unseen=N_unseen, train_density=train_density,
                            fewshot_pool_density=fewshot_pool_density, dirichlet_alpha=dirichlet_alpha, seed=s,
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
name = "vary_fewshot_synthetic" if synthetic else "vary_fewshot"
utils.report_shots(results if len(results) > 1 else results[0], config, utils.script_out_dir(__file__, out_dir), name,
                   "PersonalLLM (synthetic)" if synthetic else "PersonalLLM",
                   extra={"seconds": time.time() - t0}, baselines=baseline_results, record=config.record)
print(f"done in {time.time() - t0:.0f}s")
