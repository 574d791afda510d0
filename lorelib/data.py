"""Preference data: the comparisons of many users packed in one `Pairs`, what a dataset loader returns
(`PreferenceData`), the PersonalLLM population without [N, P, F], and per-user accuracy.

Imports: config, kernels.
"""
import dataclasses

import numpy as np
import torch

from .config import InputError, check_value
from .kernels import matmul_f32

RESULT_NAMES = ["seen_train", "seen_test", "unseen_fewshot", "unseen_test"]  # the four pair sets, in this order


class Pairs:
    """The comparisons of C users, packed: pair j belongs to user `user[j]`.

    Either dense differences `diffs` [M, F] (d = e_chosen - e_rejected), or indices into an
    embedding table `table` [R, F] (`chosen`, `rejected` [M]) so that many users sharing the
    same responses never materialise [M, F]. `user` [M] long; pairs of a user are contiguous.
    Behaves like the published list of per-user tensors: len(pairs) = C, pairs[i] -> [m_i, F].
    """

    def __init__(self, user, num_users, diffs=None, table=None, chosen=None, rejected=None):
        self.user = torch.as_tensor(user, dtype=torch.long)
        self.num_users = int(num_users)
        self.diffs, self.table = diffs, table
        self.chosen = None if chosen is None else torch.as_tensor(chosen, dtype=torch.long)
        self.rejected = None if rejected is None else torch.as_tensor(rejected, dtype=torch.long)
        if (diffs is None) == (table is None):
            raise ValueError("Pairs needs either diffs [M, F] or table [R, F] with chosen/rejected")
        m = len(self.user)
        if diffs is not None and diffs.shape[0] != m:
            raise ValueError(f"diffs has {diffs.shape[0]} rows but user has {m}")
        if table is not None and not (len(self.chosen) == len(self.rejected) == m):
            raise ValueError("chosen, rejected and user must have the same length")
        if m and (self.user.min() < 0 or self.user.max() >= self.num_users):
            raise ValueError(f"user ids must lie in [0, {self.num_users})")

    @classmethod
    def from_list(cls, tensors):
        """From the published format: a list of C tensors [m_i, F] of differences."""
        tensors = list(tensors)
        if not tensors:
            raise InputError("no users given")
        counts = [len(t) for t in tensors]
        user = torch.repeat_interleave(torch.arange(len(tensors)), torch.tensor(counts))
        diffs = torch.cat([torch.as_tensor(t, dtype=torch.float32) for t in tensors])
        return cls(user, len(tensors), diffs=diffs)

    @classmethod
    def from_indices(cls, table, chosen_list, rejected_list):
        """From per-user index arrays into `table` [R, F]: lists of C arrays [m_i]."""
        counts = [len(c) for c in chosen_list]
        user = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        chosen = torch.cat([torch.as_tensor(np.asarray(c), dtype=torch.long) for c in chosen_list])
        rejected = torch.cat([torch.as_tensor(np.asarray(r), dtype=torch.long) for r in rejected_list])
        return cls(user, len(counts), table=table, chosen=chosen, rejected=rejected)

    @property
    def num_features(self):
        return (self.diffs if self.diffs is not None else self.table).shape[1]

    def counts(self):
        """[C] number of pairs of each user."""
        return torch.bincount(self.user, minlength=self.num_users)

    def dense(self, block_rows=2048):
        """[M, F] differences (materialised from the table if needed, in the table's dtype, a block of rows at a
        time: no [M, F] temporaries beside the result)."""
        if self.diffs is not None:
            return self.diffs
        if self.table.requires_grad:
            return self.table[self.chosen] - self.table[self.rejected]
        out = self.table.new_empty((len(self.chosen), self.table.shape[1]))
        a, b = (self.table.new_empty((min(block_rows, len(out)), self.table.shape[1])) for _ in range(2))  # reused
        for i in range(0, len(out), block_rows):
            j = min(i + block_rows, len(out))
            torch.index_select(self.table, 0, self.chosen[i:j], out=a[:j - i])
            torch.index_select(self.table, 0, self.rejected[i:j], out=b[:j - i])
            torch.sub(a[:j - i], b[:j - i], out=out[i:j])
        return out

    def sides(self):
        """(table [R, F], chosen [M], rejected [M]): both embeddings of every pair, without a copy.
        Methods that score each side on its own (VPL, PAL) need them; difference pairs cannot give them."""
        if self.table is None:
            raise InputError("this method needs the chosen and rejected embeddings separately, but these pairs hold "
                             "only differences d = e_chosen - e_rejected; build them from an embedding table with "
                             "Pairs.from_indices(table, chosen, rejected) or Pairs(user, C, table=, chosen=, "
                             "rejected=)")
        return self.table, self.chosen, self.rejected

    def project(self, V):
        """[M, K] = d^T V for every pair (float32 accumulation for bf16 pairs), without materialising [M, F] for
        table pairs."""
        if self.diffs is not None:
            return matmul_f32(self.diffs, V)
        S = matmul_f32(self.table, V)  # [R, K]
        return S[self.chosen] - S[self.rejected]

    @property
    def dtype(self):
        return (self.diffs if self.diffs is not None else self.table).dtype

    def to_dtype(self, dtype):
        """These pairs with their table (or differences) in `dtype` (the same Pairs when it is already so)."""
        if self.dtype == dtype:
            return self
        if self.diffs is not None:
            return Pairs(self.user, self.num_users, diffs=self.diffs.to(dtype))
        return Pairs(self.user, self.num_users, table=self.table.to(dtype), chosen=self.chosen,
                     rejected=self.rejected)

    def select(self, idx, user=None, num_users=None):
        """A Pairs of the pair rows `idx` [m]: of the same users, or with `user` [m] and `num_users` given, owned by
        those users instead (e.g. a user's rows repeated under a new id per trial)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        user, num_users = (self.user[idx], self.num_users) if user is None else (user, num_users)
        if self.diffs is not None:
            return Pairs(user, num_users, diffs=self.diffs[idx])
        return Pairs(user, num_users, table=self.table, chosen=self.chosen[idx], rejected=self.rejected[idx])

    def rows_by_user(self, users=None):
        """The pair rows of each of `users` [c] (default: every user, 0..C-1): a list of c index tensors."""
        order = torch.argsort(self.user, stable=True)
        counts = self.counts()
        starts = torch.cumsum(counts, 0) - counts
        users = range(self.num_users) if users is None else torch.as_tensor(users).tolist()
        return [order[starts[u]:starts[u] + counts[u]] for u in users]

    def select_users(self, users):
        """A Pairs of the users `users` [c] only, renumbered 0..c-1 in that order."""
        rows = self.rows_by_user(users)
        owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(r) for r in rows], dtype=torch.long))
        return self.select(torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long), owner, len(rows))

    def __len__(self):
        return self.num_users

    def __getitem__(self, i):
        """pairs[i] -> [m_i, F] (negative i counts from the end); pairs[a:b] -> list of tensors, as published."""
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.num_users))]
        i = int(i)
        if not -self.num_users <= i < self.num_users:
            raise IndexError(f"user {i} out of range [0, {self.num_users})")
        i %= self.num_users
        return self.select(self.rows_by_user([i])[0]).dense()

    def __iter__(self):
        return iter(self.to_list())

    def to_list(self):
        """The published format: list of C tensors [m_i, F]."""
        return [self.select(r).dense() for r in self.rows_by_user()]


def as_pairs(features):
    """Pairs from a Pairs or from a list of per-user tensors [m_i, F]."""
    return features if isinstance(features, Pairs) else Pairs.from_list(features)


def check_counts(counts):
    """Raise unless every user has a pair: counts [C] from Pairs.counts()."""
    if (counts == 0).any():
        raise InputError(f"{int((counts == 0).sum())} user(s) have no pairs")


@dataclasses.dataclass
class PreferenceData:
    """What every dataset's `load(...)` returns: the four pair sets of the protocol, the reference
    head and the rest by name.

    seen_train, seen_test: Pairs of the N seen users (users 0..N-1); unseen_fewshot, unseen_test:
    Pairs of the N_unseen unseen users (renumbered 0..N_unseen-1); head [F, 1]: the reward model's
    own head. info: user counts ("N", "N_unseen", filled in here) and dataset details (protocol,
    worker lists, few-shot dialogs, ...).
    """
    seen_train: Pairs
    seen_test: Pairs
    unseen_fewshot: Pairs
    unseen_test: Pairs
    head: torch.Tensor
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name, pairs, other in [("seen_test", self.seen_test, self.seen_train),
                                   ("unseen_test", self.unseen_test, self.unseen_fewshot)]:
            if len(pairs) != len(other):
                raise InputError(f"{name} has {len(pairs)} users, but its train / few-shot pairs have {len(other)}")
        F = self.seen_train.num_features
        if self.head.shape != (F, 1):
            raise InputError(f"head has shape {tuple(self.head.shape)}, expected ({F}, 1)")
        self.info = {"N": self.N, "N_unseen": self.N_unseen, **self.info}

    @property
    def N(self):
        """Number of seen users."""
        return len(self.seen_train)

    @property
    def N_unseen(self):
        """Number of unseen users."""
        return len(self.unseen_fewshot)

    @property
    def features(self):
        """(seen_train, seen_test, unseen_fewshot, unseen_test): the pair arguments of run / run_regularized."""
        return self.seen_train, self.seen_test, self.unseen_fewshot, self.unseen_test

    def with_dtype(self, pairs_dtype="auto"):
        """This data with its pairs' tables in `pairs_dtype`: "auto" keeps the prepared file's dtype, "float32" or
        "bfloat16" converts them (a table shared by several pair sets is converted once); info["pairs_dtype"]."""
        check_value("pairs_dtype", pairs_dtype)
        out = dataclasses.replace(self, info=dict(self.info))  # __post_init__ checks it again
        if pairs_dtype != "auto" and getattr(torch, pairs_dtype) != self.seen_train.dtype:
            print(f"pairs converted to {pairs_dtype} (the prepared files hold "
                  f"{str(self.seen_train.dtype).removeprefix('torch.')})")
            dtype, done = getattr(torch, pairs_dtype), {}
            for name in ("seen_train", "seen_test", "unseen_fewshot", "unseen_test"):
                p = getattr(out, name)
                t = p.diffs if p.diffs is not None else p.table
                done.setdefault(id(t), t.to(dtype))
                setattr(out, name, Pairs(p.user, p.num_users, diffs=done[id(t)]) if p.diffs is not None else
                        Pairs(p.user, p.num_users, table=done[id(t)], chosen=p.chosen, rejected=p.rejected))
        out.info["pairs_dtype"] = str(out.seen_train.dtype).removeprefix("torch.")
        return out



def generate_population(alpha, N):
    """N users' weights over the reward models: Dirichlet(alpha) samples, [N, len(alpha)]."""
    return np.random.dirichlet(alpha, N)


def sample_population_pairs(reward_tensor, embeddings, W, sample_percentage, rng=None):
    """Memory-lean simulate_population + create_sparse_tensor: a table Pairs.

    Each user first draws int(sample_percentage * P) prompts without replacement (all of them,
    in order, when sample_percentage == 1), then takes its highest- vs lowest-scored response
    on those prompts only. Nothing of size [N, P, F] is built.
    reward_tensor [P, R, M]; embeddings [P * R, F] prompt-major; W [N, M]. Returns Pairs
    indexing `embeddings`.
    """
    rng = np.random if rng is None else rng
    reward_tensor = np.asarray(reward_tensor, dtype=np.float64)
    P, R, _ = reward_tensor.shape
    if embeddings.shape[0] != P * R:
        raise InputError(f"embeddings has {embeddings.shape[0]} rows, expected P*R = {P}*{R} = {P * R}")
    m = int(sample_percentage * P)
    chosen, rejected = [], []
    for w in np.asarray(W, dtype=np.float64):
        prompts = np.arange(P) if m == P else rng.choice(P, m, replace=False)
        scores = reward_tensor[prompts] @ w  # [m, R]
        chosen.append(prompts * R + scores.argmax(1))
        rejected.append(prompts * R + scores.argmin(1))
    return Pairs.from_indices(embeddings, chosen, rejected)


TIE_TOLERANCE = 1e-4  # |margin| at most this (log-odds: a preference probability within 2.5e-5 of 1/2) is a near-tie


def accuracy_by_user(margins, user, num_users):
    """[C] per-user fraction of positive margins (a tie is wrong): margins [M], user [M]."""
    margins, user = margins.detach().float().cpu(), user.cpu()
    counts = torch.bincount(user, minlength=num_users).float()
    correct = torch.zeros(num_users).index_add_(0, user, (margins > 0).float())
    return (correct / counts).numpy()


def user_accuracies(pairs, V, W):
    """[C] accuracy of each user on its pairs: W [C, K] (or [K], shared) and V [F, K]."""
    pairs = as_pairs(pairs)
    XV = pairs.project(torch.as_tensor(V, dtype=torch.float32)).float()
    W = torch.as_tensor(W, dtype=torch.float32).to(XV.device)
    W = W.expand(pairs.num_users, -1) if W.dim() == 1 else W
    return accuracy_by_user((XV * W[pairs.user.to(XV.device)]).sum(1), pairs.user, pairs.num_users)

