"""Reddit TLDR: learn K shared basis rewards from seen workers, personalize unseen workers few-shot.

    python RedditTLDR/prepare.py                       # once: embeddings -> RedditTLDR/data/
    python RedditTLDR/train_basis.py                   # K_list x alpha_list table, JSON and PNG
    python RedditTLDR/train_basis.py protocol=paper    # the paper's split (see below)
    python RedditTLDR/train_basis.py synthetic=True    # offline, CPU, no download

protocol=published (the published script): the two workers with the fewest train-split comparisons
are dropped; the workers present in both splits are shuffled with random.Random(split_seed) and
halved into seen / unseen. Seen workers train on at most 150 of their train-split comparisons,
unseen workers get at most 50 few-shot pairs from theirs; everyone is tested on all their
validation-split comparisons. protocol=paper: workers with fewer than 50 comparisons (both splits)
are dropped and each worker's comparisons are split half train (or few-shot), half test; the same
caps apply. Capped subsets are seeded random subsets (split_seed). K = 0 is the reward model's own
head, K = 1 one Bradley-Terry reward for everyone.

Writes to out_dir (default RedditTLDR/results): train_basis[_paper].{json,png} and
models[_paper]/K{K}_alpha{alpha}.safetensors (models_synthetic/ ... for synthetic data): V [F, K], W and
W_unseen with the worker names as user ids (utils.save_lore_model), for utils.PersonalizedReward and
PRISM/personalize.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorelib import experiment, methods, populations  # noqa: E402
from lorelib.config import configure  # noqa: E402
from lorelib.files import script_out_dir  # noqa: E402
from RedditTLDR import tldr  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
K_list = [0, 1, 2, 3, 4, 5, 6]
alpha_list = [0.0]
reference = "head"         # K = 0 and V_sft: "head" (score.weight) or "published" (the published scripts' direction)
validation_fraction = 0.1  # of each seen user's training pairs, held out to choose K for the summary line
num_iterations = 1000      # joint fit: Adam steps
learning_rate = 0.5
fewshot_iterations = 500
fewshot_learning_rate = 0.1
protocol = "published"     # "published" or "paper"
max_train_pairs = 150      # per seen worker (a large number keeps all)
max_fewshot_pairs = 50     # per unseen worker
min_comparisons = 50       # paper protocol: workers with fewer comparisons are dropped
split_seed = 0             # shuffles the workers (random.Random) and draws the capped subsets
baselines = methods.baseline_names()  # the other methods beside LoRe (lorelib/methods.py); [] runs LoRe alone
baseline_settings = {}     # overrides of their released settings (DIFFERENCES.md), e.g. {"vpl": {"config": "UF-P-4"}}
tuned = True               # also each method's tuned row, where settings are stored for this data; False: released only
tune = False               # True: choose the tuned rows' settings here, on held-out seen-user training pairs
seed = 0
seeds = None               # e.g. 20 or [0, 1, 2]: the protocol once per seed (split, fits, few-shot draws), compared
                           # with 95% intervals over seeds (the paper averages 20 random splits); None: [seed]
pairs_dtype = "auto"       # the pairs' dtype in the fit: "auto" (the prepared files'), "float32" or "bfloat16"
synthetic = False          # True: a generated Reddit-TLDR-shaped dataset, no download
synthetic_features = 64    # embedding size F of the synthetic data
population = "lowrank"     # synthetic users' rewards (README "Synthetic populations"): "lowrank" (LoRe's model),
                           # "ideal_points" (PAL's), "latent" (VPL's) or "nonlinear_mixture" (MLP reward models mixed)
hard_users = 0.0           # fraction of the synthetic users made hard (MRM's hardest users), of kind hard_kind
hard_kind = "noise"        # "noise" (choices at random, with probability hard_noise) or "opposite" (reward negated)
hard_noise = 1.0           # "noise" users: each choice at random with this probability (1: labels flipped w.p. 1/2)
save_models = True         # write V, W, W_unseen of every (alpha, K) to out_dir/models/
data_dir = None            # default: RedditTLDR/data (written by prepare.py)
out_dir = None             # default: RedditTLDR/results
device = None              # default: cuda if available, else cpu
_types = {"seeds": (int, list)}
# -----------------------------------------------------------------------------
config = configure(globals(), script=__file__, writable={"out_dir": "results"}, rules=tldr.RULES,
                   checks=[methods.check_methods, populations.check_population])  # every setting checked first
name = "train_basis" + ("_paper" if protocol == "paper" else "") + (
    "_synthetic" + populations.suffix(config) if synthetic else "")
experiment.train_basis(
    config, lambda s: tldr.load(
        data_dir=data_dir, synthetic=synthetic, synthetic_features=synthetic_features, protocol=protocol,
        max_train_pairs=max_train_pairs, max_fewshot_pairs=max_fewshot_pairs, min_comparisons=min_comparisons,
        split_seed=split_seed + (s if seeds else 0), seed=s, reference=reference, pairs_dtype=pairs_dtype,
        population=population, hard_users=hard_users, hard_kind=hard_kind, hard_noise=hard_noise),
    out_dir=script_out_dir(__file__, out_dir), name=name, dataset="RedditTLDR", data_key=tldr.data_key(config),
    title="Reddit TLDR" + (" paper split" if protocol == "paper" else "")
    + (f" (synthetic{populations.suffix(config, ', ')})" if synthetic else ""),
    extra=lambda data: {"workers": data.info["workers"]})
