"""MRM, meta reward modeling ("One Adapts to Any: Meta Reward Modeling for Personalized LLM Alignment", arXiv
2601.18731, SIGIR 2026), on the frozen embeddings, written from the equations of its MIT-licensed release
(github.com/ModalityDance/MRM: train.py's MRM, maml_train, RPO and evaluate_maml; utils.py's bt_loss and MetaDataset;
inference.py; scripts/*.sh).

Model (train.py's MRM with the scripts' hidden_layers 2, no --use_bias): K basis rewards of the embedding scaled
first, r_k(e) = (0.01 e)^T A_k (A [F, K], one Linear layer without bias), mixed by a user's weights softmax(s) [K]:
r(e) = 0.01 e^T A softmax(s). Loss: Bradley-Terry, mean over pairs of -log sigmoid(r(chosen) - r(rejected)).

Meta-training (maml_train): every seen user is a task. Each epoch the tasks come in a random order, and each user's
training pairs are split afresh (MetaDataset): a share val_ratio of them (at least one) is the query set, the rest
the support set (a user with one pair: both are that pair). For each task the logits start at the shared start s0
(the only per-user parameter); train_inner_steps steps of Adam (a fresh state per task, higher's differentiable Adam)
on the support loss give s'; the task's loss is the query loss at s'. The meta-gradient is second order: it flows
through the inner Adam steps (the support gradient, its moments and sqrt) into A and s0. Every tasks_per_batch tasks
(and the epoch's last, smaller batch) the objective RPO(losses) is backpropagated, the gradient of (A, s0) clipped to
norm 1, and Adam (lr meta_learning_rate, a linear warm-up over warmup_ratio of the steps then cosine decay:
transformers' get_cosine_schedule_with_warmup over len(users) * epochs // tasks_per_batch steps, the first at lr 0)
takes one step.

RPO (train.py's RPO), over the batch's query losses L [T]: tau = quantile(L, 1 - rpo_ratio) (linear interpolation),
objective sum_t sigmoid((L_t - tau) / rpo_gamma) L_t, differentiated through the weights and tau as well;
rpo_gamma = 0: sum of the losses above tau (a detached mask). While the batch's losses differ by much less than
rpo_gamma (the 0.01 scale keeps them near log 2), every weight is near 1/2 and, Adam being scale-free, the step is
close to that of the plain sum.

Evaluation (evaluate_maml, inference.py), seen and new users alike: from the meta-learned start, eval_inner_steps
full-batch steps of Adam (torch.optim.Adam, lr inner_learning_rate) on all the user's training pairs (the release's
support + validation pairs); no per-user weights are stored. A user's state here is its adapted logits s [K].

Settings: the defaults are scripts/train_on_reddit.sh (with test_on_reddit.sh for the evaluation), `released` holds
both scripts' values; warmup_ratio is train.py's default, the clipping norm (1.0) and the scale (0.01) are fixed in
maml_train and MRM.

Departures from the release:
- the frozen embeddings as given (the project's reward model, its feature width F), and the project's splits of users
  and pairs (seen_train / unseen_fewshot; the release's own per-user train / test split and its train limits belong
  to its data scripts);
- PRISM's support / query split groups the pairs of one conversation in the release; Pairs carry no conversation,
  so every split here is by pair (Reddit's release is by pair too);
- no model selection on test pairs: the release keeps the checkpoint of the epoch with the best accuracy on its users'
  test pairs; here a fixed num_epochs, chosen (by the tuning grid) on held-out training pairs only;
- rpo_ratio = 1 turns RPO off (the objective is the plain sum of the batch's query losses): the release's formula at
  tail fraction 1 is not off (tau is the smallest loss, and the gradient through tau moves weight to the harder tasks);
- the margin is computed from d = e_chosen - e_rejected (linear model: the same margin as scoring both sides);
- own seeded generator for the task order and the splits (the release: Python's random, seeded by index and epoch).

No posterior over a new user's weights: no active-selection curves for MRM (posterior_features is None).

Cost: one meta-step per tasks_per_batch users, so 200 epochs are 100,000 steps for 1000 users (synthetic
PersonalLLM shape, F = 128: about 1.5 to 4 minutes on one busy CPU core) and 2,600 for 26 (synthetic Reddit TLDR,
F = 64: about 5 s). The tasks of a batch run as one padded batch, the inner step's gradient is written out (autograd
through it gives the second-order meta-gradient; it equals torch.func's vmap(grad), tested, at a quarter of its cost).

Imports: config, data, method, lore, baseline.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as nnf
from tqdm.auto import tqdm

from .baseline import check_features, seeded, user_rows
from .config import InputError, check_values, get_device
from .data import as_pairs
from .lore import linear_scores
from .method import Method

SCALE = 0.01  # train.py's MRM: the embedding is multiplied by 0.01 before the linear map
CLIP = 1.0  # maml_train: clip_grad_norm_(model.parameters(), 1.0)
BETAS, EPS = (0.9, 0.999), 1e-8  # Adam's defaults (inner, evaluation and meta optimisers)


def warmup_cosine(step, total, warmup):
    """Learning-rate factor of optimiser step `step` (0, 1, ...): transformers' get_cosine_schedule_with_warmup
    (half a cosine) over `total` steps after `warmup` linear ones; step 0 has factor 0 when warmup > 0."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def adam_step(s, g, m, v, t, lr):
    """One Adam step (torch.optim.Adam's defaults, as higher's DifferentiableAdam writes it, differentiable): logits
    s, gradient g, moments m, v (all [..., K]), step t (1, 2, ...) -> (s, m, v)."""
    m = m * BETAS[0] + (1 - BETAS[0]) * g
    v = v * BETAS[1] + (1 - BETAS[1]) * g * g
    if v.requires_grad:  # higher masks the gradient through sqrt where the second moment is exactly zero
        v_root = torch.where(v == 0, v.detach(), v)
    else:
        v_root = v
    denom = v_root.sqrt() / math.sqrt(1 - BETAS[1] ** t) + EPS
    return s - lr / (1 - BETAS[0] ** t) * m / denom, m, v


def _bt_parts(P, s):
    """(weights softmax(s) [T, K], margins [T, N]) of basis margins P [T, N, K] under logits s [T, K]."""
    w = torch.softmax(s, -1)
    return w, (P * w[:, None, :]).sum(-1)


def task_losses(P, mask, s):
    """[T] each task's mean Bradley-Terry loss -log sigmoid(margin) over its pairs: P [T, N, K] basis margins
    0.01 d^T A, mask [T, N] (1: a pair, 0: padding), s [T, K] logits."""
    _, margin = _bt_parts(P, s)
    return (nnf.softplus(-margin) * mask).sum(1) / mask.sum(1).clamp(min=1)


def logit_grad(P, mask, s):
    """[T, K] the gradient of task_losses(P, mask, s) in s, written out (differentiable again)."""
    w, margin = _bt_parts(P, s)
    dm = -torch.sigmoid(-margin) * mask / mask.sum(1, keepdim=True).clamp(min=1)  # d loss / d margin
    gw = (dm[:, :, None] * P).sum(1)  # d loss / d w
    return w * (gw - (w * gw).sum(-1, keepdim=True))  # through the softmax


def quantile(x, q):
    """torch.quantile(x, q) of x [T] (linear interpolation between the order statistics), differentiable the same
    way, without its overhead."""
    pos = q * (len(x) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    ordered = torch.sort(x).values
    return torch.lerp(ordered[lo], ordered[hi], pos - lo) if hi > lo else ordered[lo]


def rpo(losses, ratio, gamma):
    """train.py's RPO objective of the tasks' losses [T]: tau = quantile(losses, 1 - ratio); sum of
    sigmoid((L - tau) / gamma) L (gamma = 0: sum of the losses above tau, the mask detached). ratio = 1: RPO off,
    the plain sum (a departure: the release's formula at 1 still weights by sigmoid((L - min L) / gamma))."""
    if ratio >= 1:
        return losses.sum()
    tau = quantile(losses, 1.0 - ratio)
    if gamma <= 0:
        return ((losses > tau).float().detach() * losses).sum()
    return (torch.sigmoid((losses - tau) / gamma) * losses).sum()


def meta_objective(A, start, support, support_mask, query, query_mask, *, inner_lr, inner_steps, rpo_ratio,
                   rpo_gamma):
    """(RPO objective, query losses [T]) of one batch of T tasks (maml_train's inner loop, second order):
    A [F, K] the map, start [K] the shared logits; support [T, Ns, F] and query [T, Nq, F] the tasks' pair
    differences e_c - e_r with masks [T, N] (1: a pair, 0: padding). Each task's logits take inner_steps Adam steps
    (lr inner_lr, a fresh state) on its support loss from `start`; its loss is its query loss there."""
    Ps, Pq = SCALE * (support @ A), SCALE * (query @ A)  # [T, N, K]: (0.01 d)^T A
    s = start.expand(len(support), -1)
    m = v = torch.zeros_like(s)
    for t in range(1, inner_steps + 1):
        s, m, v = adam_step(s, logit_grad(Ps, support_mask, s), m, v, t, inner_lr)
    losses = task_losses(Pq, query_mask, s)
    return rpo(losses, rpo_ratio, rpo_gamma), losses


@torch.no_grad()
def adapt(P, user, num_users, start, steps, lr):
    """[C, K] logits of every user after `steps` full-batch Adam steps (lr `lr`, each user its own state, as
    evaluate_maml's fresh Adam per user) on its mean BT loss from `start` [K]: P [M, K] the pairs' basis margins
    0.01 d^T A, user [M]. A user without pairs keeps the start (a zero gradient moves no Adam step)."""
    s = start.expand(num_users, -1).clone()
    m, v = torch.zeros_like(s), torch.zeros_like(s)
    n = torch.bincount(user, minlength=num_users).clamp(min=1).to(P.dtype)
    for t in range(1, steps + 1):
        w = torch.softmax(s, -1)
        margin = (P * w[user]).sum(1)
        gw = torch.zeros_like(s).index_add_(0, user, (-torch.sigmoid(-margin) / n[user])[:, None] * P)
        g = w * (gw - (w * gw).sum(-1, keepdim=True))
        s, m, v = adam_step(s, g, m, v, t, lr)
    return s


def split_tasks(user, num_users, val_ratio, gen):
    """One epoch's support / query split of every user's pairs (MetaDataset.__getitem__): a random int(n val_ratio)
    (at least 1) of a user's n pairs are its query set, the rest its support set (n = 1: that pair in both).
    user [M] -> (support [C, Ns], query [C, Nq]): pair rows, -1 padded."""
    M = len(user)
    counts = torch.bincount(user, minlength=num_users)
    order = torch.argsort(torch.rand(M, generator=gen))
    order = order[torch.argsort(user[order], stable=True)]  # grouped by user, random within each
    rank = torch.empty(M, dtype=torch.long)
    rank[order] = torch.arange(M) - (torch.cumsum(counts, 0) - counts)[user[order]]
    n_query = (counts.double() * val_ratio).floor().long().clamp(min=1)
    single = (counts == 1)[user]
    in_query = rank < n_query[user]
    in_support = ~in_query | single
    pos = torch.where(single, rank, rank - n_query[user])
    query = torch.full((num_users, int(n_query.max()) if M else 0), -1, dtype=torch.long)
    query[user[in_query], rank[in_query]] = torch.nonzero(in_query).flatten()
    support = torch.full((num_users, int((counts - n_query).clamp(min=1).max()) if M else 0), -1, dtype=torch.long)
    support[user[in_support], pos[in_support]] = torch.nonzero(in_support).flatten()
    return support, query


class MRM(Method):
    """Meta reward modeling (arXiv 2601.18731) on frozen embeddings e [F]: r(e) = 0.01 e^T A softmax(s_user),
    A [F, K] and the start s0 [K] meta-learned (second-order MAML with RPO over each batch's tasks); a user's
    state is its logits s [K], adapted from s0 by eval_inner_steps Adam steps on its pairs (module docstring)."""
    label = "MRM"
    rules = {"K": "int >= 1", "inner_learning_rate": "> 0", "meta_learning_rate": "> 0",
             "train_inner_steps": "int >= 1", "eval_inner_steps": "int >= 0", "tasks_per_batch": "int >= 1",
             "num_epochs": "int >= 1", "warmup_ratio": "in [0, 1)", "val_ratio": "in (0, 1)",
             "rpo_ratio": "in (0, 1]", "rpo_gamma": ">= 0"}
    # the released scripts' settings (train.py flags: hidden_layers -> K, inner_lr, meta_lr, train_inner_epochs,
    # eval_inner_epochs, tasks_per_batch, epochs, val_ratio, rpo_ratio, rpo_gamma): the defaults are
    # scripts/train_on_reddit.sh (+ test_on_reddit.sh); PRISM's run takes train_on_prism.sh (+ test_on_prism.sh);
    # PersonalLLM has no released script: its row borrows the Reddit one
    released = {"Reddit": {}, "PRISM": {"inner_learning_rate": 1e-3, "meta_learning_rate": 1e-3}}
    released_for = {"PRISM": "PRISM"}
    departures = ["frozen embeddings as given and the project's splits (the release: its own data scripts, train "
                  "limits and per-user splits)", "a fixed num_epochs (the release keeps the checkpoint of best "
                  "accuracy on its users' test pairs)", "support / query splits by pair (the release groups PRISM's "
                  "pairs by conversation)", "rpo_ratio = 1 turns RPO off (the release's formula at 1 still weights "
                  "the harder tasks)"]
    fewshot_grid = {"eval_inner_steps": [1, 5, 20]}  # a user's adaptation steps (its lr is the meta-training inner lr)
    # small data (tests/test_methods.py): one released Adam step of 5e-3 barely moves a user's logits
    quick = {"inner_learning_rate": 0.5, "meta_learning_rate": 0.05, "eval_inner_steps": 3, "num_epochs": 30}
    # the tuned row's grid (swept jointly; held-out seen-user training pairs); rpo_ratio = 1: RPO off. 48 points:
    # about 2 minutes on synthetic Reddit TLDR, over an hour on synthetic PersonalLLM (one busy CPU core)
    tune_grid = {"inner_learning_rate": [5e-3, 5e-2, 0.5], "meta_learning_rate": [1e-3, 5e-3], "K": [2, 5],
                 "num_epochs": [50, 200], "rpo_ratio": [0.5, 1.0]}
    # chosen by tune_grid and fewshot_grid with tune=True (seed 0; held-out seen-user training pairs, pseudo-new
    # seen users); every point and edge: RedditTLDR/figures/tuning_synthetic.json
    tuned = {"RedditTLDR synthetic lowrank F=64 protocol=published max_train_pairs=150":
            {"inner_learning_rate": 5.0, "meta_learning_rate": 1e-3, "K": 5, "num_epochs": 200, "rpo_ratio": 1.0,
             "eval_inner_steps": 1}}
    independent_users = True  # a user's adaptation reads its own pairs only, and draws nothing at random

    def __init__(self, num_features, K=2, inner_learning_rate=5e-3, meta_learning_rate=5e-3, train_inner_steps=1,
                 eval_inner_steps=1, tasks_per_batch=2, num_epochs=200, warmup_ratio=0.05, val_ratio=0.9,
                 rpo_ratio=0.5, rpo_gamma=0.5, seed=0):
        super().__init__()
        check_values(locals(), self.rules)
        self.num_features, self.K = num_features, K
        self.inner_learning_rate, self.meta_learning_rate = inner_learning_rate, meta_learning_rate
        self.train_inner_steps, self.eval_inner_steps = train_inner_steps, eval_inner_steps
        self.tasks_per_batch, self.num_epochs, self.warmup_ratio = tasks_per_batch, num_epochs, warmup_ratio
        self.val_ratio, self.rpo_ratio, self.rpo_gamma, self.seed = val_ratio, rpo_ratio, rpo_gamma, seed
        self._init_parameters()
        self.W = None  # [C, K] the seen users' adapted logits, set by fit
        self.losses = []  # each meta-step's mean query loss

    def _init_parameters(self):
        """A [F, K] and start [K] as train.py's MRM draws them under the seed (nn.Linear's init, then randn)."""
        with seeded(self.seed):
            layer = nn.Linear(self.num_features, self.K, bias=False)
            start = torch.randn(self.K)
        self.A = nn.Parameter(layer.weight.detach().t().contiguous())
        self.start = nn.Parameter(start)

    def fit(self, pairs, device=None):
        """Meta-train A and the start on the seen users' training pairs (each user a task), then adapt every seen
        user from the start on all its pairs (its state, self.W [C, K]) -> self."""
        self._cache = {}
        pairs = as_pairs(pairs)
        check_features(pairs, self.num_features)
        user_rows(pairs)  # every user has a pair
        device = get_device(device)
        self._init_parameters()
        self.to(device)
        D = self._differences(pairs).to(device)
        user, C = pairs.user, pairs.num_users
        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam([self.A, self.start], lr=self.meta_learning_rate, betas=BETAS, eps=EPS,
                               fused=device.type == "cpu")  # fused: one pass per tensor on CPU
        per_epoch = math.ceil(C / self.tasks_per_batch)
        total = C * self.num_epochs // self.tasks_per_batch  # maml_train's schedule length (floor, as released)
        warmup = int(total * self.warmup_ratio)
        step, self.losses = 0, []
        settings = dict(inner_lr=self.inner_learning_rate, inner_steps=self.train_inner_steps,
                        rpo_ratio=self.rpo_ratio, rpo_gamma=self.rpo_gamma)
        bar = tqdm(total=self.num_epochs * per_epoch, desc="MRM", leave=False, disable=None)
        for _ in range(self.num_epochs):
            order = torch.randperm(C, generator=gen)
            support, query = self._split(user, C, gen)
            for sup, sup_mask, qry, qry_mask in self._batches(D, support[order], query[order], device):
                obj, losses = meta_objective(self.A, self.start, sup, sup_mask, qry, qry_mask, **settings)
                opt.zero_grad(set_to_none=True)
                obj.backward()
                torch.nn.utils.clip_grad_norm_([self.A, self.start], CLIP)
                for group in opt.param_groups:
                    group["lr"] = self.meta_learning_rate * warmup_cosine(step, total, warmup)
                opt.step()
                step += 1
                self.losses.append(losses.detach().mean())
                bar.update(1)
        bar.close()
        self.losses = torch.stack(self.losses).tolist() if self.losses else []
        self.A.grad = self.start.grad = None
        self.cpu()
        self.W = self._adapt(pairs, device)
        return self

    @staticmethod
    def _differences(pairs):
        """[M, F] float32 d = e_chosen - e_rejected (table pairs: both sides in float32 before the difference)."""
        if pairs.table is None:
            return pairs.diffs.float()
        return pairs.table[pairs.chosen].float() - pairs.table[pairs.rejected].float()

    def _batches(self, D, support, query, device, block=2**22):
        """(support [T, Ns, F], its mask [T, Ns], query [T, Nq, F], its mask) of each batch of tasks_per_batch tasks,
        the tasks' pair rows support [C, Ns], query [C, Nq] (-1 padded) in order; padded to each batch's longest
        task; gathered from D [M, F] a block of about `block` numbers at a time."""
        T = self.tasks_per_batch
        n_sup, n_qry = (support >= 0).sum(1).tolist(), (query >= 0).sum(1).tolist()
        per_block = max(1, block // max(1, (support.shape[1] + query.shape[1]) * D.shape[1] * T)) * T
        for b0 in range(0, len(support), per_block):
            S, Q = support[b0:b0 + per_block].to(device), query[b0:b0 + per_block].to(device)
            DS, DQ = D[S.clamp(min=0)], D[Q.clamp(min=0)]
            MS, MQ = (S >= 0).float(), (Q >= 0).float()
            for b in range(0, len(S), T):
                ns, nq = max(n_sup[b0 + b:b0 + b + T]), max(n_qry[b0 + b:b0 + b + T])
                yield DS[b:b + T, :ns], MS[b:b + T, :ns], DQ[b:b + T, :nq], MQ[b:b + T, :nq]

    def _split(self, user, num_users, gen):
        """One epoch's (support [C, Ns], query [C, Nq]) pair rows (split_tasks; a test records them here)."""
        return split_tasks(user, num_users, self.val_ratio, gen)

    def _check_fitted(self):
        if self.W is None:
            raise InputError("call fit(pairs) first")

    def _adapt(self, pairs, device):
        """[C, K] every user's logits after the evaluation adaptation on its pairs (CPU)."""
        device = get_device(device)
        P = SCALE * pairs.project(self.A.detach()).float().to(device)
        return adapt(P, pairs.user.to(device), pairs.num_users, self.start.detach().to(device),
                     self.eval_inner_steps, self.inner_learning_rate).cpu()

    def personalize(self, pairs, device=None):
        """New users' logits [C', K]: eval_inner_steps full-batch Adam steps from the meta-learned start on their
        few-shot pairs (evaluate_maml); A and the start stay as they are."""
        self._check_fitted()
        pairs = as_pairs(pairs)
        check_features(pairs, self.num_features)
        return self._adapt(pairs, device)

    def posterior_features(self, pairs):
        """None: MRM has no posterior over a new user's weights (no active-selection curves for MRM)."""
        return None

    def user_weights(self, state=None):
        """[C, K] users' weights on the simplex (default: the seen users')."""
        self._check_fitted()
        return torch.softmax(torch.as_tensor(self.W if state is None else state, dtype=torch.float32), -1)

    @torch.no_grad()
    def margins(self, pairs, state=None, device=None):
        """[M] 0.01 d^T A softmax(s_user) of every pair; state: logits [C, K] (default: the seen users')."""
        self._check_fitted()
        pairs, state, device = self._margin_inputs(pairs, state, self.W, "user logits", device)
        XV = self._cached("project", pairs, device, lambda: SCALE * pairs.project(self.A.detach()).float().to(device))
        w = torch.softmax(torch.as_tensor(state, dtype=torch.float32).to(device), -1)
        if w.shape != (pairs.num_users, self.K):
            raise InputError(f"got logits of shape {tuple(w.shape)} for {pairs.num_users} users and K = {self.K}")
        return (XV * w[pairs.user.to(device)]).sum(1).cpu()

    def scores(self, table, rows, prompt, user, state=None, device=None):
        """[Q, J] 0.01 e^T A softmax(s_user) of every candidate (the rows rows[prompt[q]] of table [R, F])."""
        self._check_fitted()
        state, _, _, _ = self._score_inputs(table, rows, user, state, self.W, "user logits", device)
        return linear_scores(table, rows, prompt, user, SCALE * self.A.detach(), self.user_weights(state))
