"""Benchmark of choosing a new user's next comparison (not a pytest test): milliseconds per choice.

One choice = the Laplace posterior of the user's K logits refit on the answers so far plus the scores of every
candidate, select_comparisons(X, 1, known=...), the step PersonalizedReward.suggest and the few-shot protocol's
active / uncertainty rules take after each answer. Candidates X [n, K] are random rows shaped like projected
comparisons (a shared direction plus spread, scale 1000), with `answered` of them answered by a random planted user.
Also times active selection of dialogs (the pool in groups of 4 rows, each scored by its joint information, as on
PRISM) and the one projection of the pool, [n, F] @ [F, K] at F = 4096, done once per user. Prints the median
(and fastest) of `repeats` calls for K in 5, 10, 50 and pools of 100, 1,000 and 10,000 candidates.

    OMP_NUM_THREADS=1 python tests/bench_select.py
    python tests/bench_select.py answered=30 repeats=50

key=value args: answered, repeats, seed.
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lorelib.selection import select_comparisons  # noqa: E402

# -----------------------------------------------------------------------------
answered = 10
repeats = 30
seed = 0
for arg in sys.argv[1:]:  # key=value overrides
    key, val = arg.split("=", 1)
    assert key in ("answered", "repeats", "seed"), f"unknown arg {key}"
    globals()[key] = int(val)
# -----------------------------------------------------------------------------


def timed(fn):
    """(median, fastest) milliseconds of `repeats` calls of fn()."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return np.median(times), np.min(times)


print(f"ms per choice, median (fastest) of {repeats} calls; {answered} comparisons answered; "
      f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
print(f"{'K':>4} {'pool':>7} {'active':>16} {'uncertainty':>16} {'active, dialogs of 4':>21} "
      f"{'projection once (F = 4096)':>28}")
for K in (5, 10, 50):
    for n in (100, 1000, 10000):
        rng = np.random.default_rng([seed, K, n])
        X = rng.normal(0, 1000, (n, 1)) + rng.normal(0, 300, (n, K))
        w = rng.dirichlet(np.ones(K))
        asked = rng.choice(n, answered, replace=False)
        known = X[asked] * np.where(X[asked] @ w > 0, 1.0, -1.0)[:, None]
        cells = [timed(lambda: select_comparisons(X, 1, rule=rule, known=known, exclude=asked))
                 for rule in ("active", "uncertainty")]
        groups = np.arange(n) // 4
        cells.append(timed(lambda: select_comparisons(X, 1, known=known, groups=groups,
                                                            exclude=np.unique(groups[asked]))))
        D, V = torch.randn(n, 4096), torch.randn(4096, K)
        cells.append(timed(lambda: D @ V))
        print(f"{K:>4} {n:>7}" + "".join(f"{f'{m:.2f} ({f:.2f})':>17}" for m, f in cells[:2])
              + f"{f'{cells[2][0]:.2f} ({cells[2][1]:.2f})':>22}" + f"{f'{cells[3][0]:.2f} ({cells[3][1]:.2f})':>29}")
