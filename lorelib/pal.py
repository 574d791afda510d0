"""PAL, pluralistic alignment with a mixture of prototypes (Chen et al., ICLR 2025), on the frozen embeddings:
PAL-B (the released Reddit TLDR configuration: K prompt maps mixed by the user's softmax weights, a cosine score)
and PAL-A (K prototypes, a distance margin).

Imports: config, data, kernels, method, baseline.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as nnf
from tqdm.auto import tqdm

from . import kernels
from .baseline import (
    RowAdam,
    check_features,
    decay_groups,
    fresh_logits,
    map_rows,
    mlp,
    seeded,
    used_rows,
    user_rows,
)
from .config import check_values, get_device
from .data import as_pairs
from .method import Method


class PAL(Method):
    """Pluralistic alignment (Chen et al. 2025) on frozen embeddings e [F]; user weights softmax(W_u) [K].

    Projectors: MLP F -> d -> d -> d (three Linear layers). variant="B" (GELU): K prompt maps
    g_k and an item map f; ideal point a_u = sum_k softmax(W_u)_k g_k(e_prompt); score
    s(x) = min(exp(tau), 100) * cos(a_u, f(e_x)), tau learnable; loss softplus(-(s_c - s_r)).
    Each embedding here covers the whole conversation and there is no prompt-only embedding:
    the prompt proxy is the mean of the pair's two rows (symmetric, so it does not leak the
    label). variant="A" (ReLU): K prototypes P [K, F] (unit-norm Gaussian rows), a_u =
    f(softmax(W_u) P); margin ||f(x_r) - a_u|| - ||f(x_c) - a_u||; hinge loss max(0, 1 - margin).
    Adam: projectors lr 1e-4 with weight decay 0.01 on every projector parameter, biases included, as
    released (bias_decay=False: weights only), W (and P) lr 5e-3, tau lr 0.1; batches of
    pairs shuffled across users. New users: everything shared frozen, fresh W ~ randn, AdamW
    lr 5e-3 without decay for a fixed number of epochs (no selection on test pairs). As released,
    each user's row of W has its own Adam state and moves only in the steps where the user is in
    the batch (RowAdam).
    """
    label = "PAL"
    released = {"TLDR": {}}  # the defaults: the released Reddit TLDR configuration (vanilla-e1.yaml, new users e20)
    departures = ["frozen embeddings of the whole conversation; no prompt-only embedding: the prompt proxy is the mean "
                  "of the pair's two rows", "one score per conversation (released: token-level from the divergence)",
                  "new users: a fixed fewshot_epochs (released: the epoch of best loss on the new users' test pairs, "
                  "a leak)", "new users start from random weights, as released (LoRe's start uniform, as its few-shot "
                  "step does)", "PAL-A: a plain MLP projector (released: residual, which needs input size = width)"]
    quick = {"dim": 64, "learning_rate": 1e-3, "num_epochs": 5, "batch_size": 16, "user_learning_rate": 0.05,
             "fewshot_learning_rate": 0.05}  # small data (tests)
    # the tuned row's grid (swept jointly; "a,b": both settings take the value: one learning rate as released)
    tune_grid = {"num_epochs": [1, 2], "user_learning_rate": [5e-3, 5e-2, 0.5], "K": [2, 5], "dim": [128, 512],
                 "learning_rate": [1e-4, 1e-3]}
    fewshot_grid = {"fewshot_learning_rate": [5e-3, 5e-2, 0.5], "fewshot_epochs": [5, 20]}  # new users
    # chosen by tune_grid and fewshot_grid with tune=True (seed 0; held-out seen-user training pairs, pseudo-new
    # seen users); every point and edge: RedditTLDR/figures/tuning_synthetic.json
    tuned = {"RedditTLDR synthetic lowrank F=64 protocol=published max_train_pairs=150":
            {"num_epochs": 4, "user_learning_rate": 0.05, "K": 5, "dim": 128, "learning_rate": 1e-3,
             "fewshot_learning_rate": 0.05, "fewshot_epochs": 20}}
    rules = {"K": "int >= 1", "variant": "one of A B", "dim": "int >= 1", "learning_rate": "> 0",
             "weight_decay": ">= 0", "bias_decay": "bool", "user_learning_rate": "> 0", "tau_learning_rate": ">= 0",
             "batch_size": "int >= 1",
             "num_epochs": "int >= 1", "fewshot_learning_rate": "> 0", "fewshot_epochs": "int >= 0",
             "fewshot_batch_size": "int >= 1", "tau_init": "number", "eval_batch_size": "int >= 1"}

    def __init__(self, num_features, K=2, variant="B", dim=512, learning_rate=1e-4, weight_decay=0.01, bias_decay=True,
                 user_learning_rate=5e-3, tau_learning_rate=0.1, batch_size=4, num_epochs=1,
                 fewshot_learning_rate=5e-3, fewshot_epochs=20, fewshot_batch_size=4, tau_init=math.log(1 / 0.07),
                 eval_batch_size=1024, seed=0):
        super().__init__()
        check_values(locals(), self.rules)
        self.num_features, self.K, self.variant, self.dim = num_features, K, variant, dim
        self.learning_rate, self.weight_decay, self.bias_decay = learning_rate, weight_decay, bias_decay
        self.user_learning_rate, self.tau_learning_rate = user_learning_rate, tau_learning_rate
        self.batch_size, self.num_epochs = batch_size, num_epochs
        self.fewshot_learning_rate, self.fewshot_epochs = fewshot_learning_rate, fewshot_epochs
        self.fewshot_batch_size, self.eval_batch_size, self.seed = fewshot_batch_size, eval_batch_size, seed
        self.tau_init = tau_init
        act = nn.GELU if variant == "B" else nn.ReLU
        with seeded(seed):
            self.f = mlp([num_features, dim, dim, dim], act)
            if variant == "B":
                self.g = nn.ModuleList(mlp([num_features, dim, dim, dim], act) for _ in range(K))
                self.tau = nn.Parameter(torch.tensor(float(tau_init)))
            else:
                P = torch.randn(K, num_features)
                self.P = nn.Parameter(P / P.norm(dim=1, keepdim=True))
        self.W = None  # [C, K] logits of the seen users, set by fit
        self.losses = []

    def _ideal(self, W_rows, e_chosen, e_rejected):
        """[B, d] ideal points for user logits W_rows [B, K] and the pairs' embeddings [B, F]."""
        w = torch.softmax(W_rows, -1)
        if self.variant == "B":
            prompt = 0.5 * (e_chosen + e_rejected)
            G = torch.stack([g(prompt) for g in self.g], 1)  # [B, K, d]
            return (w[:, :, None] * G).sum(1)
        return self.f(w @ self.P)

    def _margin(self, a, f_chosen, f_rejected):
        """[B] margin from ideal points a and item features f(e) [B, d]."""
        if self.variant == "B":
            scale = self.tau.exp().clamp(max=100.0)
            return scale * (nnf.cosine_similarity(a, f_chosen, dim=-1) - nnf.cosine_similarity(a, f_rejected, dim=-1))
        return (f_rejected - a).norm(dim=-1) - (f_chosen - a).norm(dim=-1)

    def _loss(self, margin):
        return nnf.softplus(-margin).mean() if self.variant == "B" else nnf.relu(1 - margin).mean()

    def _sides(self, pairs, device):
        table, chosen, rejected = pairs.sides()
        return table.to(device, torch.float32), chosen.to(device), rejected.to(device)

    def fit(self, pairs, device=None, on_epoch=None):
        """Train projectors, (prototypes, tau) and the seen users' W [C, K] on their pairs -> self.
        on_epoch(epoch): called after each epoch (1, 2, ...) with the model as it then is; without a schedule, the
        model after epoch e of a fit is the model that num_epochs=e fits (a budget grid scores each epoch of one fit).
        self.user_steps [C]: the optimiser steps in which each user's weights moved."""
        self._cache = {}
        pairs = as_pairs(pairs)
        check_features(pairs, self.num_features)
        user_rows(pairs)  # every user has a pair
        device = get_device(device)
        table, chosen, rejected = self._sides(pairs, device)
        user = pairs.user.to(device)
        gen = torch.Generator().manual_seed(self.seed)
        self.W = nn.Parameter(fresh_logits(pairs.num_users, self.K, gen))
        self.user_steps = torch.zeros(pairs.num_users, dtype=torch.long)
        self.to(device)
        projectors = [self.f] + ([self.g] if self.variant == "B" else [])
        groups = decay_groups(projectors, self.weight_decay, self.bias_decay, lr=self.learning_rate)
        if self.variant == "A":
            groups.append({"params": [self.P], "lr": self.user_learning_rate, "weight_decay": 0.0})
        else:
            groups.append({"params": [self.tau], "lr": self.tau_learning_rate, "weight_decay": 0.0})
        opt = torch.optim.Adam(groups, fused=True)  # one pass per tensor: 6x faster on CPU
        opt_W = RowAdam(self.W, self.user_learning_rate)  # each user's row its own Adam, as released
        M = len(user)
        steps = math.ceil(M / self.batch_size)
        bar = tqdm(total=self.num_epochs * steps, desc=f"PAL-{self.variant}", leave=False, disable=None)
        for epoch in range(self.num_epochs):
            perm = torch.randperm(M, generator=gen).to(device)
            for b in range(steps):
                idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
                ec, er = table[chosen[idx]], table[rejected[idx]]
                items = self.f(torch.cat([ec, er]))  # both sides in one pass: each weight is read once
                margin = self._margin(self._ideal(self.W[user[idx]], ec, er), items[:len(idx)], items[len(idx):])
                loss = self._loss(margin)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                opt_W.step(torch.unique(user[idx]))
                self.losses.append(loss.item())
                bar.update(1)
            self.user_steps = opt_W.t[:, 0].long().cpu()
            if on_epoch is not None:
                self._cache = {}  # the shared parts moved: features computed before are stale
                on_epoch(epoch + 1)
        bar.close()
        self._cache = {}
        return self

    @torch.no_grad()
    def _features(self, pairs, device):
        """The frozen inputs of every pair's score: (f(e) of each table row used [U, d], the pairs' chosen and
        rejected positions in it [M], and for PAL-B the prompt maps g_k of each distinct unordered pair of rows
        [P, K, d] with each pair's position in it [M]; None for PAL-A)."""
        table, chosen, rejected = pairs.sides()
        rows, ic, ir = used_rows(pairs)
        items = map_rows(self.f, table, rows, device, self.eval_batch_size)
        if self.variant == "A":
            return items, ic.to(device), ir.to(device), None, None
        R = len(table)  # the prompt proxy (e_c + e_r) / 2 is symmetric: one per unordered pair of rows
        keys, ip = torch.unique(torch.minimum(chosen, rejected) * R + torch.maximum(chosen, rejected),
                                return_inverse=True)
        G = torch.cat([torch.stack([g(0.5 * (table[k // R].to(device, torch.float32)
                                             + table[k % R].to(device, torch.float32))) for g in self.g], 1)
                       for k in keys.split(self.eval_batch_size)])  # [P, K, d]
        return items, ic.to(device), ir.to(device), G, ip.to(device)

    def _scores(self, W_rows, idx, features):
        """[B] margins of the pairs `idx` [B] for their users' logits W_rows [B, K], from _features."""
        items, ic, ir, G, ip = features
        w = torch.softmax(W_rows, -1)
        a = (w[:, :, None] * G[ip[idx]]).sum(1) if self.variant == "B" else self.f(w @ self.P)
        return self._margin(a, items[ic[idx]], items[ir[idx]])

    def personalize(self, pairs, device=None):
        """New users' logits W [C', K] fit on their few-shot pairs; every shared part stays frozen."""
        pairs = as_pairs(pairs)
        check_features(pairs, self.num_features)
        user_rows(pairs)
        device = get_device(device)
        user = pairs.user.to(device)
        self.to(device)
        gen = torch.Generator().manual_seed(self.seed + 1)
        W = fresh_logits(pairs.num_users, self.K, gen).to(device).requires_grad_()
        opt = RowAdam(W, self.fewshot_learning_rate)  # AdamW without decay, one per user as released
        trainable = [p.requires_grad for p in self.parameters()]
        for p in self.parameters():
            p.requires_grad_(False)
        try:
            features = self._features(pairs, device)  # f, g, P and tau are frozen: their outputs are fixed
            M = len(user)
            if self.variant == "B" and kernels.numba is not None and device.type == "cpu":
                perms = torch.stack([torch.randperm(M, generator=gen) for _ in range(self.fewshot_epochs)]) \
                    if self.fewshot_epochs else torch.zeros(0, M, dtype=torch.long)
                items, ic, ir, G, ip = (t.contiguous().numpy() for t in features)
                scale = float(self.tau.exp().clamp(max=100.0))
                return torch.from_numpy(_pal_b_new_users_kernel(
                    items, ic, ir, G, ip, user.numpy(), W.detach().numpy().copy(), perms.numpy(),
                    self.fewshot_batch_size, self.fewshot_learning_rate, scale))
            steps = math.ceil(M / self.fewshot_batch_size)
            bar = tqdm(total=self.fewshot_epochs * steps, desc=f"PAL-{self.variant} new users", leave=False,
                       disable=None)
            for _ in range(self.fewshot_epochs):
                perm = torch.randperm(M, generator=gen).to(device)
                for b in range(steps):
                    idx = perm[b * self.fewshot_batch_size:(b + 1) * self.fewshot_batch_size]
                    loss = self._loss(self._scores(W[user[idx]], idx, features))
                    loss.backward()
                    opt.step(torch.unique(user[idx]))
                    bar.update(1)
            bar.close()
        finally:
            for p, r in zip(self.parameters(), trainable):
                p.requires_grad_(r)
        return W.detach().cpu()

    @torch.no_grad()
    def margins(self, pairs, W=None, device=None):
        """[M] margin of every pair under its user's weights; W [C, K] logits (default: the seen users')."""
        pairs, W, device = self._margin_inputs(pairs, W, self.W, "user weights W", device)
        self.to(device)
        W, user = W.detach().to(device), pairs.user.to(device)
        features = self._cached("features", pairs, device, lambda: self._features(pairs, device))
        out = []
        for idx in torch.arange(len(user), device=device).split(self.eval_batch_size):
            out.append(self._scores(W[user[idx]], idx, features).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def user_weights(self, W=None):
        """[C, K] users' weights on the simplex (default: the seen users')."""
        return torch.softmax((self.W if W is None else W).detach().cpu(), -1)

    @torch.no_grad()
    def scores(self, table, rows, prompt, user, W=None, device=None):
        """[Q, J] score of every candidate: query q is user[q]'s prompt prompt[q], whose candidates are the rows
        rows[prompt[q]] of table [R, F] (rows [P, J], -1 pads: any value there); W [C, K] logits (default: the seen
        users'). PAL-B: scale * cos(a_user, f(e)), its prompt proxy the mean of all the prompt's candidate rows
        (symmetric and label-free, as the pair's mean of its two rows is: a prompt of two candidates gives the
        pair's margin); PAL-A: -||f(e) - a_user||."""
        W, device, used, pos = self._score_inputs(table, rows, user, W, self.W, "user weights W", device)
        self.to(device)
        w = torch.softmax(W.detach().to(device), -1)
        items = map_rows(self.f, table, used, device, self.eval_batch_size)  # [U, d]
        if self.variant == "B":
            step = max(1, self.eval_batch_size // rows.shape[1])
            G = []  # [P, K, d] the prompt maps of each prompt's proxy
            for r in rows.split(step):
                valid = (r >= 0).to(device, torch.float32)[:, :, None]
                proxy = (table[r.clamp(min=0)].to(device, torch.float32) * valid).sum(1) / valid.sum(1)
                G.append(torch.stack([g(proxy) for g in self.g], 1))
            G, scale = torch.cat(G), self.tau.exp().clamp(max=100.0)
        else:
            A = self.f(w @ self.P)  # [C, d] ideal points
        pos, step, out = pos.to(device), max(1, 2 * self.eval_batch_size // rows.shape[1]), []
        for s in range(0, len(prompt), step):
            p, u = prompt[s:s + step].to(device), user[s:s + step].to(device)
            f = items[pos[p]]  # [q, J, d]
            if self.variant == "B":
                a = (w[u][:, :, None] * G[p]).sum(1)
                out.append((scale * nnf.cosine_similarity(a[:, None, :], f, dim=-1)).cpu())
            else:
                out.append(-(f - A[u][:, None, :]).norm(dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, rows.shape[1])


if kernels.numba is not None:
    @kernels.cpu_kernel(parallel=False)
    def _pal_b_new_users_kernel(items, ic, ir, G, ip, user, W, perms, batch, lr, scale):
        """PAL-B's new-user fit on CPU, step for step the PyTorch loop of PAL.personalize: for every epoch's
        permutation, batches of `batch` pairs, loss mean softplus(-scale (cos(a, f_c) - cos(a, f_r))) with
        a = sum_k softmax(W_u)_k G_k; AdamW without decay (betas 0.9, 0.999, eps 1e-8) on the rows of W [C, K]
        in the batch only, each with its own moments and step count (RowAdam). -> W [C, K]."""
        C, K = W.shape
        d = items.shape[1]
        m1 = np.zeros((C, K), np.float32)
        m2 = np.zeros((C, K), np.float32)
        grad = np.zeros((C, K), np.float32)
        steps = np.zeros(C, np.int64)  # each row's own Adam step count
        last = np.full(C, -1, np.int64)  # the last step in which a row had a gradient
        a = np.empty(d, np.float32)
        w = np.empty(K, np.float32)
        gw = np.empty(K, np.float32)
        n = 0
        for e in range(perms.shape[0]):
            for s in range(0, perms.shape[1], batch):
                idx = perms[e, s:s + batch]
                b = len(idx)
                for j in idx:
                    grad[user[j]] = 0.0
                for j in idx:
                    u, gk, c, r = user[j], ip[j], ic[j], ir[j]
                    last[u] = n
                    mx = W[u].max()
                    for k in range(K):
                        w[k] = np.exp(W[u, k] - mx)
                    w /= w.sum()
                    a[:] = 0.0
                    for k in range(K):
                        a += w[k] * G[gk, k]
                    na = np.sqrt((a * a).sum())
                    nc = np.sqrt((items[c] * items[c]).sum())
                    nr = np.sqrt((items[r] * items[r]).sum())
                    cc = (a * items[c]).sum() / (na * nc)
                    cr = (a * items[r]).sum() / (na * nr)
                    margin = scale * (cc - cr)
                    dm = -1.0 / (1.0 + np.exp(margin)) / b  # d mean softplus(-margin) / d margin
                    # d cos(a, x) / da = x / (|a| |x|) - cos a / |a|^2
                    ga = dm * scale * (items[c] / (na * nc) - items[r] / (na * nr) - (cc - cr) * a / (na * na))
                    for k in range(K):
                        gw[k] = (ga * G[gk, k]).sum()
                    dot = (w * gw).sum()
                    for k in range(K):
                        grad[u, k] += w[k] * (gw[k] - dot)  # softmax backward
                for j in idx:
                    i = user[j]
                    if last[i] != n:  # this row was updated already (a user with several pairs in the batch)
                        continue
                    last[i] = -1
                    steps[i] += 1
                    step = lr / (1.0 - 0.9 ** steps[i])
                    root_bc2 = np.sqrt(1.0 - 0.999 ** steps[i])
                    for k in range(K):
                        m1[i, k] = 0.9 * m1[i, k] + 0.1 * grad[i, k]
                        m2[i, k] = 0.999 * m2[i, k] + 0.001 * grad[i, k] * grad[i, k]
                        W[i, k] -= step * m1[i, k] / (np.sqrt(m2[i, k]) / root_bc2 + 1e-8)
                n += 1
        return W

