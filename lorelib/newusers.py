"""The new-user path validated on seen users: a share of the seen users play new users. Each method is fit on the
other seen users' training pairs; a pseudo-new user gets its few-shot pairs from its own training pairs (as many as
an unseen user has) and is scored on the rest of them. The few-shot settings (Method.fewshot_grid: a new user's
learning rate and steps) are chosen there, never on the unseen users' pairs, which this module never sees.

    split = pseudo_new_split(data.seen_train, shots=9, seed=0)
    out = validate_new_users(lambda: PAL(F), PAL.fewshot_grid, split)
    out["chosen"]      # {setting: value}: best mean accuracy of the pseudo-new users on their held-out pairs

Imports: config, data, tuning.
"""
import dataclasses
import time

import numpy as np
import torch

from .config import InputError, set_seed
from .data import as_pairs
from .tuning import grid_points, widen_edges


@dataclasses.dataclass
class PseudoNewSplit:
    """fit: the training pairs of the seen users that stay seen; fewshot, test: the pseudo-new users' few-shot and
    held-out pairs (users renumbered 0..C'-1 in both); users: their ids among the seen users."""
    fit: object
    fewshot: object
    test: object
    users: list


def pseudo_new_split(train, shots, fraction=0.2, seed=0, groups=None):
    """A `fraction` of the seen users of `train` (at least one; drawn with np.random.RandomState(seed)) that have
    more than `shots` examples become pseudo-new users: `shots` random examples of their training pairs (pairs, or
    whole groups, e.g. PRISM's dialogs: groups [M]) are their few-shot pairs, the rest their test pairs."""
    train = as_pairs(train)
    rng = np.random.RandomState(seed)
    rows = train.rows_by_user()
    units = [list(r.split(1)) if groups is None else [r[g == u] for g in [torch.as_tensor(groups)[r]]
                                                      for u in torch.unique(g)] for r in rows]
    able = [u for u in range(len(rows)) if len(units[u]) > shots]
    count = min(len(able), max(1, round(fraction * len(rows))))
    if not able or count >= len(rows):
        raise InputError(f"{len(able)} of {len(rows)} seen users have more than {shots} examples: too few to play "
                         "new users and keep others seen")
    pick = sorted(rng.choice(able, count, replace=False).tolist())
    few, rest = [], []
    for u in pick:
        order = rng.permutation(len(units[u]))
        few.append(torch.cat([units[u][i] for i in order[:shots]]))
        rest.append(torch.cat([units[u][i] for i in order[shots:]]))
    stay = [u for u in range(len(rows)) if u not in set(pick)]

    def stacked(parts):
        owner = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor([len(p) for p in parts]))
        return train.select(torch.cat(parts), owner, len(parts))
    return PseudoNewSplit(stacked([rows[u] for u in stay]), stacked(few), stacked(rest), pick)


def validate_new_users(make, grid, split, *, seed=0, device=None, rules=None, widen=3, log=print):
    """Fit make() on split.fit once (from set_seed(seed)), then for every point of `grid` (few-shot settings, set on
    the fitted model; an axis chosen on its edge widened: tuning.widen_edges, rules its hard limits) personalize the
    pseudo-new users from split.fewshot and score them on split.test (mean over users of the accuracy, a tie
    wrong) -> {"grid", "users", "released": the score at make()'s own settings, "points": [{"settings",
    "validation"}], "chosen" (the best; the first on a tie; {} without a grid), "edges", "seconds"}."""
    t0 = time.time()
    set_seed(seed)
    model = make().fit(split.fit, device)

    def score():
        return float(np.nanmean(model.accuracies(split.test, model.personalize(split.fewshot, device), device)))
    released = score()
    log(f"  new-user path, released few-shot settings: pseudo-new users' held-out pairs {released:.4f}")
    defaults = {k: getattr(model, k) for k in {n for key in grid for n in key.split(",")}}

    def at(point):
        for k, v in point.items():
            setattr(model, k, v)
        value = score()
        log(f"  new-user path {point}: pseudo-new users' held-out pairs {value:.4f}")
        return value
    points, values, best, edges = [], [], None, {}
    if grid:
        first = grid_points(grid)
        points, values, best, edges = widen_edges(grid, first, [at(p) for p in first], at, rules, widen)
    for k, v in defaults.items():
        setattr(model, k, v)
    return {"grid": grid, "users": len(split.users), "released": released,
            "points": [{"settings": p, "validation": v} for p, v in zip(points, values)],
            "chosen": points[best] if points else {}, "edges": edges, "seconds": time.time() - t0}
