"""Benchmark of the LoRe fit at PersonalLLM scale (a script, not a test).

    python tests/bench_train.py                 # seconds per iteration, packed vs per-user loop, float32 vs bf16
    python tests/bench_train.py full=True       # + the full-scale synthetic PersonalLLM train_basis runs

Part 1 times one Adam iteration of the joint fit (1,000 users x 47 pairs, F = 4096, K = 3):
the packed formulation in utils.LoRe (with numba: one fused pass over the pairs; without: two
thin products) on float32 pairs and on the same pairs in bf16, against the per-user loop of the published
code (a Python loop over users, each x_i @ V @ w_i through autograd), and the memory-bandwidth floors (one
read of the float32 and of the bf16 pairs). Part 2 runs PersonalLLM/train_basis.py (LoRe only) on synthetic
data of the real sizes (9,402 train and 1,000 test prompts x 8 responses, F = 4096, N = 1000, N_unseen = 500,
K_list [0..5]) in a subprocess per pairs dtype (`full_dtypes`), and reports wall time, peak RSS and the
unseen-user accuracies side by side.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402
from lorelib import kernels  # noqa: E402
from lorelib.report import print_table  # noqa: E402

# config
num_users = 1000
pairs_per_user = 47
num_features = 4096
K = 3
packed_iters = 10
loop_iters = 3
full = False
full_dtypes = ["float32", "bfloat16"]  # pairs_dtype of the full-scale runs
config = utils.configure(globals())


# runs a script (argv[1:]) and prints its own peak RSS: each full-scale run is measured on its own
PEAK_RSS = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("peak RSS KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def time_iters(step, n):
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    utils.set_seed(0)
    M = num_users * pairs_per_user
    X = torch.randn(M, num_features)
    user = torch.repeat_interleave(torch.arange(num_users), pairs_per_user)
    counts = torch.bincount(user)
    Xb = X.bfloat16()
    print(f"pairs tensor [{M}, {num_features}]: float32 {X.numel() * 4 / 1e6:.0f} MB, "
          f"bf16 {Xb.numel() * 2 / 1e6:.0f} MB, K = {K}")

    model = utils.LoRe(None, 0, num_users, num_features, K, 1, 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)

    def packed_step(pairs=X):
        opt.zero_grad(set_to_none=True)
        model.loss(pairs, user, counts).backward()
        opt.step()

    per_user = list(X.split(pairs_per_user))
    V = torch.randn(num_features, K, requires_grad=True)
    Wl = torch.randn(num_users, K, requires_grad=True)
    opt_loop = torch.optim.Adam([V, Wl], lr=0.5)

    def loop_step():
        opt_loop.zero_grad(set_to_none=True)
        W = torch.softmax(Wl, 1)
        loss = 0.0
        for i, x in enumerate(per_user):
            loss = loss + F.softplus(-(x @ V @ W[i]) / 100).mean()
        loss.backward()
        opt_loop.step()

    t_packed = time_iters(packed_step, packed_iters)
    t_bf16 = time_iters(lambda: packed_step(Xb), packed_iters)
    kernel, kernels.numba = kernels.numba, None  # the pure-PyTorch path: two thin products
    t_two_pass = time_iters(packed_step, packed_iters)
    t_two_pass_bf16 = time_iters(lambda: packed_step(Xb), max(2, packed_iters // 3))
    kernels.numba = kernel
    t_loop = time_iters(loop_step, loop_iters)
    # floors: the fastest plain reduction that reads every value once (a max; the bf16 pairs as their int16 bits)
    t_read = time_iters(lambda: X.max(), 5)
    t_read_bf16 = time_iters(lambda: Xb.view(torch.int16).max(), 5)
    fused = "fused one-pass numba kernel" if kernel is not None else "numba not installed: two-pass path"
    print_table(["formulation", "s / iteration", "speedup"], [
        ["per-user loop (published)", f"{t_loop:.3f}", "1.0x"],
        [f"packed, utils.LoRe ({fused})", f"{t_packed:.3f}", f"{t_loop / t_packed:.1f}x"],
        [f"packed, bf16 pairs ({fused})", f"{t_bf16:.3f}", f"{t_loop / t_bf16:.1f}x"],
        ["packed, pure PyTorch (two passes)", f"{t_two_pass:.3f}", f"{t_loop / t_two_pass:.1f}x"],
        ["packed, pure PyTorch, bf16 pairs", f"{t_two_pass_bf16:.3f}", f"{t_loop / t_two_pass_bf16:.1f}x"],
        ["floor: 1 read of the float32 pairs", f"{t_read:.3f}", f"{t_loop / t_read:.1f}x"],
        ["floor: 1 read of the bf16 pairs", f"{t_read_bf16:.3f}", f"{t_loop / t_read_bf16:.1f}x"]])
    print(f"bf16 / float32: {t_bf16 / t_packed:.2f}x the time; bf16 / its floor: {t_bf16 / t_read_bf16:.2f}x")

    if full:
        rows, unseen = [], {}
        for dtype in full_dtypes:
            print(f"\nfull-scale synthetic PersonalLLM train_basis, {dtype} pairs (F = 4096, N = 1000, N_unseen = 500, "
                  "K 0..5, LoRe only)")
            out = ROOT / "PersonalLLM" / "results" / f"bench_{dtype}"
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(ROOT / "PersonalLLM" / "train_basis.py"),
                                   "synthetic=True", "synthetic_features=4096", "baselines=[]",
                                   "validation_fraction=0.0", f"pairs_dtype={dtype}", f"out_dir={out}"],
                                  check=True, capture_output=True, text=True)
            wall = time.perf_counter() - t
            peak = int(proc.stdout.rsplit("peak RSS KB", 1)[1]) / 1e6  # KB -> GB (Linux)
            res = json.loads((out / "train_basis_synthetic.json").read_text())["results"]
            unseen[dtype] = [r["unseen_test"]["mean"] for r in res]
            rows.append([dtype, f"{wall:.0f}", f"{peak:.2f}"] + [f"{a:.4f}" for a in unseen[dtype]])
        print_table(["pairs", "wall s", "peak RSS GB"] + [f"unseen K={r['K']}" for r in res], rows)
        if len(unseen) == 2:
            a, b = unseen.values()
            print(f"largest unseen-accuracy difference: {max(abs(x - y) for x, y in zip(a, b)):.4f}")


main()
