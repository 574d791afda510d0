"""What the neural methods (vpl.py, pal.py) share: weight-decay groups, Adam on rows with each row's own state
(RowAdam, as the released PAL keeps its users' weights), small MLPs, seeding, and the pair-row helpers.

Imports: config, data.
"""
import contextlib

import torch
import torch.nn as nn

from .config import InputError
from .data import check_counts


@contextlib.contextmanager
def seeded(seed):
    """Seed PyTorch's global CPU generator inside the block only (module initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def mlp(sizes, act):
    """Linear layers of `sizes` with `act` between them (none after the last)."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def decay_groups(modules, weight_decay, bias_decay=False, **group):
    """Optimiser parameter groups of the modules' parameters, `group` (e.g. lr=...) in each: weight decay on the
    weight matrices, and on the biases only with bias_decay."""
    params = [p for m in modules for p in m.parameters()]
    if bias_decay:
        return [{"params": params, "weight_decay": weight_decay, **group}]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, **group},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, **group}]


def user_rows(pairs):
    """Pair-row indices of each user: list of C tensors; every user must have a pair."""
    counts = pairs.counts()
    check_counts(counts)
    return pairs.rows_by_user()


def check_features(pairs, num_features):
    if pairs.num_features != num_features:
        raise InputError(f"pairs have {pairs.num_features} features, the model expects {num_features}")


def used_rows(pairs):
    """(rows [U], ic [M], ir [M]): the table rows that table pairs use, once each, and the position in `rows`
    of every pair's chosen and rejected row (so that per-item features are computed once per row)."""
    _, chosen, rejected = pairs.sides()
    rows, inv = torch.unique(torch.cat([chosen, rejected]), return_inverse=True)
    return rows, inv[:len(chosen)], inv[len(chosen):]


def map_rows(fn, table, rows, device, batch):
    """fn(table[rows]) in batches of rows on `device` -> [U, ...] (on `device`)."""
    return torch.cat([fn(table[rows[s:s + batch]].to(device, torch.float32)) for s in range(0, len(rows), batch)])


def fresh_logits(C, K, gen):
    """[C, K] fresh user logits ~ randn, drawn user by user (as released), so that a user's start does not depend
    on how many users are drawn with it."""
    return torch.stack([torch.randn(K, generator=gen) for _ in range(C)]) if C else torch.zeros(0, K)


class RowAdam:
    """Adam on the rows of W [C, K] with each row's own moments and step count: a row moves only in the steps
    where it has a gradient, as with one parameter per user and zero_grad(set_to_none=True) (the released PAL
    keeps its users' weights that way). One Adam over the whole [C, K] tensor would instead move every row on
    its momentum in every step, so a user's fit would depend on how many other users are fit beside it."""

    def __init__(self, W, lr, betas=(0.9, 0.999), eps=1e-8):
        self.W, self.lr, (self.beta1, self.beta2), self.eps = W, lr, betas, eps
        self.m, self.v = torch.zeros_like(W), torch.zeros_like(W)
        self.t = torch.zeros(len(W), 1, dtype=torch.float64, device=W.device)

    @torch.no_grad()
    def step(self, rows):
        """Update the rows `rows` [r] (distinct) from W.grad, then drop the gradient."""
        g = self.W.grad[rows]
        self.t[rows] += 1
        self.m[rows] = m = self.m[rows] * self.beta1 + g * (1 - self.beta1)
        self.v[rows] = v = self.v[rows] * self.beta2 + g * g * (1 - self.beta2)
        step = (self.lr / (1 - self.beta1 ** self.t[rows])).float()
        root_bc2 = (1 - self.beta2 ** self.t[rows]).sqrt().float()
        self.W[rows] -= step * m / (v.sqrt() / root_bc2 + self.eps)
        self.W.grad = None
