"""PRISM: learn K shared basis rewards on the seen users (regularized LoRe), personalize the unseen ones.

    python PRISM/prepare.py                  # once: pairs and embeddings -> PRISM/data/
    python PRISM/train_basis.py              # K_list x alpha_list table, JSON, PNG and the learned models
    python PRISM/train_basis.py synthetic=True   # offline, CPU, no download (about a minute)

LoRe_regularized (pooled loss, alternating W / V steps, cosine pull of every basis column to
the reward model's own head, ramped in from 20% to 80% of the steps). K = 0 is the reference
head, K = 1 one Bradley-Terry reward for everyone. Seen users are trained on half of their
dialogs and tested on the other half; unseen users fit their weights on half of their dialogs
(few-shot) and are tested on the rest.

Writes to out_dir (default PRISM/results): train_basis.json, train_basis.png (accuracy vs rank)
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
from PRISM import prism  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
K_list = [0, 1, 5, 10, 15, 20, 25, 50]
alpha_list = [1e4]
num_iterations = None      # Adam steps of the joint fit; None: 20000 (published), 500 when synthetic
learning_rate = 0.5
fewshot_iterations = 500
fewshot_learning_rate = 0.5
seed = 0
synthetic = False          # True: a generated PRISM-shaped dataset with a planted low-rank structure
synthetic_users = 1000
synthetic_features = 64    # embedding size F of the synthetic data
save_models = True         # write V, W, W_unseen of every (alpha, K) to out_dir/models/
data_dir = None            # default: PRISM/data (written by prepare.py)
out_dir = None             # default: PRISM/results
device = None              # default: cuda if available, else cpu
# baselines beside LoRe, on the same users, pairs, few-shot examples and seed (utils.py section 7);
# baselines=[] skips them. Defaults: the published settings (README, "Baselines").
baselines = ["per_user_bt", "vpl", "pal"]
per_user_bt_num_iterations = 1000  # one Bradley-Terry reward per user: the published learn_multiple defaults
per_user_bt_learning_rate = 0.01
vpl_hidden_dim = 512       # VPL (Poddar et al. 2024), settings of the LoRe appendix and the released code
vpl_latent_dim = 512
vpl_num_contexts = 8       # context pairs encoded per user
vpl_beta = 1e-4            # KL weight: none published for this dataset (released runs used 1e-4, 3e-6 and 0)
vpl_learning_rate = 1e-4   # AdamW, cosine schedule with warm-up, gradient clipping
vpl_weight_decay = 1e-3
vpl_batch_size = 32
vpl_num_epochs = 2
vpl_warmup_ratio = 0.03
vpl_max_grad_norm = 1.0
vpl_kl_period = 10000      # steps of one cycle of the KL annealing
vpl_eval_latent = "normalized"  # a user's latent at evaluation: "normalized" (as in training) or "mean" (released)
pal_variant = "B"          # PAL (Chen et al. 2025): "B" (the released Reddit TLDR config) or "A"
pal_K = 2                  # prototypes: not stated in the LoRe paper; the released Reddit TLDR config uses 2
pal_dim = 512
pal_learning_rate = 1e-4   # projectors (Adam)
pal_weight_decay = 0.01
pal_user_learning_rate = 5e-3   # user weights (and PAL-A's prototypes)
pal_tau_learning_rate = 0.1
pal_batch_size = 4
pal_num_epochs = 1         # the released config's; none published for this dataset
pal_fewshot_learning_rate = 5e-3  # new users: only their weights are fit
pal_fewshot_epochs = 20
pal_fewshot_batch_size = 4
# -----------------------------------------------------------------------------
config = utils.configure(globals())
utils.check_settings(config, __file__, writable={"out_dir": "results"})
baseline_kw = utils.baseline_settings(config)  # checked before any training
if num_iterations is None:
    num_iterations = 500 if synthetic else 20000

t0 = time.time()
utils.set_seed(seed)
data = prism.load(data_dir=data_dir, synthetic=synthetic, synthetic_users=synthetic_users,
                  synthetic_features=synthetic_features, seed=seed)
*accuracies, models = utils.run_regularized(
    K_list, alpha_list, data.head, *data.features, data.N, data.N_unseen, utils.get_device(device),
    num_iterations=num_iterations, learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
    fewshot_learning_rate=fewshot_learning_rate, seed=seed, return_models=True)
out = utils.script_out_dir(__file__, out_dir)
name = "train_basis_synthetic" if synthetic else "train_basis"
paths = {}
if save_models:
    paths = utils.save_models(out / name.replace("train_basis", "models"), models, data, dataset="PRISM",
                              fewshot_iterations=fewshot_iterations, fewshot_learning_rate=fewshot_learning_rate)
baseline_results = utils.run_baselines(baselines, *data.features, utils.get_device(device), seed=seed,
                                       settings=baseline_kw)  # after LoRe's models are saved
utils.report_run(accuracies, K_list, alpha_list, config, out, name, "PRISM (synthetic)" if synthetic else "PRISM",
                 extra={"seconds": time.time() - t0, "num_iterations_used": num_iterations,
                        "kept_bases": {f"K={K} alpha={a:g}": m["V"].shape[1] for (a, K), m in models.items()},
                        "models": paths}, baselines=baseline_results)
print(f"done in {time.time() - t0:.0f}s")
