"""PersonalLLM: unseen-user accuracy against the number of few-shot pairs.

    python PersonalLLM/vary_fewshot.py                  # needs PersonalLLM/data from prepare.py
    python PersonalLLM/vary_fewshot.py synthetic=True   # offline, CPU, no download

The basis (rank K) is learned once on the seen users; each unseen user has a pool of
int(fewshot_pool_density * P) pairs, from which `shots` are drawn in every trial.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from PersonalLLM import personalllm  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
K = 5
alpha = 0.0
num_shots = [1, 2, 5, 9, 20, 45]
trials = 5
N = 1000
N_unseen = 500
train_density = 0.005
fewshot_pool_density = 0.005  # each unseen user's pool of pairs (47 of 9,402) to draw shots from
dirichlet_alpha = 0.1
num_iterations = 1000
learning_rate = 0.5
fewshot_iterations = 500
fewshot_learning_rate = 0.1
seed = 0
synthetic = False
synthetic_features = 128
synthetic_prompts = [9402, 1000]
data_dir = None            # default: PersonalLLM/data
out_dir = None             # default: PersonalLLM/results
device = None
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
personalllm.check_pairs_per_user(personalllm.num_train_prompts(data_dir, synthetic, synthetic_prompts),
                                 train_density=train_density, fewshot_pool_density=fewshot_pool_density)

t0 = time.time()
utils.set_seed(seed)
data = personalllm.load(data_dir=data_dir, synthetic=synthetic, synthetic_prompts=synthetic_prompts,
                        synthetic_features=synthetic_features, N=N, N_unseen=N_unseen, train_density=train_density,
                        fewshot_pool_density=fewshot_pool_density, dirichlet_alpha=dirichlet_alpha, seed=seed)
*accuracies, skipped = utils.run_few_shot_vary_shots(
    trials, [alpha], [K], num_shots, data.seen_train, data.unseen_fewshot, data.unseen_test, data.head, data.N,
    data.N_unseen, utils.get_device(device), num_iterations=num_iterations, learning_rate=learning_rate,
    fewshot_iterations=fewshot_iterations, fewshot_learning_rate=fewshot_learning_rate, seed=seed, return_skipped=True)
baseline_results = utils.run_baselines_vary_shots(
    baselines, trials, num_shots, data.seen_train, data.unseen_fewshot, data.unseen_test, utils.get_device(device),
    seed=seed, settings=baseline_kw)
name = "vary_fewshot_synthetic" if synthetic else "vary_fewshot"
utils.report_shots(accuracies, num_shots, config, utils.script_out_dir(__file__, out_dir), name,
                   "PersonalLLM (synthetic)" if synthetic else "PersonalLLM", K, alpha, skipped=skipped,
                   extra={"seconds": time.time() - t0}, baselines=baseline_results)
print(f"done in {time.time() - t0:.0f}s")
