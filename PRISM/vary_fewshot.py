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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorelib import experiment, methods, populations  # noqa: E402
from lorelib.config import configure  # noqa: E402
from lorelib.files import script_out_dir  # noqa: E402
from lorelib.pipelines import check_shot_selection  # noqa: E402
from PRISM import prism  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
K = 10
alpha = None               # None: 0 (at 100 or more the cosine pull collapses the basis onto the true head, README
                           # "Choosing alpha"; train_basis.py chooses alpha on held-out dialogs); 1e4 with
                           # reference=published (as published)
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
baselines = methods.baseline_names()  # the other methods beside LoRe (lorelib/methods.py); [] runs LoRe alone
baseline_settings = {}     # overrides of their released settings (DIFFERENCES.md), e.g. {"vpl": {"config": "UF-P-4"}}
tuned = True               # also each method's tuned row, where settings are stored for this data; False: released only
tune = False               # True: choose the tuned rows' settings here, on held-out seen-user training pairs
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
population = "lowrank"     # synthetic users' rewards (README "Synthetic populations"): "lowrank" (LoRe's model),
                           # "ideal_points" (PAL's), "latent" (VPL's) or "nonlinear_mixture" (MLP reward models mixed)
hard_users = 0.0           # fraction of the synthetic users made hard (MRM's hardest users), of kind hard_kind
hard_kind = "noise"        # "noise" (choices at random, with probability hard_noise) or "opposite" (reward negated)
hard_noise = 1.0           # "noise" users: each choice at random with this probability (1: labels flipped w.p. 1/2)
data_dir = None            # default: PRISM/data
out_dir = None             # default: PRISM/results
device = None
_types = {"shot_selection": (str, list), "seeds": list, "stop_thresholds": list, "pair_budgets": list}
# -----------------------------------------------------------------------------
config = configure(globals(), script=__file__, writable={"out_dir": "results"}, rules=prism.RULES,
                   checks=[methods.check_methods, populations.check_population,
                           lambda c: check_shot_selection(c, dialogs=True)])  # every setting checked before any work
if num_iterations is None:
    num_iterations = 500 if synthetic else 20000
if alpha is None:
    alpha = 1e4 if reference == "published" else 0.0
if pair_budgets is None and not isinstance(shot_selection, str):
    pair_budgets = [3, 5, 10, 15, 20]
experiment.vary_fewshot(
    config, lambda s: prism.load(data_dir=data_dir, synthetic=synthetic, synthetic_users=synthetic_users,
                                 synthetic_features=synthetic_features, seed=s, reference=reference,
                                 pairs_dtype=pairs_dtype, population=population, hard_users=hard_users,
                                 hard_kind=hard_kind, hard_noise=hard_noise),
    out_dir=script_out_dir(__file__, out_dir),
    name="vary_fewshot_synthetic" + populations.suffix(config) if synthetic else "vary_fewshot",
    title="PRISM, few-shot dialogs" + (f" (synthetic{populations.suffix(config, ', ')})" if synthetic else ""),
    data_key=prism.data_key(config),
    regularized=True, overrides={"num_iterations": num_iterations, "pair_budgets": pair_budgets, "alpha": alpha},
    extra={"num_iterations_used": num_iterations, "shots_are": "dialogs per unseen user"},
    xlabel="few-shot dialogs per user")
