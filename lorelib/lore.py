"""LoRe as a Method: one (alpha, K) of the paper's tables. K = 0 is the reward model's own head (`reference`, w = [1]),
K = 1 one Bradley-Terry reward shared by everyone (w = [1], no few-shot step), K >= 2 LoRe: the joint fit of
model.LoRe (regularized: model.LoRe_regularized, PRISM's variant) on the seen users, then the few-shot step
(model.PersonalizeBatch) on the frozen basis for new users.

Imports: config, kernels, data, model, method.
"""
import torch

from .config import InputError, check_values
from .data import as_pairs
from .kernels import matmul_f32
from .method import Method
from .model import LoRe, LoRe_regularized, personalize_users

CHUNK = 2**15  # queries scored at a time


@torch.no_grad()
def linear_scores(table, rows, prompt, user, V, W):
    """[Q, J] e^T V w_user of every candidate: query q is user[q]'s prompt prompt[q], whose candidates are the rows
    rows[prompt[q]] of table [R, F] (rows [P, J], -1 pads); V [F, K], W [C, K] (or [K], everyone's)."""
    V, W = torch.as_tensor(V, dtype=torch.float32), torch.as_tensor(W, dtype=torch.float32)
    used, pos = torch.unique(rows.clamp(min=0), return_inverse=True)
    S = matmul_f32(table[used], V).float()  # [U, K]
    Wq = W.expand(int(user.max()) + 1 if len(user) else 0, -1) if W.dim() == 1 else W
    return torch.cat([(S[pos[prompt[s:s + CHUNK]]] * Wq[user[s:s + CHUNK], None, :]).sum(-1)
                      for s in range(0, len(prompt), CHUNK)] or [torch.zeros(0, rows.shape[1])])


class LoReMethod(Method):
    """One (alpha, K) of LoRe: after `fit`, V [F, K'] and the seen users' simplex weights W [C, K'] (K' < K where
    LoRe_regularized dropped unused bases); a new user's state is its weights w [K'] (the few-shot step, from uniform
    weights). reference [F, 1]: the reward model's head (K = 0 scores with it; V_sft of the regulariser)."""
    label = "LoRe"
    rules = {"K": "int >= 0", "alpha": ">= 0", "regularized": "bool", "num_iterations": "int >= 1",
             "learning_rate": "> 0", "fewshot_iterations": "int >= 0", "fewshot_learning_rate": "> 0"}
    quick = {"K": 2, "num_iterations": 300}  # settings for small data (tests/test_methods.py)
    fewshot_grid = {"fewshot_learning_rate": [0.03, 0.1, 0.3], "fewshot_iterations": [100, 500]}
    independent_users = True  # PersonalizeBatch: each user's loss and Adam trajectory are its own
    inputs = ("reference",)

    def __init__(self, num_features, K=5, alpha=0.0, reference=None, regularized=False, num_iterations=1000,
                 learning_rate=0.5, fewshot_iterations=500, fewshot_learning_rate=0.1, seed=0):
        super().__init__()
        check_values(locals(), self.rules)
        if reference is None and K == 0:
            raise InputError("K = 0 scores with the reward model's head: pass reference [F, 1]")
        self.num_features, self.K, self.alpha, self.regularized = num_features, K, alpha, regularized
        self.reference = None if reference is None else torch.as_tensor(reference, dtype=torch.float32).reshape(-1, 1)
        self.num_iterations, self.learning_rate = num_iterations, learning_rate
        self.fewshot_iterations, self.fewshot_learning_rate, self.seed = fewshot_iterations, fewshot_learning_rate, seed
        self.label = "ref" if K == 0 else "BT" if K == 1 else "LoRe"
        self.V = self.W = None

    def fit(self, pairs, device=None):
        """The joint fit on the seen users (the global RNG draws the start: set_seed first, as the pipelines do)."""
        pairs = as_pairs(pairs)
        self._check_features(pairs)
        if self.K == 0:
            W, V = torch.ones(len(pairs), 1), self.reference
        else:
            cls = LoRe_regularized if self.regularized else LoRe
            model = cls(self.reference, self.alpha, len(pairs), pairs.num_features, self.K, self.num_iterations,
                        self.learning_rate)
            W, V = model.train(pairs, device=device)
        self.V, self.W = V.cpu(), W.cpu()
        return self

    def personalize(self, pairs, device=None):
        """New users' weights [C', K'] on the frozen basis; one basis (K <= 1, or one kept): w = [1]."""
        pairs = as_pairs(pairs)
        self._check_fitted()
        if self.V.shape[1] <= 1:
            return torch.ones(len(pairs), self.V.shape[1])
        return personalize_users(pairs, self.V, self.fewshot_iterations, self.fewshot_learning_rate, device).cpu()

    def _check_fitted(self):
        if self.V is None:
            raise InputError("call fit(pairs) first")

    def posterior_features(self, pairs):
        """[M, K'] d^T V of every pair (float32 accumulation)."""
        self._check_fitted()
        return as_pairs(pairs).project(self.V).float()

    @torch.no_grad()
    def margins(self, pairs, state=None, device=None):
        """[M] d^T V w_user (float32): state W [C, K'] (or [K'], everyone's), default the seen users'."""
        self._check_fitted()
        pairs = as_pairs(pairs)
        self._check_features(pairs)
        XV = pairs.project(self.V).float()
        W = torch.as_tensor(self.W if state is None else state, dtype=torch.float32).to(XV.device)
        W = W.expand(pairs.num_users, -1) if W.dim() == 1 else W
        if W.shape != (pairs.num_users, XV.shape[1]):
            raise InputError(f"got weights of shape {tuple(W.shape)} for {pairs.num_users} users and K = {XV.shape[1]}")
        return (XV * W[pairs.user.to(XV.device)]).sum(1)

    def scores(self, table, rows, prompt, user, state=None, device=None):
        """[Q, J] e^T V w_user of every candidate (the rows rows[prompt[q]] of table [R, F] for query q)."""
        self._check_fitted()
        return linear_scores(table, rows, prompt, user, self.V, self.W if state is None else state)

    def saved(self, unseen_state):
        """{"V" [F, K'], "W" [C, K'], "W_unseen" [C', K']}: what the model files hold (learned.save_models)."""
        return {"V": self.V, "W": self.W, "W_unseen": unseen_state}
