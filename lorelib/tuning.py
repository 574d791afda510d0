"""A method's "tuned" row: its settings chosen on a grid, scored on held-out pairs of the seen users' training data,
never on test pairs (the rule that chooses LoRe's K, evaluate.choose).

    grid = {"num_epochs": [1, 2], "user_learning_rate": [5e-3, 0.5], "K": [2, 5]}
    out = tune(lambda s: PAL(F, **s), grid, seen_train, validation_fraction=0.1, seed=0, rules=PAL.rules)
    out["chosen"]       # {setting: value} of best mean held-out accuracy over users (the first on a tie)
    out["edges"]        # per axis: the values tried, the chosen one, whether it sits on an edge, and why

The settings are swept jointly (every point of the product). A key naming two settings ("a,b") gives both the
same value. A model whose fit takes on_epoch (PAL: no schedule, so its model after epoch e is the model
num_epochs=e fits) is fit once per point of the other settings for the largest num_epochs and scored after each
epoch of the grid; one with a schedule (VPL, MRM) is fit once per point.

An axis whose chosen value is its smallest or largest is widened from the chosen point, one step beyond (the
grid's own ratio for positive numbers spanning a factor, its own difference for integers), until the choice is
interior, the step breaks the setting's range rule (a hard limit, e.g. K < 1), or `widen` steps were taken.

Imports: config, data, evaluate.
"""
import inspect
import itertools
import time

import numpy as np

from .config import InputError, check_value
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


def step_beyond(values, up):
    """The next value past the largest (up) or smallest of an axis's numeric values, or None (not numeric, one
    value): positive values spanning a factor > 1.5 step by their last ratio (integers rounded, at least 1 away),
    others by their last difference."""
    if len(values) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    v = sorted(values)
    a, b = (v[-2], v[-1]) if up else (v[1], v[0])
    if v[0] > 0 and max(a, b) / min(a, b) > 1.5:
        new = b * (b / a)
    else:
        new = b + (b - a)
    if all(isinstance(x, int) for x in v):
        new = int(round(new))
        new = new if new != b else b + (1 if up else -1)
    return new


class _Scores:
    """Held-out scores of settings points, each fit once: an epoch-scored model (its fit takes on_epoch) is fit for
    the most epochs asked of its other settings and scored after each."""

    def __init__(self, make, fit, held, by_epoch, device, log):
        self.make, self.fit, self.held, self.by_epoch, self.device, self.log = make, fit, held, by_epoch, device, log
        self.scored = {}  # (settings less epochs, epochs) -> (held-out accuracy, seconds)

    def key(self, point):
        base = {k: v for k, v in point.items() if not (self.by_epoch and k == "num_epochs")}
        return repr(sorted(base.items())), point["num_epochs"] if self.by_epoch else None

    def score(self, points):
        """Fit and score every point not scored yet (points sharing their other settings: one fit)."""
        todo = {}
        for p in points:
            key, epoch = self.key(p)
            if (key, epoch) not in self.scored:
                todo.setdefault(key, (p, set()))[1].add(epoch)
        for key, (point, epochs) in todo.items():
            settings = {**point, "num_epochs": max(epochs)} if self.by_epoch else point
            model, t0 = self.make(settings), time.time()

            def done(epoch, key=key, point=point, t0=t0, model=model):
                acc = float(np.nanmean(model.accuracies(self.held, None, self.device)))
                self.scored[key, epoch] = (acc, time.time() - t0)
                shown = point if epoch is None else {**point, "num_epochs": epoch}
                self.log(f"  tuning {shown}: held-out seen-user training pairs {acc:.4f}  [{time.time() - t0:.1f}s]")
            if self.by_epoch:
                model.fit(self.fit, self.device, on_epoch=lambda e: done(e) if e in epochs else None)
                missed = sorted(e for e in epochs if (key, e) not in self.scored)
                if missed:  # on_epoch is called after epochs 1, 2, ...: a grid's epoch count below 1 is never scored
                    raise RuntimeError(f"the fit of {point} was never scored after epoch {missed[0]}")
            else:
                model.fit(self.fit, self.device)
                done(None)

    def __getitem__(self, point):
        return self.scored[self.key(point)]


def widen_edges(grid, points, values, score, rules=None, widen=3):
    """Widen every axis of `grid` whose chosen value is its smallest or largest tried (module docstring): points
    [{setting: value}] with their scored values [n]; score(point) -> the held-out value of a new point; rules: the
    range rules (hard limits). -> (points, values, index of the best, edges {axis: {"values", "chosen", "edge",
    "limit"}})."""
    order, values = list(points), list(values)
    best = max(range(len(order)), key=lambda i: (values[i], -i))
    tried = {key: list(v) for key, v in grid.items()}
    limits = {key: None for key in grid}
    for _ in range(widen):
        moved = False
        for key in grid:
            chosen = order[best][key.split(",")[0]]
            if step_beyond(tried[key], True) is None or min(tried[key]) < chosen < max(tried[key]):
                continue
            new = step_beyond(tried[key], chosen == max(tried[key]))
            names = key.split(",")
            try:
                for name in names:
                    check_value(name, new, (rules or {}).get(name, "number"))
            except InputError:
                limits[key] = f"{new:g} is out of range ({', '.join((rules or {}).get(n, '') for n in names)})"
                continue
            tried[key].append(new)
            order.append({**order[best], **{name: new for name in names}})
            values.append(score(order[-1]))
            if values[-1] > values[best]:
                best, moved = len(order) - 1, True
        if not moved:
            break
    edges = {}
    for key, vals in tried.items():
        chosen = order[best][key.split(",")[0]]
        numeric = step_beyond(vals, True) is not None
        edge = numeric and chosen in (min(vals), max(vals))
        edges[key] = {"values": sorted(vals) if numeric else vals, "chosen": chosen, "edge": bool(edge),
                      "limit": (limits[key] or f"widened {widen} times") if edge else None}
    return order, values, best, edges


def tune(make, grid, pairs, *, validation_fraction=0.1, seed=0, device=None, log=print, rules=None, groups=None,
         widen=3):
    """Fit make(settings) for every point of `grid` on the seen users' training `pairs` less a held-out
    validation_fraction of each user's pairs (evaluate.holdout_pairs; groups [M]: whole groups such as dialogs are
    held out), score each on the held-out pairs (mean over users of the accuracy, a tie wrong), choose the best (the
    first on a tie), then widen every axis whose choice is on its edge (widen_edges; rules: the settings' range
    rules, the hard limits).

    Returns {"grid", "validation_fraction", "points": [{"settings", "validation", "seconds"}], "chosen", "edges":
    {axis: {"values", "chosen", "edge", "limit"}}, "seconds"}; seconds of an epoch-scored point: the fit's time up to
    that epoch. Only `pairs` is read: no test pair can enter."""
    if not 0 < validation_fraction < 1:
        raise InputError(f"tuning needs held-out training pairs: validation_fraction={validation_fraction} must be "
                         "in (0, 1)")
    t0 = time.time()
    fit, held = holdout_pairs(as_pairs(pairs), validation_fraction, seed, groups)
    points = grid_points(grid)
    by_epoch = "num_epochs" in grid and "on_epoch" in inspect.signature(make(points[0]).fit).parameters
    scores = _Scores(make, fit, held, by_epoch, device, log)
    scores.score(points)

    def score(point):
        scores.score([point])
        return scores[point][0]
    order, values, best, edges = widen_edges(grid, points, [scores[p][0] for p in points], score, rules, widen)
    out = [{"settings": p, "validation": scores[p][0], "seconds": scores[p][1]} for p in order]
    log(f"  tuning chose {order[best]} (held-out {values[best]:.4f}); on an edge: "
        + (", ".join(f"{k} ({e['limit']})" for k, e in edges.items() if e["edge"]) or "none"))
    return {"grid": grid, "validation_fraction": validation_fraction, "points": out, "chosen": order[best],
            "edges": edges, "seconds": time.time() - t0}
