"""Reddit TLDR: unseen-worker accuracy against the number of few-shot pairs.

    python RedditTLDR/vary_fewshot.py                  # needs RedditTLDR/data from prepare.py
    python RedditTLDR/vary_fewshot.py synthetic=True   # offline, CPU, no download

The basis (rank K) is learned once on the seen workers (split as in train_basis.py). In each of
`trials` draws, every unseen worker gets `shots` random pairs from its pool (at most max_fewshot_pairs = 100
of its train-split comparisons, as published; None: all of them) and is tested on its validation comparisons.
Workers with fewer pairs than a shot count are skipped for that count; the table reports how many.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorelib import experiment, methods, populations  # noqa: E402
from lorelib.config import configure  # noqa: E402
from lorelib.files import script_out_dir  # noqa: E402
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
baselines = methods.baseline_names()  # the other methods beside LoRe (lorelib/methods.py); [] runs LoRe alone
baseline_settings = {}     # overrides of their released settings (DIFFERENCES.md), e.g. {"vpl": {"config": "UF-P-4"}}
tuned = True               # also each method's tuned row, where settings are stored for this data; False: released only
tune = False               # True: choose the tuned rows' settings here, on held-out seen-user training pairs
seed = 0
pairs_dtype = "auto"       # the pairs' dtype in the fit: "auto" (the prepared files'), "float32" or "bfloat16"
synthetic = False
synthetic_features = 64
population = "lowrank"     # synthetic users' rewards (README "Synthetic populations"): "lowrank" (LoRe's model),
                           # "ideal_points" (PAL's), "latent" (VPL's) or "nonlinear_mixture" (MLP reward models mixed)
hard_users = 0.0           # fraction of the synthetic users made hard (MRM's hardest users), of kind hard_kind
hard_kind = "noise"        # "noise" (choices at random, with probability hard_noise) or "opposite" (reward negated)
hard_noise = 1.0           # "noise" users: each choice at random with this probability (1: labels flipped w.p. 1/2)
data_dir = None            # default: RedditTLDR/data
out_dir = None             # default: RedditTLDR/results
device = None
_types = {"shot_selection": (str, list), "seeds": list, "stop_thresholds": list}
# -----------------------------------------------------------------------------
config = configure(globals(), script=__file__, writable={"out_dir": "results"}, rules=tldr.RULES,
                   checks=[methods.check_methods, populations.check_population,
                           check_shot_selection])  # every setting checked before any work
experiment.vary_fewshot(
    config, lambda s: tldr.load(
        data_dir=data_dir, synthetic=synthetic, synthetic_features=synthetic_features, protocol=protocol,
        max_train_pairs=max_train_pairs, max_fewshot_pairs=max_fewshot_pairs, min_comparisons=min_comparisons,
        split_seed=split_seed + (s if seeds else 0), seed=s, reference=reference, pairs_dtype=pairs_dtype,
        population=population, hard_users=hard_users, hard_kind=hard_kind, hard_noise=hard_noise),
    out_dir=script_out_dir(__file__, out_dir),
    name="vary_fewshot" + ("_paper" if protocol == "paper" else "")
    + ("_synthetic" + populations.suffix(config) if synthetic else ""),
    title="Reddit TLDR" + (" paper split" if protocol == "paper" else "")
    + (f" (synthetic{populations.suffix(config, ', ')})" if synthetic else ""),
    data_key=tldr.data_key(config), extra=lambda data: {"workers": data.info["workers"]})
