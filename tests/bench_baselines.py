"""Benchmark of the baselines at full PersonalLLM scale (a script, not a test).

    python tests/bench_baselines.py                   # every baseline on CPU, each in its own process
    python tests/bench_baselines.py device=cuda       # the same on a GPU
    python tests/bench_baselines.py methods=[vpl]     # some of them

Synthetic PersonalLLM data of the real sizes (9,402 + 1,000 prompts x 8 responses, F = 4096;
N = 1000 seen users x 47 pairs, N_unseen = 500 unseen users x 9 few-shot pairs, every user
tested on all 1,000 test prompts). Each method runs at its published settings in a fresh
subprocess: fit on the seen users, personalise the unseen users, evaluate the four pair sets.
Reported: wall time of the method (data loading excluded), peak RSS of the process (and peak
GPU memory), beside a process that only loads the data.
"""
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import utils  # noqa: E402
from lorelib import experiment  # noqa: E402
from lorelib.data import RESULT_NAMES  # noqa: E402
from lorelib.kernels import numba  # noqa: E402
from lorelib.methods import METHODS  # noqa: E402
from lorelib.report import print_table  # noqa: E402
from PersonalLLM import personalllm  # noqa: E402

# config
methods = ["per_user_bt", "vpl", "pal"]
num_features = 4096
N = 1000
N_unseen = 500
device = "cpu"
seed = 0
child = ""                 # internal: the method this process runs ("none": load the data only)
config = utils.configure(globals())


def run_child(method):
    """Load the data, run one method, print one JSON line with its figures."""
    utils.set_seed(seed)
    data = personalllm.load(synthetic=True, synthetic_features=num_features, N=N, N_unseen=N_unseen, seed=seed)
    out = {"method": method}
    if method != "none":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        res = experiment.run_methods([method], data.features, device, seed=seed)[method]
        out["seconds"] = time.perf_counter() - t
        out.update({k: res[k]["mean"] for k in RESULT_NAMES})
        if torch.cuda.is_available() and utils.get_device(device).type == "cuda":
            out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB -> GB (Linux)
    print("RESULT " + json.dumps(out), flush=True)


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, numba "
          f"{'yes' if numba is not None else 'no'}; F = {num_features}, N = {N}, N_unseen = {N_unseen}")
    rows = []
    for method in ["none"] + list(methods):
        proc = subprocess.run([sys.executable, __file__, f"child={method}", f"methods={methods!r}",
                               f"num_features={num_features}", f"N={N}", f"N_unseen={N_unseen}",
                               f"device={device}", f"seed={seed}"], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        r = json.loads(lines[-1][len("RESULT "):])
        print(r, flush=True)
        name = "data only" if method == "none" else METHODS[method].label
        rows.append([name, f"{r['seconds']:.0f}" if "seconds" in r else "", f"{r['peak_rss_gb']:.2f}",
                     f"{r['peak_gpu_gb']:.2f}" if "peak_gpu_gb" in r else ""] +
                    [f"{r[k]:.4f}" if k in r else "" for k in RESULT_NAMES])
    print_table(["method", "seconds", "peak RSS GB", "peak GPU GB"] + RESULT_NAMES, rows)


if child:
    run_child(child)
else:
    main()
