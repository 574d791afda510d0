"""PersonalLLM: learn K shared basis rewards from 1,000 simulated users, personalize 500 new ones.

    python PersonalLLM/prepare.py                 # once: embeddings -> PersonalLLM/data/
    python PersonalLLM/train_basis.py             # K_list x alpha_list table, JSON and PNG
    python PersonalLLM/train_basis.py synthetic=True   # offline, CPU, no download

Users are Dirichlet(0.1) mixtures of the 10 reward models; a user's pair on a prompt is its
highest- vs lowest-scored response. Seen users see 0.5% of the train prompts (47 pairs), unseen
users 0.1% (9 pairs); everyone is evaluated on all test prompts.

Writes to out_dir (default PersonalLLM/results): train_basis.json, train_basis.png (accuracy vs rank),
train_basis_choice.png (choice quality vs rank: best of each test prompt's 8 responses, by the user's true reward)
and models/K{K}_alpha{alpha}.safetensors (models_synthetic/ for synthetic data): V [F, K], W [N, K],
W_unseen [N_unseen, K] and metadata (utils.save_lore_model), for utils.PersonalizedReward and
PRISM/personalize.py. Simulated users are numbered: seen 0..N-1, unseen N..N+N_unseen-1.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorelib import experiment, methods, populations  # noqa: E402
from lorelib.config import configure  # noqa: E402
from lorelib.files import script_out_dir  # noqa: E402
from PersonalLLM import personalllm  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
K_list = [0, 1, 2, 3, 4, 5]
alpha_list = [0.0]
reference = "head"         # K = 0 and V_sft: "head" (score.weight) or "published" (the published scripts' direction)
validation_fraction = 0.1  # of each seen user's training pairs, held out to choose K for the summary line
num_iterations = 1000      # joint fit: Adam steps
learning_rate = 0.5
fewshot_iterations = 500
fewshot_learning_rate = 0.1
N = 1000                   # seen users
N_unseen = 500             # unseen users (few-shot)
train_density = 0.005      # fraction of train prompts each seen user labels (47 of 9,402)
fewshot_density = 0.001    # fraction each unseen user labels for few-shot (9 of 9,402)
dirichlet_alpha = 0.1      # users w ~ Dirichlet(dirichlet_alpha * ones(10))
baselines = methods.baseline_names()  # the other methods beside LoRe (lorelib/methods.py); [] runs LoRe alone
baseline_settings = {}     # overrides of their released settings (DIFFERENCES.md), e.g. {"vpl": {"config": "UF-P-4"}}
tuned = True               # also each method's tuned row, where settings are stored for this data; False: released only
tune = False               # True: choose the tuned rows' settings here, on held-out seen-user training pairs
choice_quality = True      # also best-of-N choice quality (README, "Choice quality"); False: accuracy only
choice_prompts = 200       # test prompts (the same for every user and method, drawn with the seed) it uses; None: all
seed = 0
seeds = None               # e.g. 20 or [0, 1, 2]: the protocol once per seed (split, fits, few-shot draws), compared
                           # with 95% intervals over seeds (the paper averages 20 random splits); None: [seed]
pairs_dtype = "auto"       # the pairs' dtype in the fit: "auto" (the prepared files'), "float32" or "bfloat16"
synthetic = False          # True: a generated PersonalLLM-shaped dataset, no download
synthetic_features = 128   # embedding size F of the synthetic data
synthetic_prompts = [9402, 1000]  # train, test prompts of the synthetic data
population = "lowrank"     # synthetic users' rewards (README "Synthetic populations"): "lowrank" (LoRe's model),
                           # "ideal_points" (PAL's), "latent" (VPL's) or "nonlinear_mixture" (MLP reward models mixed)
hard_users = 0.0           # fraction of the synthetic users made hard (MRM's hardest users), of kind hard_kind
hard_kind = "noise"        # "noise" (choices at random, with probability hard_noise) or "opposite" (reward negated)
hard_noise = 1.0           # "noise" users: each choice at random with this probability (1: labels flipped w.p. 1/2)
save_models = True         # write V, W, W_unseen of every (alpha, K) to out_dir/models/
data_dir = None            # default: PersonalLLM/data (written by prepare.py)
out_dir = None             # default: PersonalLLM/results
device = None              # default: cuda if available, else cpu
_types = {"seeds": (int, list)}
# -----------------------------------------------------------------------------
config = configure(globals(), script=__file__, writable={"out_dir": "results"}, rules=personalllm.RULES,
                   checks=[methods.check_methods, populations.check_population,
                           personalllm.check_config])  # every setting checked before any work
experiment.train_basis(
    config, lambda s: personalllm.load(
        data_dir=data_dir, synthetic=synthetic, synthetic_prompts=synthetic_prompts,
        synthetic_features=synthetic_features, N=N, N_unseen=N_unseen, train_density=train_density,
        fewshot_density=fewshot_density, dirichlet_alpha=dirichlet_alpha, seed=s, reference=reference,
        pairs_dtype=pairs_dtype, choice=choice_quality, choice_prompts=choice_prompts, population=population,
        hard_users=hard_users, hard_kind=hard_kind, hard_noise=hard_noise),
    out_dir=script_out_dir(__file__, out_dir), dataset="PersonalLLM",
    name="train_basis_synthetic" + populations.suffix(config) if synthetic else "train_basis",
    title=f"PersonalLLM (synthetic{populations.suffix(config, ', ')})" if synthetic else "PersonalLLM",
    data_key=personalllm.data_key(config))
