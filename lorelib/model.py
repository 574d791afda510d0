"""The method (Bose et al. 2025, arXiv 2504.14439). A user's reward is r_i(x, y) = e(x, y)^T V w_i: e [F] a frozen
reward-model embedding, V [F, K] K shared basis rewards, w_i [K] on the simplex (softmax of free logits). A
comparison is d = e(x, chosen) - e(x, rejected), with the Bradley-Terry likelihood sigmoid(d^T V w_i / 100).

  LoRe              joint fit of V and the seen users' W (the published `run`)
  LoRe_regularized  the same with a cosine pull towards a reference head (the published `run_regularized`, PRISM)
  PersonalizeBatch  a new user's w on the frozen V from a few comparisons (few-shot)

Imports: config, kernels, data.
"""
import torch
import torch.nn as nn
import torch.nn.functional as nnf
from tqdm.auto import tqdm

from .config import RULES, InputError, all_finite, check_value, check_values, get_device
from .data import as_pairs, check_counts
from .kernels import ThinMatmul, bt_loss

LOGIT_SCALE = 100.0  # P(chosen > rejected) = sigmoid(d^T V w / LOGIT_SCALE), as in the published code


def pack(X, device):
    """(diffs [M, F], user [M], counts [C]) on `device` from a list of tensors or a Pairs. Half-precision pairs
    (bf16) stay so: d = e_c - e_r is computed in float32 from the table rows and rounded once; every product with
    them accumulates in float32 (matmul_f32, the bf16 kernel)."""
    pairs = as_pairs(X)
    dtype = pairs.dtype if pairs.dtype in (torch.bfloat16, torch.float16) else torch.float32
    return pairs.dense().to(device, dtype), pairs.user.to(device), pairs.counts().to(device)


def user_logits(XV, W, user):
    """[M] logits d^T V w_user / 100 from XV [M, K] and simplex weights W [C, K]."""
    return (XV * W[user]).sum(1) / LOGIT_SCALE


def _train_mode_call(X):
    """Keep nn.Module.train(mode) working: .train(), .train(True/False) -> PyTorch semantics."""
    return X is None or isinstance(X, bool)


class LoRe(nn.Module):
    """Joint fit of the basis V [F, K] and user weights W [C, K] (published `run` variant).

    Loss: sum over users of that user's mean -log sigmoid(d^T V w_i / 100), plus
    alpha * sum_j ||V_j - V_sft||^2. Init V ~ randn(F, K), W logits ~ randn(C, K); one Adam
    over both. `.train(X)` fits and returns (W [C, K] on the simplex, V [F, K]).
    """

    def __init__(self, V_sft, alpha, num_classes, num_features, num_basis_vectors,
                 num_iterations=1000, learning_rate=0.5):
        super().__init__()
        check_values(dict(alpha=alpha, num_classes=num_classes, num_features=num_features,
                          num_basis_vectors=num_basis_vectors, num_iterations=num_iterations,
                          learning_rate=learning_rate))
        self.V_sft = None if V_sft is None else torch.as_tensor(V_sft, dtype=torch.float32).reshape(num_features, -1)
        self.alpha, self.num_classes = float(alpha), num_classes
        self.num_features, self.K = num_features, num_basis_vectors
        self.num_iterations, self.learning_rate = num_iterations, learning_rate
        self.V = nn.Parameter(torch.randn(num_features, num_basis_vectors))
        self.W = nn.Parameter(self._init_logits(num_classes, num_basis_vectors))
        self.losses = []

    @staticmethod
    def _init_logits(C, K):
        return torch.randn(C, K)

    def weights(self):
        """[C, K] user weights on the simplex."""
        return torch.softmax(self.W, dim=1)

    def forward(self, X, user=None):
        """Packed: forward(diffs [M, F], user [M]) -> [M] logits d^T V w_user / 100.
        Published: forward(X), X a list of C per-user tensors [m_i, F] (or Pairs) -> (nll, reg), the two loss
        terms: the sum over users of their mean -log sigmoid, and alpha * sum_j ||V_j - V_sft||^2."""
        if user is not None:
            return user_logits(ThinMatmul.apply(X, self.V), self.weights(), user)
        diffs, user, counts = pack(X, self.V.device)
        return (nnf.softplus(-self.forward(diffs, user)) / counts[user]).sum(), self.penalty()

    def penalty(self):
        """alpha * sum_j ||V_j - V_sft||^2 (each column against V_sft [F, 1]); 0 without alpha or V_sft."""
        if not self.alpha or self.V_sft is None:
            return torch.zeros((), device=self.V.device)
        return self.alpha * ((self.V - self.V_sft.to(self.V.device)) ** 2).sum()

    def loss(self, diffs, user, counts):
        """Scalar training loss (packed, no loop over users)."""
        return bt_loss(diffs, self.V, self.weights()[user], 1.0 / counts[user], LOGIT_SCALE) + self.penalty()

    def train(self, X=None, device=None):
        """Fit on X (list of C tensors [m_i, F] or Pairs) -> (W [C, K], V [F, K]).
        With no data (or a bool) this is nn.Module.train(mode)."""
        if _train_mode_call(X):
            return super().train(True if X is None else X)
        device = get_device(device)
        diffs, user, counts = pack(X, device)
        self._check(diffs, counts)
        self.to(device)
        opt = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        bar = tqdm(range(self.num_iterations), desc=f"LoRe K={self.K}", leave=False, disable=None)
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            loss = self.loss(diffs, user, counts)
            loss.backward()
            opt.step()
            self.losses.append(loss.item())
        return self.weights().detach(), self.V.detach()

    def _check(self, diffs, counts):
        if diffs.shape[1] != self.num_features:
            raise InputError(f"pairs have {diffs.shape[1]} features, the model expects {self.num_features}")
        if len(counts) != self.num_classes:
            raise InputError(f"got {len(counts)} users, the model was built for num_classes={self.num_classes}")
        check_counts(counts)
        if not all_finite(diffs):
            raise InputError("pairs contain NaN or inf")


class LoRe_regularized(LoRe):
    """Joint fit with a cosine pull towards the reference head (published `run_regularized`).

    Loss: mean -log sigmoid over all pairs pooled. Init V ~ randn, W logits ~ U[0, 1).
    Each iteration: an Adam step on W with V frozen (no regulariser), then an Adam step on V
    with alpha_t * mean_j (1 - cos(V_j, V_sft)); alpha_t is 0 for the first 20% of steps,
    ramps linearly to alpha by 80%, then stays. Afterwards basis j is kept only if some user
    puts weight >= 1e-2 on it; `.train(X)` returns (W [C, K'] renormalised, V [F, K']).
    """
    keep_threshold = 1e-2

    @staticmethod
    def _init_logits(C, K):
        return torch.rand(C, K)

    def alpha_at(self, t):
        """Regulariser weight at iteration t."""
        frac = t / max(self.num_iterations, 1)
        return self.alpha * min(max((frac - 0.2) / 0.6, 0.0), 1.0)

    def regulariser(self):
        """mean_j (1 - cos(V_j, V_sft))."""
        v = self.V_sft.to(self.V.device).expand_as(self.V)
        return (1 - nnf.cosine_similarity(self.V, v, dim=0)).mean()

    def forward(self, X, alpha_curr=None):
        """Packed: forward(diffs [M, F], user [M] long) -> [M] logits.
        Published: forward(X, alpha_curr), X a list of per-user tensors [m_i, F] (or Pairs) -> (nll, reg): the mean
        -log sigmoid over all pairs pooled, and alpha_curr * mean_j (1 - cos(V_j, V_sft)) (alpha_curr None: alpha)."""
        if isinstance(alpha_curr, torch.Tensor) and alpha_curr.dim() == 1 and not alpha_curr.is_floating_point():
            return super().forward(X, alpha_curr)
        diffs, user, _ = pack(X, self.V.device)
        nll = nnf.softplus(-super().forward(diffs, user)).mean()
        alpha_curr = self.alpha if alpha_curr is None else alpha_curr
        reg = alpha_curr * self.regulariser() if self.V_sft is not None else torch.zeros((), device=self.V.device)
        return nll, reg

    def train(self, X=None, device=None):
        if _train_mode_call(X):
            return nn.Module.train(self, True if X is None else X)
        device = get_device(device)
        diffs, user, counts = pack(X, device)
        self._check(diffs, counts)
        self.to(device)
        opt_W = torch.optim.Adam([self.W], lr=self.learning_rate)
        opt_V = torch.optim.Adam([self.V], lr=self.learning_rate)
        use_reg = self.alpha > 0 and self.V_sft is not None
        pooled = torch.full((len(user),), 1.0 / len(user), device=device)  # mean over all pairs
        bar = tqdm(range(self.num_iterations), desc=f"LoRe_regularized K={self.K}", leave=False, disable=None)
        for t in bar:
            with torch.no_grad():
                XV = ThinMatmul.apply(diffs, self.V)  # [M, K]
            opt_W.zero_grad(set_to_none=True)
            nnf.softplus(-user_logits(XV, self.weights(), user)).mean().backward()
            opt_W.step()
            opt_V.zero_grad(set_to_none=True)
            loss = bt_loss(diffs, self.V, self.weights().detach()[user], pooled, LOGIT_SCALE)
            if use_reg:
                loss = loss + self.alpha_at(t) * self.regulariser()
            loss.backward()
            opt_V.step()
            self.losses.append(loss.item())
        W = self.weights().detach()
        keep = W.max(0).values >= self.keep_threshold
        self.kept = keep.cpu()
        W = W[:, keep]
        return W / W.sum(1, keepdim=True), self.V.detach()[:, keep]


class PersonalizeBatch(nn.Module):
    """Few-shot weights of C new users on a frozen basis V [F, K].

    Logits start at 0 (uniform w); loss is the sum over users of their mean -log sigmoid,
    so every user's weights follow their own Adam trajectory. `.train(X, V)` returns a list
    of C simplex weight vectors [K].
    """

    def __init__(self, num_classes, num_features, num_basis_vectors, num_iterations=500, learning_rate=0.1):
        super().__init__()
        check_values(dict(num_classes=num_classes, num_features=num_features, num_basis_vectors=num_basis_vectors))
        check_value("num_iterations", num_iterations, RULES["fewshot_iterations"])  # 0: uniform weights
        check_value("learning_rate", learning_rate, RULES["fewshot_learning_rate"])
        self.num_classes, self.num_features, self.K = num_classes, num_features, num_basis_vectors
        self.num_iterations, self.learning_rate = num_iterations, learning_rate
        self.W = nn.Parameter(torch.zeros(num_classes, num_basis_vectors))
        self.losses = []

    def weights(self):
        """[C, K] weights on the simplex."""
        return torch.softmax(self.W, dim=1)

    def project(self, X, V):
        """(Pairs of X, XV [M, K] = d^T V): V is frozen, so project once."""
        pairs = as_pairs(X)
        if len(pairs) != self.num_classes:
            raise InputError(f"got {len(pairs)} users, expected num_classes={self.num_classes}")
        V = torch.as_tensor(V, dtype=torch.float32)
        if V.shape != (self.num_features, self.K):
            raise InputError(f"V has shape {tuple(V.shape)}, expected ({self.num_features}, {self.K})")
        return pairs, pairs.project(V).float()

    def forward(self, X, V):
        """Loss at the current weights: the sum over users of their mean -log sigmoid(d^T V w_i / 100).
        X: list of C per-user tensors [m_i, F] (or Pairs); V [F, K] frozen."""
        pairs, XV = self.project(X, V)
        XV, user, counts = XV.to(self.W.device), pairs.user.to(self.W.device), pairs.counts().to(self.W.device)
        return (nnf.softplus(-user_logits(XV, self.weights(), user)) / counts[user]).sum()

    def train(self, X=None, V=None, device=None):
        if _train_mode_call(X):
            return super().train(True if X is None else X)
        if V is None:
            raise InputError("PersonalizeBatch.train(X, V) needs the basis V [F, K]")
        pairs, XV = self.project(X, V)
        counts = pairs.counts()
        check_counts(counts)
        return self.fit_projected(XV, pairs.user, 1.0 / counts[pairs.user].float(), device)

    def fit_projected(self, XV, user, pw, device=None):
        """Minimise sum_m pw_m softplus(-XV_m w_user_m / 100) over the weights -> list of C simplex vectors [K]."""
        device = get_device(device)
        XV, user, pw = XV.to(device), user.to(device), pw.to(device, torch.float32)
        self.to(device)
        opt = torch.optim.Adam([self.W], lr=self.learning_rate)
        for _ in range(self.num_iterations):
            opt.zero_grad(set_to_none=True)
            loss = (nnf.softplus(-user_logits(XV, self.weights(), user)) * pw).sum()
            loss.backward()
            opt.step()
            self.losses.append(loss.item())
        return list(self.weights().detach())


def personalize_users(pairs, V, num_iterations=500, learning_rate=0.1, device=None):
    """[C, K] few-shot simplex weights of the users of `pairs` on a frozen basis V [F, K] (PersonalizeBatch)."""
    pairs = as_pairs(pairs)
    V = torch.as_tensor(V)
    model = PersonalizeBatch(len(pairs), V.shape[0], V.shape[1], num_iterations, learning_rate)
    return torch.stack(model.train(pairs, V, device=device))

