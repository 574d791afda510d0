"""The other methods of the paper's tables, on the same frozen embeddings as LoRe: VPL and PAL (and the
per-user Bradley-Terry rewards of utils.PerUserBT, the published `learn_multiple`).

    import baselines
    model = baselines.make_baseline("vpl", num_features=F).fit(data.seen_train)
    state = model.personalize(data.unseen_fewshot)
    model.accuracies(data.unseen_test, state)       # [C] per-user accuracy, as for LoRe

Every baseline class takes (num_features, seed=..., **settings), carries its table `label` and the range
`rules` of its settings (their defaults, the published values, live in its signature), fits on the seen
users' pairs (`fit`), personalises new users from their few-shot pairs (`personalize`: returns their state,
leaves the fitted model unchanged) and scores pairs (`margins`: reward(chosen) - reward(rejected));
`accuracies` is, per user, the fraction of pairs with a positive margin (a tie is wrong). BASELINES maps a
script's name of each to its class: adding a baseline is one class here and one entry there.
run_baselines / run_baselines_vary_shots run them beside utils.run / utils.run_few_shot_vary_shots on the
same users, pairs, few-shot examples and seed. utils.py does not import this module.
"""
import contextlib
import inspect
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F_nn
from tqdm.auto import tqdm

import utils
from utils import InputError, as_pairs, get_device

# ----------------------------------------------------------------------------------------
# Shared parts
# ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def _seeded(seed):
    """Seed PyTorch's global CPU generator inside the block only (module initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _mlp(sizes, act):
    """Linear layers of `sizes` with `act` between them (none after the last)."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _user_rows(pairs):
    """Pair-row indices of each user: list of C tensors; every user must have a pair."""
    counts = pairs.counts()
    utils.check_counts(counts)
    return pairs._rows_of(range(pairs.num_users))


def _check_features(pairs, num_features):
    if pairs.num_features != num_features:
        raise InputError(f"pairs have {pairs.num_features} features, the model expects {num_features}")


def _used_rows(pairs):
    """(rows [U], ic [M], ir [M]): the table rows that table pairs use, once each, and the position in `rows`
    of every pair's chosen and rejected row (so that per-item features are computed once per row)."""
    _, chosen, rejected = pairs.sides()
    rows, inv = torch.unique(torch.cat([chosen, rejected]), return_inverse=True)
    return rows, inv[:len(chosen)], inv[len(chosen):]


def _map_rows(fn, table, rows, device, batch):
    """fn(table[rows]) in batches of rows on `device` -> [U, ...] (on `device`)."""
    return torch.cat([fn(table[rows[s:s + batch]].to(device, torch.float32)) for s in range(0, len(rows), batch)])


def _fresh_logits(C, K, gen):
    """[C, K] fresh user logits ~ randn, drawn user by user (as released), so that a user's start does not depend
    on how many users are drawn with it."""
    return torch.stack([torch.randn(K, generator=gen) for _ in range(C)]) if C else torch.zeros(0, K)


class _RowAdam:
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


class _Baseline(nn.Module):
    """Shared evaluation: `accuracies(pairs, state)` from `margins(pairs, state)`. A subclass sets `label` (its
    name in tables) and `rules` ({setting: range rule of utils.check_value}, one per constructor argument
    besides num_features and seed)."""
    label, rules = None, {}

    def _cached(self, key, pairs, device, compute):
        """compute() once per (key, pairs object, device) until the next fit: features of the frozen shared
        parts are reused when the same pairs are scored again (vary_fewshot scores one test set per trial)."""
        cache = self.__dict__.setdefault("_cache", {})
        hit = cache.get(key)
        if hit is not None and hit[0] is pairs and hit[1] == device:
            return hit[2]
        cache[key] = (pairs, device, compute())
        return cache[key][2]

    def _margin_inputs(self, pairs, state, seen, what, device):
        """(pairs, state, device) for `margins`: state (one row per user) defaults to the seen users' `seen`."""
        pairs = as_pairs(pairs)
        _check_features(pairs, self.num_features)
        state = seen if state is None else state
        if state is None:
            raise InputError(f"call fit(pairs) first, or pass {what}")
        if len(state) != pairs.num_users:
            raise InputError(f"got {what} for {len(state)} users, but the pairs have {pairs.num_users} users")
        return pairs, state, get_device(device)

    def accuracies(self, pairs, state=None, device=None):
        """[C] accuracy of each user of `pairs`; state: new users' state from `personalize` (None: seen users)."""
        pairs = as_pairs(pairs)
        return utils.accuracy_by_user(self.margins(pairs, state, device), pairs.user, pairs.num_users)


# ----------------------------------------------------------------------------------------
# VPL (Poddar et al. 2024)
# ----------------------------------------------------------------------------------------

def _warmup_cosine(total_steps, warmup_ratio):
    """LambdaLR factor: linear warm-up over warmup_ratio * total_steps, then cosine decay to 0."""
    warmup = int(math.ceil(warmup_ratio * total_steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return factor


def _decay_groups(modules, weight_decay):
    """AdamW parameter groups: weight decay on weight matrices, none on biases."""
    params = [p for m in modules for p in m.parameters()]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _context_rows(rows, num_contexts, gen, exclude_self, random_length=False):
    """Context pairs of every pair of one user: [n, C] positions in `rows` [n], -1 padded.

    exclude_self: each of the user's pairs gets min(C, n - 1) other pairs of the user, drawn
    without replacement, or with random_length min(c, n - 1) of them, c uniform in 1..C for each pair
    (as the released VPL draws its context lengths); else every row gets the same min(C, n) pairs
    (the user's context; C = n: all of them)."""
    n = len(rows)
    if not exclude_self:
        pick = torch.randperm(n, generator=gen)[:num_contexts] if n > num_contexts else torch.arange(n)
        out = torch.full((num_contexts,), -1, dtype=torch.long)
        out[:len(pick)] = rows[pick]
        return out
    c = min(num_contexts, n - 1)
    out = torch.full((n, num_contexts), -1, dtype=torch.long)
    length = torch.randint(1, num_contexts + 1, (n, 1), generator=gen) if random_length else None
    block = max(1, 2**22 // n)  # bounded memory for users with very many pairs
    for s in range(0, n, block):
        b = min(block, n - s)
        scores = torch.rand(b, n, generator=gen)
        scores[torch.arange(b), torch.arange(s, s + b)] = 2.0  # never pick the pair itself
        out[s:s + b, :c] = rows[scores.topk(c, dim=1, largest=False).indices]
    if random_length:
        out[torch.arange(num_contexts) >= length] = -1
    return out


class VPL(_Baseline):
    """Variational preference learning (Poddar et al. 2024) on frozen embeddings e [F].

    Encoder: MLP [e_chosen; e_rejected] (2F -> H -> H -> L, LeakyReLU(0.2)) per context pair,
    one self-attention layer (q, k, v: Linear(L, L)) over a user's C contexts, masked mean,
    linear heads for mu and log sigma^2 [L], both clamped to [-1, 1]. Training latent
    z = normalize(mu + sigma * eps) * sqrt(L). Decoder: MLP [e_x; z] (F + L -> H -> H -> 1):
    the reward r(x, z). Loss: mean softplus(-(r(chosen, z) - r(rejected, z))) + beta * anneal(t)
    * KL(N(mu, sigma^2) || N(0, I)), anneal a cyclical cosine from 0.1 to 1 over kl_period
    micro-batches of micro_batch_size pairs (the released code's forward passes: its batch of 32
    is 8 accumulated passes of 4, and its annealer advances once per pass). Each target pair's
    contexts: c other pairs of its user, c uniform in 1..C per pair as released (fixed_context_length:
    always C), resampled every epoch. AdamW (no decay on biases), gradient clipping, cosine schedule
    with warm-up, batches of pairs shuffled across users. A user's latent at evaluation is encoded
    from at most C of its pairs, as released (eval_all_pairs: all of them), its training pairs for
    seen users, its few-shot pairs for new users, with no gradient step: eval_latent="normalized"
    uses normalize(mu) * sqrt(L), on the training latents' sphere; "mean" uses mu as released.
    """
    label = "VPL"
    rules = {"hidden_dim": "int >= 1", "latent_dim": "int >= 1", "num_contexts": "int >= 1", "beta": ">= 0",
             "learning_rate": "> 0", "weight_decay": ">= 0", "batch_size": "int >= 1", "num_epochs": "int >= 0",
             "warmup_ratio": ">= 0", "max_grad_norm": "> 0", "kl_period": "int >= 1", "micro_batch_size": "int >= 1",
             "fixed_context_length": "bool", "eval_all_pairs": "bool",
             "eval_latent": "one of normalized mean", "eval_batch_size": "int >= 1"}

    def __init__(self, num_features, hidden_dim=512, latent_dim=512, num_contexts=8, beta=1e-4, learning_rate=1e-4,
                 weight_decay=1e-3, batch_size=32, num_epochs=2, warmup_ratio=0.03, max_grad_norm=1.0,
                 kl_period=10000, micro_batch_size=4, fixed_context_length=False, eval_all_pairs=False,
                 eval_latent="normalized", eval_batch_size=1024, seed=0):
        super().__init__()
        utils.check_values(locals(), self.rules)
        self.num_features, self.latent_dim, self.num_contexts = num_features, latent_dim, num_contexts
        self.beta, self.learning_rate, self.weight_decay = beta, learning_rate, weight_decay
        self.batch_size, self.num_epochs, self.warmup_ratio = batch_size, num_epochs, warmup_ratio
        self.max_grad_norm, self.kl_period, self.micro_batch_size = max_grad_norm, kl_period, micro_batch_size
        self.fixed_context_length, self.eval_all_pairs = fixed_context_length, eval_all_pairs
        self.eval_latent, self.eval_batch_size, self.seed = eval_latent, eval_batch_size, seed
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        with _seeded(seed):
            self.encoder = _mlp([2 * num_features, hidden_dim, hidden_dim, latent_dim], act)
            self.query, self.key, self.value = (nn.Linear(latent_dim, latent_dim) for _ in range(3))
            self.mu_head, self.logvar_head = nn.Linear(latent_dim, latent_dim), nn.Linear(latent_dim, latent_dim)
            self.decoder = _mlp([num_features + latent_dim, hidden_dim, hidden_dim, 1], act)
        self.z_seen = None
        self.losses = []

    def encode(self, e_chosen, e_rejected, mask):
        """(mu, logvar) [B, L] from context pairs e_chosen, e_rejected [B, C, F] and mask [B, C] (True = a pair)."""
        h = self.encoder(torch.cat([e_chosen, e_rejected], -1))  # [B, C, L]
        att = self.query(h) @ self.key(h).transpose(1, 2) / math.sqrt(self.latent_dim)  # [B, C, C]
        att = att.masked_fill(~mask[:, None, :], -1e9).softmax(-1)
        h = att @ self.value(h)
        m = mask.float()[..., None]
        h = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return self.mu_head(h).clamp(-1, 1), self.logvar_head(h).clamp(-1, 1)

    def reward(self, e, z):
        """[B] reward of items e [B, F] for latents z [B, L]."""
        return self.decoder(torch.cat([e, z], -1))[:, 0]

    def anneal(self, step):
        """KL weight factor after `step` micro-batches [B] (a tensor): cyclical cosine from 0.1 to 1 over
        kl_period micro-batches."""
        frac = (step % self.kl_period) / self.kl_period
        return 0.1 + 0.9 * 0.5 * (1 - torch.cos(math.pi * frac))

    def _contexts(self, table, chosen, rejected, ctx):
        """(e_chosen, e_rejected [B, C, F], mask [B, C]) of context pair rows ctx [B, C] (-1 = none)."""
        mask = ctx >= 0
        c = ctx.clamp(min=0)
        return table[chosen[c]], table[rejected[c]], mask

    def fit(self, pairs, device=None):
        """Train on the seen users' pairs; then encode each seen user's latent from its pairs -> self."""
        self._cache = {}
        pairs = as_pairs(pairs)
        _check_features(pairs, self.num_features)
        device = get_device(device)
        table, chosen, rejected = pairs.sides()
        table, chosen, rejected = table.to(device, torch.float32), chosen.to(device), rejected.to(device)
        rows = _user_rows(pairs)
        self.to(device)
        M = len(pairs.user)
        steps_per_epoch = math.ceil(M / self.batch_size)
        total = self.num_epochs * steps_per_epoch
        opt = torch.optim.AdamW(_decay_groups([self], self.weight_decay), lr=self.learning_rate, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(total, self.warmup_ratio))
        gen = torch.Generator().manual_seed(self.seed)
        micro = 0  # micro-batches so far: the KL annealing's clock
        bar = tqdm(total=total, desc="VPL", leave=False, disable=None)
        for _ in range(self.num_epochs):
            ctx = torch.full((M, self.num_contexts), -1, dtype=torch.long)
            for r in rows:
                ctx[r] = _context_rows(r, self.num_contexts, gen, exclude_self=True,
                                       random_length=not self.fixed_context_length)
            ctx = ctx.to(device)
            perm = torch.randperm(M, generator=gen).to(device)
            for b in range(steps_per_epoch):
                idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
                mu, logvar = self.encode(*self._contexts(table, chosen, rejected, ctx[idx]))
                eps = torch.randn(mu.shape, generator=gen).to(device)
                z = F_nn.normalize(mu + torch.exp(0.5 * logvar) * eps, dim=-1) * math.sqrt(self.latent_dim)
                r = self.reward(table[torch.cat([chosen[idx], rejected[idx]])], torch.cat([z, z]))  # one pass
                margin = r[:len(idx)] - r[len(idx):]
                kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1)  # [B]
                part = torch.arange(len(idx), device=device) // self.micro_batch_size  # micro-batch of each pair
                parts = int(part[-1]) + 1
                kl = torch.zeros(parts, device=device).index_add_(0, part, kl) / torch.bincount(part, minlength=parts)
                weight = self.anneal(torch.arange(micro, micro + parts, device=device, dtype=torch.float64)).float()
                loss = F_nn.softplus(-margin).mean() + self.beta * (weight * kl).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm)
                opt.step()
                sched.step()
                micro += parts
                self.losses.append(loss.item())
                bar.update(1)
        bar.close()
        self.z_seen = self.latents(pairs, device)
        return self

    @torch.no_grad()
    def latents(self, pairs, device=None):
        """[C, L] each user's latent, encoded from at most C of its pairs (subsampled with the seed), or from all
        of them (eval_all_pairs)."""
        pairs = as_pairs(pairs)
        _check_features(pairs, self.num_features)
        device = get_device(device)
        table, chosen, rejected = pairs.sides()
        self.to(device)
        gen = torch.Generator().manual_seed(self.seed + 1)
        rows = _user_rows(pairs)
        width = max(len(r) for r in rows) if self.eval_all_pairs else self.num_contexts
        ctx = torch.stack([_context_rows(r, width, gen, exclude_self=False) for r in rows])
        out = []
        step = max(1, self.eval_batch_size // width)  # users per batch: eval_batch_size context pairs
        for s in range(0, len(ctx), step):  # gathered where the table is, then moved
            e_c, e_r, mask = self._contexts(table, chosen, rejected, ctx[s:s + step])
            mu, _ = self.encode(e_c.to(device, torch.float32), e_r.to(device, torch.float32), mask.to(device))
            out.append(F_nn.normalize(mu, dim=-1) * math.sqrt(self.latent_dim)
                       if self.eval_latent == "normalized" else mu)
        return torch.cat(out).cpu()

    def personalize(self, pairs, device=None):
        """New users' latents [C', L] from their few-shot pairs: an encoder pass, no gradient step."""
        return self.latents(pairs, device)

    @torch.no_grad()
    def margins(self, pairs, z=None, device=None):
        """[M] r(chosen, z_user) - r(rejected, z_user); z [C, L] (default: the seen users' latents).

        The decoder's first layer on [e; z] is W_e e + W_z z + b: W_e e is computed once per table row
        used and W_z z + b once per user (test pairs of many users share their rows)."""
        pairs, z, device = self._margin_inputs(pairs, z, self.z_seen, "latents z", device)
        table, _, _ = pairs.sides()
        rows, ic, ir = _used_rows(pairs)
        self.to(device)
        first, rest = self.decoder[0], self.decoder[1:]
        W_e, W_z = first.weight[:, :self.num_features], first.weight[:, self.num_features:]
        item = self._cached("items", pairs, device, lambda: _map_rows(
            lambda e: e @ W_e.t(), table, rows, device, self.eval_batch_size))  # [U, H]
        person = z.to(device) @ W_z.t() + first.bias  # [C, H]
        out = []
        for s in range(0, len(pairs.user), self.eval_batch_size):
            sl = slice(s, s + self.eval_batch_size)
            pu = person[pairs.user[sl].to(device)]
            rc = rest(item[ic[sl].to(device)] + pu)[:, 0]
            rr = rest(item[ir[sl].to(device)] + pu)[:, 0]
            out.append((rc - rr).cpu())
        return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------------
# PAL (Chen et al. 2025)
# ----------------------------------------------------------------------------------------

class PAL(_Baseline):
    """Pluralistic alignment (Chen et al. 2025) on frozen embeddings e [F]; user weights softmax(W_u) [K].

    Projectors: MLP F -> d -> d -> d (three Linear layers). variant="B" (GELU): K prompt maps
    g_k and an item map f; ideal point a_u = sum_k softmax(W_u)_k g_k(e_prompt); score
    s(x) = min(exp(tau), 100) * cos(a_u, f(e_x)), tau learnable; loss softplus(-(s_c - s_r)).
    Each embedding here covers the whole conversation and there is no prompt-only embedding:
    the prompt proxy is the mean of the pair's two rows (symmetric, so it does not leak the
    label). variant="A" (ReLU): K prototypes P [K, F] (unit-norm Gaussian rows), a_u =
    f(softmax(W_u) P); margin ||f(x_r) - a_u|| - ||f(x_c) - a_u||; hinge loss max(0, 1 - margin).
    Adam: projectors lr 1e-4 with weight decay 0.01, W (and P) lr 5e-3, tau lr 0.1; batches of
    pairs shuffled across users. New users: everything shared frozen, fresh W ~ randn, AdamW
    lr 5e-3 without decay for a fixed number of epochs (no selection on test pairs). As released,
    each user's row of W has its own Adam state and moves only in the steps where the user is in
    the batch (_RowAdam).
    """
    label = "PAL"
    rules = {"K": "int >= 1", "variant": "one of A B", "dim": "int >= 1", "learning_rate": "> 0",
             "weight_decay": ">= 0", "user_learning_rate": "> 0", "tau_learning_rate": ">= 0", "batch_size": "int >= 1",
             "num_epochs": "int >= 0", "fewshot_learning_rate": "> 0", "fewshot_epochs": "int >= 0",
             "fewshot_batch_size": "int >= 1", "tau_init": "number", "eval_batch_size": "int >= 1"}

    def __init__(self, num_features, K=2, variant="B", dim=512, learning_rate=1e-4, weight_decay=0.01,
                 user_learning_rate=5e-3, tau_learning_rate=0.1, batch_size=4, num_epochs=1,
                 fewshot_learning_rate=5e-3, fewshot_epochs=20, fewshot_batch_size=4, tau_init=math.log(1 / 0.07),
                 eval_batch_size=1024, seed=0):
        super().__init__()
        utils.check_values(locals(), self.rules)
        self.num_features, self.K, self.variant, self.dim = num_features, K, variant, dim
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.user_learning_rate, self.tau_learning_rate = user_learning_rate, tau_learning_rate
        self.batch_size, self.num_epochs = batch_size, num_epochs
        self.fewshot_learning_rate, self.fewshot_epochs = fewshot_learning_rate, fewshot_epochs
        self.fewshot_batch_size, self.eval_batch_size, self.seed = fewshot_batch_size, eval_batch_size, seed
        act = nn.GELU if variant == "B" else nn.ReLU
        with _seeded(seed):
            self.f = _mlp([num_features, dim, dim, dim], act)
            if variant == "B":
                self.g = nn.ModuleList(_mlp([num_features, dim, dim, dim], act) for _ in range(K))
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
            return scale * (F_nn.cosine_similarity(a, f_chosen, dim=-1) - F_nn.cosine_similarity(a, f_rejected, dim=-1))
        return (f_rejected - a).norm(dim=-1) - (f_chosen - a).norm(dim=-1)

    def _loss(self, margin):
        return F_nn.softplus(-margin).mean() if self.variant == "B" else F_nn.relu(1 - margin).mean()

    def _sides(self, pairs, device):
        table, chosen, rejected = pairs.sides()
        return table.to(device, torch.float32), chosen.to(device), rejected.to(device)

    def fit(self, pairs, device=None):
        """Train projectors, (prototypes, tau) and the seen users' W [C, K] on their pairs -> self."""
        self._cache = {}
        pairs = as_pairs(pairs)
        _check_features(pairs, self.num_features)
        _user_rows(pairs)  # every user has a pair
        device = get_device(device)
        table, chosen, rejected = self._sides(pairs, device)
        user = pairs.user.to(device)
        gen = torch.Generator().manual_seed(self.seed)
        self.W = nn.Parameter(_fresh_logits(pairs.num_users, self.K, gen))
        self.to(device)
        projectors = [self.f] + ([self.g] if self.variant == "B" else [])
        groups = [{"params": [p for m in projectors for p in m.parameters()], "lr": self.learning_rate,
                   "weight_decay": self.weight_decay}]
        if self.variant == "A":
            groups.append({"params": [self.P], "lr": self.user_learning_rate, "weight_decay": 0.0})
        else:
            groups.append({"params": [self.tau], "lr": self.tau_learning_rate, "weight_decay": 0.0})
        opt = torch.optim.Adam(groups, fused=True)  # one pass per tensor: 6x faster on CPU
        opt_W = _RowAdam(self.W, self.user_learning_rate)  # each user's row its own Adam, as released
        M = len(user)
        steps = math.ceil(M / self.batch_size)
        bar = tqdm(total=self.num_epochs * steps, desc=f"PAL-{self.variant}", leave=False, disable=None)
        for _ in range(self.num_epochs):
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
        bar.close()
        return self

    @torch.no_grad()
    def _features(self, pairs, device):
        """The frozen inputs of every pair's score: (f(e) of each table row used [U, d], the pairs' chosen and
        rejected positions in it [M], and for PAL-B the prompt maps g_k of each distinct unordered pair of rows
        [P, K, d] with each pair's position in it [M]; None for PAL-A)."""
        table, chosen, rejected = pairs.sides()
        rows, ic, ir = _used_rows(pairs)
        items = _map_rows(self.f, table, rows, device, self.eval_batch_size)
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
        _check_features(pairs, self.num_features)
        _user_rows(pairs)
        device = get_device(device)
        user = pairs.user.to(device)
        self.to(device)
        gen = torch.Generator().manual_seed(self.seed + 1)
        W = _fresh_logits(pairs.num_users, self.K, gen).to(device).requires_grad_()
        opt = _RowAdam(W, self.fewshot_learning_rate)  # AdamW without decay, one per user as released
        trainable = [p.requires_grad for p in self.parameters()]
        for p in self.parameters():
            p.requires_grad_(False)
        try:
            features = self._features(pairs, device)  # f, g, P and tau are frozen: their outputs are fixed
            M = len(user)
            if self.variant == "B" and utils.numba is not None and device.type == "cpu":
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


if utils.numba is not None:
    @utils.cpu_kernel(parallel=False)
    def _pal_b_new_users_kernel(items, ic, ir, G, ip, user, W, perms, batch, lr, scale):
        """PAL-B's new-user fit on CPU, step for step the PyTorch loop of PAL.personalize: for every epoch's
        permutation, batches of `batch` pairs, loss mean softplus(-scale (cos(a, f_c) - cos(a, f_r))) with
        a = sum_k softmax(W_u)_k G_k; AdamW without decay (betas 0.9, 0.999, eps 1e-8) on the rows of W [C, K]
        in the batch only, each with its own moments and step count (_RowAdam). -> W [C, K]."""
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


# ----------------------------------------------------------------------------------------
# The table of baselines, their settings, and the pipelines beside utils.run
# ----------------------------------------------------------------------------------------

BASELINES = {"per_user_bt": utils.PerUserBT, "vpl": VPL, "pal": PAL}  # a script's name -> class


def _check_names(names):
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise InputError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)} (baselines=[] skips them)")


def full_settings(name, overrides=None):
    """{setting: value} that baseline `name` runs with: the defaults of its class (the published values) with
    `overrides` ({setting: value}) applied. One setting may be a list of values, a sweep (e.g. PAL's K = [2, 5,
    10]): each value is a run of its own. InputError for an unknown name or setting, or a value out of range."""
    _check_names([name])
    cls = BASELINES[name]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(cls.rules))
    if unknown:
        raise InputError(f"baseline_settings[{name!r}]: {unknown} are no {cls.__name__} setting; it has "
                         f"{sorted(cls.rules)}")
    swept = [k for k, v in overrides.items() if isinstance(v, (list, tuple))]
    if len(swept) > 1 or any(len(overrides[k]) == 0 for k in swept):
        raise InputError(f"baseline_settings[{name!r}]: {swept} are lists; one setting at most can take a "
                         "non-empty list of values (a sweep)")
    defaults = inspect.signature(cls).parameters
    settings = {k: defaults[k].default for k in cls.rules} | overrides
    try:
        utils.check_values(settings, {k: ("each " if k in swept else "") + r for k, r in cls.rules.items()})
    except InputError as e:
        raise InputError(f"baseline_settings[{name!r}]: {e}") from None
    return settings


def _runs(names, overrides):
    """[(entry, name, settings, sweep)]: one run per baseline, or one per value of its swept setting (entry
    "pal_K5", sweep {"K": 5})."""
    out = []
    for name in names:
        settings = full_settings(name, (overrides or {}).get(name))
        swept = [k for k, v in settings.items() if isinstance(v, (list, tuple))]
        if not swept:
            out.append((name, name, settings, {}))
        for k in swept:
            out += [(f"{name}_{k}{v}", name, {**settings, k: v}, {k: v}) for v in settings[k]]
    return out


def check_baselines(config):
    """A script's check before any work (utils.configure(..., checks=[check_baselines])): its `baselines`
    names known baselines and its `baseline_settings` ({name: {setting: value}}) overrides their settings
    within their ranges."""
    _check_names(list(config.get("baselines") or []))
    overrides = config.get("baseline_settings") or {}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise InputError(f"baseline_settings={overrides!r}: must be a dict {{baseline: {{setting: value}}}}, "
                         'e.g. baseline_settings={"vpl": {"beta": 0.0}}')
    _check_names(list(overrides))
    for name, kw in overrides.items():
        full_settings(name, kw)


def make_baseline(name, num_features, seed=0, **settings):
    """A baseline by its script name ("per_user_bt", "vpl", "pal") with its settings (keyword arguments)."""
    _check_names([name])
    return BASELINES[name](num_features, seed=seed, **settings)


def _start(name, num_features, seed, settings):
    """(model, start time) of one baseline run, seeded like LoRe's fits."""
    utils.set_seed(seed)
    return make_baseline(name, num_features, seed=seed, **settings), time.time()


def _entry(name, model, settings, sweep):
    """The table label and the JSON fields naming one run."""
    label = model.label + "".join(f" ({k} = {v})" for k, v in sweep.items())
    return {"label": label, "method": model.label, "settings": settings, **({"sweep": sweep} if sweep else {})}


def run_baselines(baselines, train_features, test_features_sparse, train_features_unseen,
                  test_features_sparse_unseen, device=None, *, seed=0, settings=None, validation_fraction=0.1):
    """Fit each baseline on the seen users, personalise the unseen users from their few-shot pairs, evaluate.

    baselines: names of BASELINES ("per_user_bt", "vpl", "pal"); settings: {name: {setting: value}}, overrides
    of their published settings, one of which may be a list (a sweep: one run per value). The same four pair
    sets as utils.run, the same accuracy definition. For a sweep, the value of best mean accuracy on held-out
    pairs of the seen users' training data (validation_fraction of each user's, utils.holdout_pairs; never the
    test pairs) is marked "chosen". Returns {entry: {"label", "method", "settings" (all of them, as run),
    ["sweep", "validation", "chosen"], "seen_train", "seen_test", "unseen_fewshot", "unseen_test": {"mean",
    "std"} over users, "seconds"}}, entry the name or, in a sweep, "<name>_<setting><value>" (e.g. "pal_K5").
    """
    _check_names(baselines)
    train, test, train_u, test_u = (as_pairs(x) for x in (train_features, test_features_sparse,
                                                          train_features_unseen, test_features_sparse_unseen))
    utils.check_users([("test_features_sparse", test, len(train)),
                       ("test_features_sparse_unseen", test_u, len(train_u))])
    runs = _runs(baselines, settings)
    out = {}
    for entry, name, full, sweep in runs:
        model, t0 = _start(name, train.num_features, seed, full)
        model.fit(train, device)
        state = model.personalize(train_u, device)
        accs = [model.accuracies(train, None, device), model.accuracies(test, None, device),
                model.accuracies(train_u, state, device), model.accuracies(test_u, state, device)]
        out[entry] = {**_entry(name, model, full, sweep), **{
            n: {"mean": float(np.mean(a)), "std": float(np.std(a))} for n, a in zip(utils.RESULT_NAMES, accs)}}
        out[entry]["seconds"] = time.time() - t0
        utils.note_finished(out[entry]["label"])
        print(f"{out[entry]['label']}: " + ", ".join(f"{n} {out[entry][n]['mean']:.4f}" for n in utils.RESULT_NAMES)
              + f"  [{out[entry]['seconds']:.1f}s]")
    swept = [name for name in baselines if sum(r[1] == name for r in runs) > 1]
    if swept and validation_fraction > 0:
        fit, held = utils.holdout_pairs(train, validation_fraction, seed)
        for name in swept:
            for entry, _, full, sweep in (r for r in runs if r[1] == name):
                model, _ = _start(name, train.num_features, seed, full)
                out[entry]["validation"] = float(np.nanmean(model.fit(fit, device).accuracies(held, None, device)))
                print(f"model choice: {out[entry]['label']}: held-out seen-user training pairs "
                      f"{out[entry]['validation']:.4f}")
            group = [e for e, n, _, _ in runs if n == name]
            best = max(group, key=lambda e: out[e]["validation"])
            for e in group:
                out[e]["chosen"] = e == best
    return out


def run_baselines_vary_shots(baselines, trials, num_shots, train_features, train_features_unseen,
                             test_features_sparse_unseen, device=None, *, shot_groups=None, seed=0, settings=None):
    """run_few_shot_vary_shots for the baselines: each is fit once on the seen users, then every unseen user
    is personalised from the same `shots` examples per trial as LoRe gets (same draws, same skipped users).

    Returns {entry: {"label", "method", "settings" (all of them, as run), ["sweep"], "accuracies": 4 arrays
    [len(num_shots)], "seconds"}} (entries as in run_baselines): few-shot train accuracy mean and std over
    trials, unseen-user test accuracy mean and std over trials (each trial's value is the mean over users); NaN
    where no user has enough examples.
    """
    _check_names(baselines)
    train, pool, test_u = (as_pairs(x) for x in (train_features, train_features_unseen, test_features_sparse_unseen))
    utils.check_users([("test_features_sparse_unseen", test_u, len(pool))])
    units = utils.shot_units(pool, shot_groups)
    n_units = torch.tensor([len(u) for u in units])
    out = {}
    for entry, name, full, sweep in _runs(baselines, settings):
        model, t0 = _start(name, train.num_features, seed, full)
        label = _entry(name, model, full, sweep)["label"]
        model.fit(train, device)
        res = np.full((4, len(num_shots)), np.nan)
        for j, shots in enumerate(num_shots):
            users = torch.nonzero(n_units >= shots).flatten().tolist()
            if not users:
                continue
            stacked = utils.stack_trials(pool, units, users, shots, trials, seed)  # the draws LoRe gets
            test = test_u.select_users(users)
            fs, ts = [], []
            for t in range(trials):
                shot_pairs = stacked.select_users(range(t * len(users), (t + 1) * len(users)))
                state = model.personalize(shot_pairs, device)
                fs.append(model.accuracies(shot_pairs, state, device).mean())
                ts.append(model.accuracies(test, state, device).mean())
            res[:, j] = np.mean(fs), np.std(fs), np.mean(ts), np.std(ts)
            print(f"{label} shots={shots}: few-shot train {res[0, j]:.4f}, unseen test {res[2, j]:.4f} "
                  f"+- {res[3, j]:.4f} ({len(users)} users, {trials} trials)")
        out[entry] = {**_entry(name, model, full, sweep), "accuracies": tuple(res), "seconds": time.time() - t0}
        utils.note_finished(f"{label} (every shot count)")
        print(f"{label}: {out[entry]['seconds']:.1f}s")
    return out
