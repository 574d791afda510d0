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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from lorelib.baselines import TUNE_GRID, check_baselines, run_baselines  # noqa: E402
from lorelib.choice import ChoiceRun  # noqa: E402
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
baselines = ["per_user_bt", "vpl", "pal"]  # the paper's other methods beside LoRe (lorelib/baselines.py); [] skips them
baseline_settings = {}     # overrides of their published settings (README, "Baselines"), e.g. {"vpl": {"beta": 0.0}}
tuned_settings = personalllm.TUNED_SETTINGS  # each baseline's tuned row (README, "Tuned rows"); {}: released rows only
tune = False               # True: choose the tuned rows' settings here, on held-out seen-user training pairs
tune_grid = TUNE_GRID      # the grid tune=True sweeps jointly per baseline (lorelib/baselines.py)
choice_quality = True      # also best-of-N choice quality (README, "Choice quality"); False: accuracy only
choice_prompts = 200       # test prompts (the same for every user and method, drawn with the seed) it uses; None: all
seed = 0
pairs_dtype = "auto"       # the pairs' dtype in the fit: "auto" (the prepared files'), "float32" or "bfloat16"
synthetic = False          # True: a generated PersonalLLM-shaped dataset, no download
synthetic_features = 128   # embedding size F of the synthetic data
synthetic_prompts = [9402, 1000]  # train, test prompts of the synthetic data
save_models = True         # write V, W, W_unseen of every (alpha, K) to out_dir/models/
data_dir = None            # default: PersonalLLM/data (written by prepare.py)
out_dir = None             # default: PersonalLLM/results
device = None              # default: cuda if available, else cpu
# -----------------------------------------------------------------------------
config = utils.configure(globals(), script=__file__, writable={"out_dir": "results"},
                         checks=[check_baselines, personalllm.check_config])  # every setting checked before any work
device = utils.get_device(device)

t0 = time.time()
utils.set_seed(seed)
data = personalllm.load(data_dir=data_dir, synthetic=synthetic, synthetic_prompts=synthetic_prompts,
                        synthetic_features=synthetic_features, N=N, N_unseen=N_unseen, train_density=train_density,
                        fewshot_density=fewshot_density, dirichlet_alpha=dirichlet_alpha, seed=seed,
                        reference=reference, pairs_dtype=pairs_dtype, choice=choice_quality,
                        choice_prompts=choice_prompts)
result = utils.fit_ranks(
    K_list, alpha_list, data.head, data.features, data.N, data.N_unseen, device,
    num_iterations=num_iterations, learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
    fewshot_learning_rate=fewshot_learning_rate, seed=seed, record=config.record)
# best-of-N among each test prompt's 8 responses, by the user's true reward; seen users with their fit, unseen users
# with their few-shot fit (a measurement only: it changes no fit)
choice = ChoiceRun(data.info["choice"], data.head) if choice_quality else None
if choice:
    choice.add_ranks(result)
out = utils.script_out_dir(__file__, out_dir)
name = "train_basis_synthetic" if synthetic else "train_basis"
paths = utils.save_models(out / name.replace("train_basis", "models"), result.models, data, dataset="PersonalLLM",
                          fewshot_iterations=fewshot_iterations,
                          fewshot_learning_rate=fewshot_learning_rate, record=config.record) if save_models else {}
# K chosen on held-out seen-user training pairs (never the test pairs), for the one-line summary
selection = utils.select_rank(K_list, alpha_list, data.head, data.seen_train, device, seed=seed,
                              validation_fraction=validation_fraction, num_iterations=num_iterations,
                              learning_rate=learning_rate)
# the paper's other methods, on the same users and pairs, after LoRe's models are saved
baseline_results = run_baselines(baselines, *data.features, device, seed=seed, settings=baseline_settings,
                                 tuned_settings=tuned_settings, tune_grid=tune_grid if tune else None,
                                 validation_fraction=validation_fraction, record=config.record,
                                 on_fit=choice.add_baseline if choice else None)
title = "PersonalLLM (synthetic)" if synthetic else "PersonalLLM"
choice_json = {"choice": choice.payload(result, baseline_results)} if choice else {}
utils.report_run(result, config, out, name, title,
                 extra={"seconds": time.time() - t0, "models": paths, **choice_json}, baselines=baseline_results,
                 selection=selection, record=config.record)
if choice:
    choice.report(choice_json["choice"], out, name, title, record=config.record)
print(f"done in {time.time() - t0:.0f}s")
