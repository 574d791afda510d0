"""PersonalLLM: unseen-user accuracy against the number of few-shot pairs.

    python PersonalLLM/vary_fewshot.py                  # needs PersonalLLM/data from prepare.py
    python PersonalLLM/vary_fewshot.py synthetic=True   # offline, CPU, no download

The basis (rank K) is learned once on the seen users; each unseen user has a pool of
int(fewshot_pool_density * P) pairs, from which `shots` are drawn in every trial.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorelib import experiment, methods, populations  # noqa: E402
from lorelib.config import configure  # noqa: E402
from lorelib.files import script_out_dir  # noqa: E402
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
baselines = methods.baseline_names()  # the other methods beside LoRe (lorelib/methods.py); [] runs LoRe alone
baseline_settings = {}     # overrides of their released settings (DIFFERENCES.md), e.g. {"vpl": {"config": "UF-P-4"}}
tuned = True               # also each method's tuned row, where settings are stored for this data; False: released only
tune = False               # True: choose the tuned rows' settings here, on held-out seen-user training pairs
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
population = "lowrank"     # synthetic users' rewards (README "Synthetic populations"): "lowrank" (LoRe's model),
                           # "ideal_points" (PAL's), "latent" (VPL's) or "nonlinear_mixture" (MLP reward models mixed)
hard_users = 0.0           # fraction of the synthetic users made hard (MRM's hardest users), of kind hard_kind
hard_kind = "noise"        # "noise" (choices at random, with probability hard_noise) or "opposite" (reward negated)
hard_noise = 1.0           # "noise" users: each choice at random with this probability (1: labels flipped w.p. 1/2)
data_dir = None            # default: PersonalLLM/data
out_dir = None             # default: PersonalLLM/results
device = None
_types = {"shot_selection": (str, list), "seeds": list, "stop_thresholds": list}
# -----------------------------------------------------------------------------
config = configure(globals(), script=__file__, writable={"out_dir": "results"}, rules=personalllm.RULES,
                   checks=[methods.check_methods, populations.check_population, check_shot_selection,
                           personalllm.check_config])  # every setting checked before any work
experiment.vary_fewshot(
    config, lambda s: personalllm.load(
        data_dir=data_dir, synthetic=synthetic, synthetic_prompts=synthetic_prompts,
        synthetic_features=synthetic_features, N=N, N_unseen=N_unseen, train_density=train_density,
        fewshot_pool_density=fewshot_pool_density, dirichlet_alpha=dirichlet_alpha, seed=s, reference=reference,
        pairs_dtype=pairs_dtype, population=population, hard_users=hard_users, hard_kind=hard_kind,
        hard_noise=hard_noise),
    out_dir=script_out_dir(__file__, out_dir),
    name="vary_fewshot_synthetic" + populations.suffix(config) if synthetic else "vary_fewshot",
    title=f"PersonalLLM (synthetic{populations.suffix(config, ', ')})" if synthetic else "PersonalLLM",
    data_key=personalllm.data_key(config))
