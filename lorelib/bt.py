"""Bradley-Terry rewards besides LoRe: one reward shared by every user (fit_bt: the published
learn_single_reward and learn_single_reward_regularized) and one independent reward per user (PerUserBT: the
published learn_multiple, and the per-user baseline of the paper's tables).

Imports: config, kernels, data, method, model.
"""
import torch
from tqdm.auto import tqdm

from . import kernels
from .config import InputError, check_values, get_device
from .data import as_pairs, check_counts
from .method import Method
from .model import LOGIT_SCALE, pack


class PerUserBT(Method):
    """One independent Bradley-Terry reward per user, r_i(x) = e(x)^T v_i with v_i [F]: the published
    `learn_multiple`, and the per-user baseline of the paper's tables (a registered method: methods.py).

    Loss of user i: mean over its pairs of softplus(-d^T v_i / logit_scale); v_i starts at 0
    (the loss is convex; a random start would leave noise in the directions no pair touches);
    full-batch Adam (PyTorch's update). Users share nothing and Adam is per coordinate, so
    fitting users together equals fitting them one by one. On CPU with numba, one kernel fits
    each user's whole Adam run on its [m_i, F] pairs while they sit in cache (users in
    parallel); otherwise (GPU, or no numba) users are fit in padded chunks [c, m_max, F] of
    about `chunk_floats` values. Table pairs are gathered user by user: no [M, F] copy.
    num_features (checked against the pairs when given) and seed (nothing here is random) make the
    constructor the same as every baseline's. After `fit`, V [C, F].
    """
    label = "per-user BT"
    rules = {"num_iterations": "int >= 1", "learning_rate": "> 0", "logit_scale": "> 0", "chunk_floats": "int >= 1"}
    fewshot_grid = {"learning_rate": [0.003, 0.01, 0.03], "num_iterations": [300, 1000]}  # a new user's own fit

    def __init__(self, num_features=None, num_iterations=1000, learning_rate=0.01, logit_scale=LOGIT_SCALE,
                 chunk_floats=2**26, seed=0):
        super().__init__()
        check_values(locals(), self.rules)
        self.num_features, self.num_iterations, self.learning_rate = num_features, num_iterations, learning_rate
        self.logit_scale, self.chunk_floats = logit_scale, chunk_floats
        self.V = None

    def _fit(self, pairs, device):
        """[C, F] rewards fit on `pairs`, one per user."""
        pairs = as_pairs(pairs)
        if self.num_features is not None and pairs.num_features != self.num_features:
            raise InputError(f"pairs have {pairs.num_features} features, the model expects {self.num_features}")
        device = get_device(device)
        counts = pairs.counts()
        check_counts(counts)
        if kernels.numba is not None and device.type == "cpu":
            V = self._fit_kernel(pairs, counts)
        else:
            V = self._fit_chunks(pairs, counts, device)
        if not torch.isfinite(V).all():  # checked on the result: no [R, F] mask of a large table
            raise InputError("pairs contain NaN or inf: the fitted rewards are not finite")
        return V

    def _fit_kernel(self, pairs, counts):
        """The numba path: users in parallel, each user's pairs gathered once into a [m_i, F] buffer."""
        if pairs.table is not None:
            table, chosen, rejected, two_sided = pairs.table, pairs.chosen, pairs.rejected, True
        else:
            table, chosen, two_sided = pairs.diffs, torch.arange(len(pairs.user)), False
            rejected = chosen
        table = table.float().contiguous().numpy()
        order = torch.argsort(pairs.user, stable=True).numpy()
        starts = (torch.cumsum(counts, 0) - counts).numpy()
        counts = counts.numpy()
        V = torch.zeros(pairs.num_users, pairs.num_features)
        step = 64  # users per kernel call: a progress bar without a visible cost
        bar = tqdm(total=pairs.num_users, desc="per-user BT", leave=False, disable=None)
        for s in range(0, pairs.num_users, step):
            V[s:s + step] = torch.from_numpy(kernels.per_user_bt_kernel(
                table, chosen.numpy(), rejected.numpy(), two_sided, order, starts[s:s + step], counts[s:s + step],
                self.num_iterations, self.learning_rate, self.logit_scale))
            bar.update(len(counts[s:s + step]))
        bar.close()
        return V

    def _fit_chunks(self, pairs, counts, device):
        """The PyTorch path: chunks of users sorted by pair count, padded to [c, m_max, F]; one Adam per chunk."""
        rows = pairs.rows_by_user()
        F = pairs.num_features
        chunks, cur = [], []
        for u in torch.argsort(counts, stable=True).tolist():  # ascending: padded size (len + 1) * counts[u] * F
            if cur and (len(cur) + 1) * int(counts[u]) * F > self.chunk_floats:
                chunks.append(cur)
                cur = []
            cur.append(u)
        chunks.append(cur)
        V = torch.zeros(pairs.num_users, F)
        bar = tqdm(total=len(chunks) * self.num_iterations, desc="per-user BT", leave=False, disable=None)
        for users in chunks:
            m = int(counts[users].max())
            D = torch.zeros(len(users), m, F)
            w = torch.zeros(len(users), m)
            for i, u in enumerate(users):
                D[i, :len(rows[u])] = pairs.select(rows[u]).dense().float()
                w[i, :len(rows[u])] = 1.0 / len(rows[u])
            D, w = D.to(device), w.to(device)
            v = torch.zeros(len(users), F, device=device, requires_grad=True)
            opt = torch.optim.Adam([v], lr=self.learning_rate)
            for _ in range(self.num_iterations):
                with torch.no_grad():  # the gradient by hand: twice as fast as autograd through bmm
                    z = torch.bmm(D, v[:, :, None])[:, :, 0] / self.logit_scale  # [c, m]
                    g = -torch.sigmoid(-z) * w / self.logit_scale  # d/dz of sum_u mean_j softplus(-z_uj)
                    v.grad = torch.bmm(g[:, None, :], D)[:, 0]
                opt.step()
                bar.update(1)
            V[users] = v.detach().cpu()
        bar.close()
        return V

    def fit(self, pairs, device=None):
        """Fit every seen user's reward on its pairs -> self (V [C, F])."""
        self.V = self._fit(pairs, device)
        return self

    def personalize(self, pairs, device=None):
        """New users' rewards [C', F], each fit on its own few-shot pairs with the same settings."""
        return self._fit(pairs, device)

    @torch.no_grad()
    def margins(self, pairs, V=None, device=None, chunk=8192):
        """[M] d^T v_user for every pair; V [C, F] (default: the seen users' fit). With numba one parallel
        pass reads each pair's rows once; otherwise chunks of `chunk` pairs."""
        pairs = as_pairs(pairs)
        V = self.V if V is None else torch.as_tensor(V, dtype=torch.float32)
        if V is None:
            raise InputError("call fit(pairs) first, or pass V")
        if V.shape != (pairs.num_users, pairs.num_features):
            raise InputError(f"V has shape {tuple(V.shape)}, expected ({pairs.num_users}, {pairs.num_features})")
        if kernels.numba is not None and pairs.table is not None:
            return torch.from_numpy(kernels.per_user_margins_kernel(
                pairs.table.float().contiguous().numpy(), pairs.chosen.numpy(), pairs.rejected.numpy(),
                pairs.user.numpy(), V.contiguous().numpy()))
        out = []
        for s in range(0, len(pairs.user), chunk):
            idx = torch.arange(s, min(s + chunk, len(pairs.user)))
            out.append((pairs.select(idx).dense().float() * V[pairs.user[idx]]).sum(1))
        return torch.cat(out) if out else torch.zeros(0)

    def weights_and_bases(self, V=None):
        """The published learn_multiple layout: (W_list of C tensors [1], V_list of C tensors [F, 1])."""
        V = self.V if V is None else V
        return [torch.ones(1) for _ in range(len(V))], [v.reshape(-1, 1) for v in V]

    @torch.no_grad()
    def scores(self, table, rows, prompt, user, V=None, device=None, chunk=4096):
        """[Q, J] reward e^T v_user of every candidate: query q is user[q]'s prompt prompt[q], whose candidates are
        the rows rows[prompt[q]] of table [R, F] (rows [P, J], -1 pads: any value there); V [C, F] (default: the
        seen users' fit). Chunks of `chunk` queries."""
        V = self.V if V is None else torch.as_tensor(V, dtype=torch.float32)
        if V is None:
            raise InputError("call fit(pairs) first, or pass V")
        if V.shape[1] != table.shape[1] or (len(user) and int(user.max()) >= len(V)):
            raise InputError(f"V has shape {tuple(V.shape)}, the table {tuple(table.shape)}, the users "
                             f"{int(user.max()) + 1 if len(user) else 0}")
        device = get_device(device)
        V, out = V.to(device), []
        for s in range(0, len(prompt), chunk):
            X = table[rows[prompt[s:s + chunk]].clamp(min=0)].to(device, torch.float32)  # [q, J, F]
            out.append(torch.bmm(X, V[user[s:s + chunk].to(device)][:, :, None])[:, :, 0].cpu())
        return torch.cat(out) if out else torch.zeros(0, rows.shape[1])



def fit_bt(pairs, V_ref=None, alpha=0.0, num_iterations=1000, learning_rate=0.01, device=None):
    """One Bradley-Terry reward [F, 1] fit by Adam from 0 on all pairs pooled (mean over pairs), plus
    alpha * ||v - V_ref||^2 when V_ref is given."""
    device = get_device(device)
    diffs, user, counts = pack(pairs, device)
    check_counts(counts)
    v = torch.zeros(1, diffs.shape[1], device=device, requires_grad=True)
    ref = None if V_ref is None else torch.as_tensor(V_ref, dtype=torch.float32).reshape(1, -1).to(device)
    pw = torch.full((len(user),), 1.0 / len(user), device=device)
    opt = torch.optim.Adam([v], lr=learning_rate)
    for _ in tqdm(range(num_iterations), desc="Bradley-Terry", leave=False, disable=None):
        opt.zero_grad(set_to_none=True)
        loss = kernels.bt_loss(diffs, v.t(), torch.ones(len(user), 1, device=device), pw, LOGIT_SCALE)
        if ref is not None and alpha:
            loss = loss + alpha * ((v - ref) ** 2).sum()
        loss.backward()
        opt.step()
    return v.detach().t().cpu()

