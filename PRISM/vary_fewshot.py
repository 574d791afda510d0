"""PRISM: unseen-user accuracy against the number of few-shot dialogs.

    python PRISM/vary_fewshot.py                  # needs PRISM/data from prepare.py
    python PRISM/vary_fewshot.py synthetic=True   # offline, CPU, no download

The basis (rank K, regularized LoRe) is learned once on the seen users. In every trial each
unseen user draws `shots` whole dialogs (all their pairs) from its few-shot half, fits its
weights on them and is evaluated on its test half. Users with fewer few-shot dialogs than
`shots` are skipped for that count (the table shows how many).
Writes out_dir/vary_fewshot.json and vary_fewshot.png (default out_dir: PRISM/results).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from lorelib.baselines import TUNE_GRID, check_baselines, run_baselines_vary_shots  # noqa: E402
from lorelib.pipelines import check_shot_selection  # noqa: E402
from PRISM import prism  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
K = 10
alpha = 1e4
reference = "head"         # K = 0 and V_sft: "head" (score.weight) or "published" (the published scripts' direction)
num_shots = None           # few-shot dialogs per user; None: 1, 2, ..., the most any unseen user has
trials = 5
num_iterations = None      # Adam steps of the joint fit; None: 20000 (published), 500 when synthetic
learning_rate = 0.5
fewshot_iterations = 500
fewshot_learning_rate = 0.5
shot_selection = "random"  # how a user's few-shot dialogs are picked from its pool: "random" (published),
                           # "uncertainty", "active" or the yardsticks "variance" and "longest" (asked one at a time,
                           # README "Choosing the comparisons"), or a list of them, run side by side:
                           # shot_selection=['random','uncertainty','active','variance','longest']
baselines = ["per_user_bt", "vpl", "pal"]  # the paper's other methods beside LoRe (lorelib/baselines.py); [] skips them
baseline_settings = {}     # overrides of their published settings (README, "Baselines"), e.g. {"vpl": {"beta": 0.0}}
tuned_settings = prism.TUNED_SETTINGS  # each baseline's tuned row (README, "Tuned rows"); {}: released rows only
tune = False               # True: choose the tuned rows' settings here, on held-out seen-user training pairs
tune_grid = TUNE_GRID      # the grid tune=True sweeps jointly per baseline (lorelib/baselines.py)
seed = 0
seeds = None               # data seeds, e.g. [0, 1, 2]: each redraws the data (synthetic users, shot draws, basis
                           # init); the rules are compared over them with 95% intervals over users, per dialog and
                           # per answered pair (README "Choosing the comparisons"); None: [seed]
pair_budgets = None        # with several rules: also compare them at exactly P answered comparisons per user (a rule's
                           # dialogs in its order, the last one cut short); None: [3, 5, 10, 15, 20] then
stop_thresholds = None     # e.g. [0.1, 0.03, 0.01]: also run the stopping rule (active selection until the best
                           # remaining expected information, in nats, falls below each) and report what it saves
pairs_dtype = "auto"       # the pairs' dtype in the fit: "auto" (the prepared files'), "float32" or "bfloat16"
synthetic = False
synthetic_users = 1000
synthetic_features = 64
data_dir = None            # default: PRISM/data
out_dir = None             # default: PRISM/results
device = None
_types = {"shot_selection": (str, list), "seeds": list, "stop_thresholds": list, "pair_budgets": list}
# -----------------------------------------------------------------------------
config = utils.configure(globals(), script=__file__, writable={"out_dir": "results"},
                         checks=[check_baselines, lambda c: check_shot_selection(c, dialogs=True)])  # before any work
device = utils.get_device(device)
if num_iterations is None:
    num_iterations = 500 if synthetic else 20000
if pair_budgets is None and not isinstance(shot_selection, str):
    pair_budgets = [3, 5, 10, 15, 20]

t0 = time.time()
results = []
for s in seeds or [seed]:
    utils.set_seed(s)
    data = prism.load(data_dir=data_dir, synthetic=synthetic, synthetic_users=synthetic_users,
                      synthetic_features=synthetic_features, seed=s, reference=reference, pairs_dtype=pairs_dtype)
    fewshot_dialogs = data.info["fewshot_dialogs"]  # [m] the dialog of each few-shot pair
    if num_shots is None:  # from the first seed's data, kept for the others
        most = max(len(set(fewshot_dialogs[data.unseen_fewshot.user == u].tolist())) for u in range(data.N_unseen))
        num_shots = list(range(1, most + 1))
    results.append(utils.vary_shots(
        trials, [alpha], [K], num_shots, data.seen_train, data.unseen_fewshot, data.unseen_test, data.head, data.N,
        data.N_unseen, device, regularized=True, shot_groups=fewshot_dialogs,
        num_iterations=num_iterations, learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
        fewshot_learning_rate=fewshot_learning_rate, seed=s,
        shot_selection=shot_selection, full_pool=True, stop_thresholds=stop_thresholds, pair_budgets=pair_budgets,
        record=config.record))
baseline_results = run_baselines_vary_shots(  # one seed only (check_shot_selection)
    baselines, trials, num_shots, data.seen_train, data.unseen_fewshot, data.unseen_test, device,
    shot_groups=fewshot_dialogs, seed=seed, settings=baseline_settings,
    tuned_settings=tuned_settings, tune_grid=tune_grid if tune else None, record=config.record)
name = "vary_fewshot_synthetic" if synthetic else "vary_fewshot"
utils.report_shots(results if len(results) > 1 else results[0], config, utils.script_out_dir(__file__, out_dir), name,
                   "PRISM, few-shot dialogs" + (" (synthetic)" if synthetic else ""),
                   extra={"seconds": time.time() - t0, "num_iterations_used": num_iterations,
                          "shots_are": "dialogs per unseen user"}, xlabel="few-shot dialogs per user",
                   baselines=baseline_results, record=config.record)
print(f"done in {time.time() - t0:.0f}s")
