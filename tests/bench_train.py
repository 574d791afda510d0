"""Benchmark of the LoRe fit at PersonalLLM scale (a script, not a test).

    python tests/bench_train.py                 # seconds per iteration, packed vs per-user loop
    python tests/bench_train.py full=True       # + the full-scale synthetic PersonalLLM train_basis run

Part 1 times one Adam iteration of the joint fit (1,000 users x 47 pairs, F = 4096, K = 3):
the packed formulation in utils.LoRe (with numba: one fused pass over the pairs; without: two
thin products) against the per-user loop of the published code (a Python loop over users,
each x_i @ V @ w_i through autograd), and the memory-bandwidth floor (reading the pairs). Part 2 runs
PersonalLLM/train_basis.py on synthetic data of the real sizes (9,402 train and 1,000 test
prompts x 8 responses, F = 4096, N = 1000, N_unseen = 500, K_list [0..5]) in a subprocess
and reports its wall time and peak RSS.
"""
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402

# config
num_users = 1000
pairs_per_user = 47
num_features = 4096
K = 3
packed_iters = 10
loop_iters = 3
full = False
config = utils.configure(globals())


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
    print(f"pairs tensor [{M}, {num_features}] float32 = {X.numel() * 4 / 1e6:.0f} MB, K = {K}")

    model = utils.LoRe(None, 0, num_users, num_features, K, 1, 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)

    def packed_step():
        opt.zero_grad(set_to_none=True)
        model.loss(X, user, counts).backward()
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

    def read_pass():
        X.sum(0)

    t_packed = time_iters(packed_step, packed_iters)
    kernel, utils.numba = utils.numba, None  # the pure-PyTorch path: two thin products
    t_two_pass = time_iters(packed_step, packed_iters)
    utils.numba = kernel
    t_loop = time_iters(loop_step, loop_iters)
    t_read = time_iters(read_pass, 5)
    fused = "fused one-pass numba kernel" if kernel is not None else "numba not installed: two-pass path"
    utils.print_table(["formulation", "s / iteration", "speedup"], [
        ["per-user loop (published)", f"{t_loop:.3f}", "1.0x"],
        [f"packed, utils.LoRe ({fused})", f"{t_packed:.3f}", f"{t_loop / t_packed:.1f}x"],
        ["packed, pure PyTorch (two passes)", f"{t_two_pass:.3f}", f"{t_loop / t_two_pass:.1f}x"],
        ["floor: 1 read of X", f"{t_read:.3f}", f"{t_loop / t_read:.1f}x"],
        ["floor: 2 reads of X", f"{2 * t_read:.3f}", f"{t_loop / (2 * t_read):.1f}x"]])

    if full:
        print("\nfull-scale synthetic PersonalLLM train_basis run (F = 4096, N = 1000, N_unseen = 500, K 0..5)")
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "PersonalLLM" / "train_basis.py"), "synthetic=True",
                        "synthetic_features=4096", "out_dir=" + str(ROOT / "PersonalLLM" / "results" / "bench")],
                       check=True)
        wall = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KB -> GB (Linux)
        print(f"\nfull-scale synthetic train_basis: {wall:.0f} s wall, peak RSS {peak:.2f} GB")


main()
