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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from lorelib.baselines import TUNE_GRID, check_baselines, run_baselines  # noqa: E402
from lorelib.choice import ChoiceRun  # noqa: E402
from PRISM import prism  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
K_list = [0, 1, 5, 10, 15, 20, 25, 50]
alpha_list = [1e4]
reference = "head"         # K = 0 and V_sft: "head" (score.weight) or "published" (the published scripts' direction)
validation_fraction = 0.1  # of each seen user's training pairs, held out to choose K for the summary line
num_iterations = None      # Adam steps of the joint fit; None: 20000 (published), 500 when synthetic
learning_rate = 0.5
fewshot_iterations = 500
fewshot_learning_rate = 0.5
baselines = ["per_user_bt", "vpl", "pal"]  # the paper's other methods beside LoRe (lorelib/baselines.py); [] skips them
baseline_settings = {}     # overrides of their published settings (README, "Baselines"), e.g. {"vpl": {"beta": 0.0}}
tuned_settings = prism.TUNED_SETTINGS  # each baseline's tuned row (README, "Tuned rows"); {}: released rows only
tune = False               # True: choose the tuned rows' settings here, on held-out seen-user training pairs
tune_grid = TUNE_GRID      # the grid tune=True sweeps jointly per baseline (lorelib/baselines.py)
choice_quality = True      # also best-of-N choice quality (README, "Choice quality"); False: accuracy only
seed = 0
pairs_dtype = "auto"       # the pairs' dtype in the fit: "auto" (the prepared files'), "float32" or "bfloat16"
synthetic = False          # True: a generated PRISM-shaped dataset with a planted low-rank structure
synthetic_users = 1000
synthetic_features = 64    # embedding size F of the synthetic data
save_models = True         # write V, W, W_unseen of every (alpha, K) to out_dir/models/
data_dir = None            # default: PRISM/data (written by prepare.py)
out_dir = None             # default: PRISM/results
device = None              # default: cuda if available, else cpu
# -----------------------------------------------------------------------------
config = utils.configure(globals(), script=__file__, writable={"out_dir": "results"},
                         checks=[check_baselines, prism.check_config])  # every setting checked before any work
device = utils.get_device(device)
if num_iterations is None:
    num_iterations = 500 if synthetic else 20000

t0 = time.time()
utils.set_seed(seed)
data = prism.load(data_dir=data_dir, synthetic=synthetic, synthetic_users=synthetic_users,
                  synthetic_features=synthetic_features, seed=seed, reference=reference,
                  pairs_dtype=pairs_dtype, choice=choice_quality)
result = utils.fit_ranks(
    K_list, alpha_list, data.head, data.features, data.N, data.N_unseen, device, regularized=True,
    num_iterations=num_iterations, learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
    fewshot_learning_rate=fewshot_learning_rate, seed=seed, record=config.record)
# best-of-N among each test dialog's first-turn replies, by the user's own 1-100 ratings; seen users with their fit,
# unseen users with their few-shot fit (a measurement only: it changes no fit)
choice = ChoiceRun(data.info["choice"], data.head) if choice_quality else None
if choice:
    choice.add_ranks(result)
out = utils.script_out_dir(__file__, out_dir)
name = "train_basis_synthetic" if synthetic else "train_basis"
paths = utils.save_models(out / name.replace("train_basis", "models"), result.models, data, dataset="PRISM",
                          fewshot_iterations=fewshot_iterations,
                          fewshot_learning_rate=fewshot_learning_rate, record=config.record) if save_models else {}
# K chosen on held-out seen-user training pairs (never the test pairs), for the one-line summary
selection = utils.select_rank(K_list, alpha_list, data.head, data.seen_train, device, regularized=True, seed=seed,
                              validation_fraction=validation_fraction, num_iterations=num_iterations,
                              learning_rate=learning_rate)
# the paper's other methods, on the same users and pairs, after LoRe's models are saved
baseline_results = run_baselines(baselines, *data.features, device, seed=seed, settings=baseline_settings,
                                 tuned_settings=tuned_settings, tune_grid=tune_grid if tune else None,
                                 validation_fraction=validation_fraction, record=config.record,
                                 on_fit=choice.add_baseline if choice else None)
title = "PRISM (synthetic)" if synthetic else "PRISM"
choice_json = {"choice": choice.payload(result, baseline_results)} if choice else {}
utils.report_run(result, config, out, name, title,
                 extra={"seconds": time.time() - t0, "num_iterations_used": num_iterations,
                        "kept_bases": {f"K={K} alpha={a:g}": m["V"].shape[1] for (a, K), m in result.models.items()},
                        "models": paths, **choice_json}, baselines=baseline_results, selection=selection,
                 record=config.record)
if choice:
    choice.report(choice_json["choice"], out, name, title, record=config.record)
print(f"done in {time.time() - t0:.0f}s")
