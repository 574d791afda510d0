"""PRISM: learn K shared basis rewards on the seen users (regularized LoRe), personalize the unseen ones.

    python PRISM/prepare.py                  # once: pairs and embeddings -> PRISM/data/
    python PRISM/train_basis.py              # K_list x alpha_list table, JSON, PNG and the learned models
    python PRISM/train_basis.py synthetic=True   # offline, CPU, no download (about a minute)

LoRe_regularized (pooled loss, alternating W / V steps, cosine pull of every basis column to
the reward model's own head, ramped in from 20% to 80% of the steps). K = 0 is the reference
head, K = 1 one Bradley-Terry reward for everyone. Seen users are trained on half of their
dialogs and tested on the other half; unseen users fit their weights on half of their dialogs
(few-shot) and are tested on the rest.

Writes to out_dir (default PRISM/results): train_basis.json, train_basis.png (accuracy vs rank),
train_basis_choice.png (choice quality vs rank: best of each test dialog's first-turn replies, by the user's ratings)
and models/K{K}_alpha{alpha}.safetensors (models_synthetic/ for synthetic data) with `V` [F, K']
(the kept basis columns), `W` [N, K'] (seen users), `W_unseen` [N_unseen, K'] and metadata (PRISM
user ids, reward model, ...; utils.save_lore_model), for PRISM/eval_rb2.py rm_head=...,
PRISM/personalize.py and utils.PersonalizedReward.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorelib import experiment, methods, populations  # noqa: E402
from lorelib.config import configure  # noqa: E402
from lorelib.files import script_out_dir  # noqa: E402
from PRISM import prism  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
K_list = [0, 1, 5, 10, 15, 20, 25, 50]
alpha_list = None          # None: [0, 100, 1e4], chosen with K on held-out dialogs; [1e4] with reference=published
reference = "head"         # K = 0 and V_sft: "head" (score.weight) or "published" (the published scripts' direction)
validation_fraction = 0.1  # of each seen user's training pairs, held out to choose K for the summary line
num_iterations = None      # Adam steps of the joint fit; None: 20000 (published), 500 when synthetic
learning_rate = 0.5
fewshot_iterations = 500
fewshot_learning_rate = 0.5
baselines = methods.baseline_names()  # the other methods beside LoRe (lorelib/methods.py); [] runs LoRe alone
baseline_settings = {}     # overrides of their released settings (DIFFERENCES.md), e.g. {"vpl": {"config": "UF-P-4"}}
tuned = True               # also each method's tuned row, where settings are stored for this data; False: released only
tune = False               # True: choose the tuned rows' settings here, on held-out seen-user training pairs
choice_quality = True      # also best-of-N choice quality (README, "Choice quality"); False: accuracy only
seed = 0
seeds = None               # e.g. 20 or [0, 1, 2]: the protocol once per seed (split, fits, few-shot draws), compared
                           # with 95% intervals over seeds (the paper averages 20 random splits); None: [seed]
pairs_dtype = "auto"       # the pairs' dtype in the fit: "auto" (the prepared files'), "float32" or "bfloat16"
synthetic = False          # True: a generated PRISM-shaped dataset with a planted low-rank structure
synthetic_users = 1000
synthetic_features = 64    # embedding size F of the synthetic data
population = "lowrank"     # synthetic users' rewards (README "Synthetic populations"): "lowrank" (LoRe's model),
                           # "ideal_points" (PAL's), "latent" (VPL's) or "nonlinear_mixture" (MLP reward models mixed)
hard_users = 0.0           # fraction of the synthetic users made hard (MRM's hardest users), of kind hard_kind
hard_kind = "noise"        # "noise" (choices at random, with probability hard_noise) or "opposite" (reward negated)
hard_noise = 1.0           # "noise" users: each choice at random with this probability (1: labels flipped w.p. 1/2)
save_models = True         # write V, W, W_unseen of every (alpha, K) to out_dir/models/
data_dir = None            # default: PRISM/data (written by prepare.py)
out_dir = None             # default: PRISM/results
device = None              # default: cuda if available, else cpu
_types = {"alpha_list": list, "seeds": (int, list)}
# -----------------------------------------------------------------------------
config = configure(globals(), script=__file__, writable={"out_dir": "results"}, rules=prism.RULES,
                   checks=[methods.check_methods, populations.check_population,
                           prism.check_config])  # every setting checked before any work
if num_iterations is None:
    num_iterations = 500 if synthetic else 20000
if alpha_list is None:
    alpha_list = [1e4] if reference == "published" else [0.0, 100.0, 1e4]
experiment.train_basis(
    config, lambda s: prism.load(data_dir=data_dir, synthetic=synthetic, synthetic_users=synthetic_users,
                                 synthetic_features=synthetic_features, seed=s, reference=reference,
                                 pairs_dtype=pairs_dtype, choice=choice_quality, population=population,
                                 hard_users=hard_users, hard_kind=hard_kind, hard_noise=hard_noise),
    out_dir=script_out_dir(__file__, out_dir), dataset="PRISM", regularized=True,
    name="train_basis_synthetic" + populations.suffix(config) if synthetic else "train_basis",
    title=f"PRISM (synthetic{populations.suffix(config, ', ')})" if synthetic else "PRISM",
    data_key=prism.data_key(config), overrides={"num_iterations": num_iterations, "alpha_list": alpha_list},
    extra={"num_iterations_used": num_iterations})
