"""A baseline's "tuned" row: its training budget chosen on a grid, scored on held-out pairs of the seen users'
training data, never on test pairs (the rule that chooses LoRe's K, evaluate.choose).

    grid = {"num_epochs": [1, 2], "user_learning_rate,fewshot_learning_rate": [5e-3, 0.5], "K": [2, 5]}
    out = tune(lambda s: PAL(F, **s), grid, seen_train, validation_fraction=0.1, seed=0)
    out["chosen"]       # {setting: value} of best mean held-out accuracy over users (the first on a tie)

The settings are swept jointly (every point of the product). A key naming two settings ("a,b") gives both the
same value (PAL's seen- and new-user weight learning rates are one setting as released, both 5e-3). A model whose
fit takes on_epoch (PAL: no schedule, so its model after epoch e is the model num_epochs=e fits) is fit once per
point of the other settings for the largest num_epochs and scored after each epoch of the grid.

Imports: config, data, evaluate.
"""
import inspect
import itertools
import time

import numpy as np

from .config import InputError
from .data import as_pairs
from .evaluate import holdout_pairs


def grid_points(grid):
    """[{setting: value}]: every point of the product of grid {key: [values]} (the first key varies slowest); a key
    "a,b" sets a and b to its value."""
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, (list, tuple)) and v for v in grid.values()):
        raise InputError(f"a tuning grid is a dict {{setting: [values]}} with non-empty lists; got {grid!r}")
    keys = list(grid)
    return [{name: value for key, value in zip(keys, values) for name in key.split(",")}
            for values in itertools.product(*(grid[k] for k in keys))]


def tune(make, grid, pairs, *, validation_fraction=0.1, seed=0, device=None, log=print):
    """Fit make(settings) for every point of `grid` on the seen users' training `pairs` less a held-out
    validation_fraction of each user's pairs (pipelines.holdout_pairs), score each on the held-out pairs (mean
    over users of the accuracy, a tie wrong), choose the best (the first on a tie).

    Returns {"grid", "validation_fraction", "points": [{"settings", "validation", "seconds"}], "chosen"}; seconds
    of an epoch-scored point: the fit's time up to that epoch. Only `pairs` is read: no test pair can enter."""
    if not 0 < validation_fraction < 1:
        raise InputError(f"tuning needs held-out training pairs: validation_fraction={validation_fraction} must be "
                         "in (0, 1)")
    fit, held = holdout_pairs(as_pairs(pairs), validation_fraction, seed)
    points = grid_points(grid)
    by_epoch = "num_epochs" in grid and "on_epoch" in inspect.signature(make(points[0]).fit).parameters
    epochs = sorted(set(grid["num_epochs"])) if by_epoch else [None]

    def split(point):
        """(the point less its epoch count where epochs are scored within one fit, that count or None)."""
        if not by_epoch:
            return point, None
        return {k: v for k, v in point.items() if k != "num_epochs"}, point["num_epochs"]

    scored = {}  # (base settings, epoch) -> (held-out accuracy, seconds)
    fitted = set()
    for point in points:
        base, _ = split(point)
        key = repr(sorted(base.items()))
        if key in fitted:
            continue
        fitted.add(key)
        model, t0 = make({**base, "num_epochs": epochs[-1]} if by_epoch else point), time.time()

        def score(epoch):
            acc = float(np.nanmean(model.accuracies(held, None, device)))
            scored[key, epoch] = (acc, time.time() - t0)
            log(f"  tuning {point if epoch is None else {**base, 'num_epochs': epoch}}: held-out seen-user training "
                f"pairs {acc:.4f}  [{scored[key, epoch][1]:.1f}s]")

        if by_epoch:
            model.fit(fit, device, on_epoch=lambda e: score(e) if e in epochs else None)
        else:
            model.fit(fit, device)
            score(None)
    out = []
    for point in points:
        base, epoch = split(point)
        acc, seconds = scored[repr(sorted(base.items())), epoch]
        out.append({"settings": point, "validation": acc, "seconds": seconds})
    best = max(range(len(out)), key=lambda i: (out[i]["validation"], -i))
    log(f"  tuning chose {out[best]['settings']} (held-out {out[best]['validation']:.4f})")
    return {"grid": grid, "validation_fraction": validation_fraction, "points": out, "chosen": out[best]["settings"]}
