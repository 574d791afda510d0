"""Reddit TLDR: unseen-worker accuracy against the number of few-shot pairs.

    python RedditTLDR/vary_fewshot.py                  # needs RedditTLDR/data from prepare.py
    python RedditTLDR/vary_fewshot.py synthetic=True   # offline, CPU, no download

The basis (rank K) is learned once on the seen workers (split as in train_basis.py). In each of
`trials` draws, every unseen worker gets `shots` random pairs from its pool (at most max_fewshot_pairs = 100
of its train-split comparisons, as published; None: all of them) and is tested on its validation comparisons.
Workers with fewer pairs than a shot count are skipped for that count; the table reports how many.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from RedditTLDR import tldr  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
K = 5
alpha = 0.0
num_shots = [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
trials = 20
protocol = "published"     # "published" or "paper" (see train_basis.py)
max_train_pairs = 150      # per seen worker
max_fewshot_pairs = 100    # pool of an unseen worker's shots, as published (None: all its train-split comparisons)
min_comparisons = 50       # paper protocol
split_seed = 0
num_iterations = 500       # joint fit, as published for vary_fewshot
learning_rate = 0.5
fewshot_iterations = 500
fewshot_learning_rate = 0.1
seed = 0
synthetic = False
synthetic_features = 64
data_dir = None            # default: RedditTLDR/data
out_dir = None             # default: RedditTLDR/results
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
pal_num_epochs = 1         # the released Reddit TLDR config's
pal_fewshot_learning_rate = 5e-3  # new users: only their weights are fit
pal_fewshot_epochs = 20
pal_fewshot_batch_size = 4
# -----------------------------------------------------------------------------
config = utils.configure(globals())
utils.check_settings(config, __file__, writable={"out_dir": "results"})
baseline_kw = utils.baseline_settings(config)  # checked before any training

t0 = time.time()
utils.set_seed(seed)
data = tldr.load(data_dir=data_dir, synthetic=synthetic, synthetic_features=synthetic_features, protocol=protocol,
                 max_train_pairs=max_train_pairs, max_fewshot_pairs=max_fewshot_pairs, min_comparisons=min_comparisons,
                 split_seed=split_seed, seed=seed)
*accuracies, skipped = utils.run_few_shot_vary_shots(
    trials, [alpha], [K], num_shots, data.seen_train, data.unseen_fewshot, data.unseen_test, data.head, data.N,
    data.N_unseen, utils.get_device(device), num_iterations=num_iterations, learning_rate=learning_rate,
    fewshot_iterations=fewshot_iterations, fewshot_learning_rate=fewshot_learning_rate, seed=seed, return_skipped=True)
baseline_results = utils.run_baselines_vary_shots(
    baselines, trials, num_shots, data.seen_train, data.unseen_fewshot, data.unseen_test, utils.get_device(device),
    seed=seed, settings=baseline_kw)
name = "vary_fewshot" + ("_paper" if protocol == "paper" else "") + ("_synthetic" if synthetic else "")
title = "Reddit TLDR" + (" paper split" if protocol == "paper" else "") + (" (synthetic)" if synthetic else "")
utils.report_shots(accuracies, num_shots, config, utils.script_out_dir(__file__, out_dir), name, title, K, alpha,
                   skipped=skipped, extra={"workers": data.info["workers"], "seconds": time.time() - t0},
                   baselines=baseline_results)
print(f"done in {time.time() - t0:.0f}s")
