"""MRM (lorelib/mrm.py) against a reference written from the released equations alone (github.com/ModalityDance/MRM:
train.py's MRM.forward, maml_train with higher's differentiable Adam, RPO, evaluate_maml; utils.py's bt_loss and
MetaDataset). The reference uses plain torch and nothing of lorelib: each side of a pair scored on its own, the inner
gradient by torch.autograd.grad (create_graph), the meta-gradient by torch.autograd.grad through the inner steps,
torch.optim.Adam for the evaluation and the meta-optimiser, torch.quantile in RPO."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from lorelib import methods, mrm
from lorelib.mrm import MRM

# --- the reference (plain torch, the released equations) ---


def ref_reward(x, W, s):
    """train.py's MRM.forward, hidden_layers [K], no bias: x [N, F] scaled by 0.01, Linear W [K, F], mixed by
    softmax(s) [K] -> [N]."""
    return ((x * 0.01) @ W.t() * torch.softmax(s, -1)).sum(-1)


def ref_bt(ch, rj, W, s):
    """utils.py's bt_loss on the two sides' rewards."""
    return -F.logsigmoid(ref_reward(ch, W, s) - ref_reward(rj, W, s)).mean()


def ref_inner(W, s0, ch, rj, lr, steps):
    """maml_train's inner loop: higher's DifferentiableAdam (a fresh state) on the logits only, `steps` steps on the
    support loss, second order (create_graph) -> adapted logits."""
    s, m, v = s0, torch.zeros_like(s0), torch.zeros_like(s0)
    for t in range(1, steps + 1):
        (g,) = torch.autograd.grad(ref_bt(ch, rj, W, s), s, create_graph=True)
        m = m * 0.9 + (1 - 0.9) * g
        v = v * 0.999 + (1 - 0.999) * g * g
        denom = v.sqrt() / math.sqrt(1 - 0.999 ** t) + 1e-8
        s = s - (lr / (1 - 0.9 ** t)) * m / denom
    return s


def ref_rpo(losses, tail, gamma):
    """train.py's RPO; tail = 1 is the project's "RPO off" (the plain sum), not the released formula."""
    if tail >= 1:
        return losses.sum()
    tau = torch.quantile(losses, q=1.0 - tail)
    if gamma <= 0:
        return ((losses > tau).float().detach() * losses).sum()
    return (torch.sigmoid((losses - tau) / gamma) * losses).sum()


def ref_meta_objective(W, s0, tasks, lr, steps, tail, gamma):
    """One batch of maml_train: each task (support ch, rj, query ch, rj) adapted from s0, its query loss, RPO."""
    losses = torch.stack([ref_bt(qc, qr, W, ref_inner(W, s0, sc, sr, lr, steps)) for sc, sr, qc, qr in tasks])
    return ref_rpo(losses, tail, gamma)


def ref_adapt(W, s0, ch, rj, lr, steps):
    """evaluate_maml: a copy of the logits, torch.optim.Adam, `steps` full-batch steps on the user's pairs."""
    s = s0.detach().clone().requires_grad_()
    opt = torch.optim.Adam([s], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ref_bt(ch, rj, W, s).backward()
        opt.step()
    return s.detach()


def ref_lr_factor(step, total, warmup):
    """transformers' get_cosine_schedule_with_warmup (num_cycles 0.5) as a LambdaLR factor."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


# --- data ---

def tasks_data(counts, F_dim=6, scale=30.0, seed=0, dtype=torch.float64):
    """Per task (support ch, rj, query ch, rj) with the given (support, query) pair counts, random embeddings."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(scale * torch.randn(n, F_dim, generator=g, dtype=dtype) for n in (ns, ns, nq, nq))
            for ns, nq in counts]


def padded(parts):
    """[T, N, F] differences and their mask [T, N] of per-task chosen / rejected lists."""
    N = max(len(c) for c, _ in parts)
    D = torch.zeros(len(parts), N, parts[0][0].shape[1], dtype=parts[0][0].dtype)
    mask = torch.zeros(len(parts), N, dtype=parts[0][0].dtype)
    for i, (c, r) in enumerate(parts):
        D[i, :len(c)], mask[i, :len(c)] = c - r, 1
    return D, mask


def table_pairs(counts, F_dim=6, R=60, scale=30.0, seed=0):
    """Pairs of random table rows, counts[u] pairs for user u."""
    g = torch.Generator().manual_seed(seed)
    table = scale * torch.randn(R, F_dim, generator=g)
    chosen = [torch.randint(R, (n,), generator=g) for n in counts]
    rejected = [(c + 1 + torch.randint(R - 1, (len(c),), generator=g)) % R for c in chosen]
    return utils.Pairs.from_indices(table, chosen, rejected)


# --- (a) one meta-step's gradients ---

@pytest.mark.parametrize("steps,tail,gamma,scale", [(1, 0.3, 0.5, 30.0), (2, 0.3, 0.5, 30.0), (2, 1.0, 0.5, 30.0),
                                                    (1, 0.6, 0.0, 30.0), (3, 0.5, 0.2, 30.0), (1, 0.3, 0.5, 0.03)])
def test_meta_gradient_equals_the_reference(steps, tail, gamma, scale):
    """d RPO(query losses after the inner Adam steps) / d (map, start) on 5 tasks of different sizes: the module's
    padded, written-out inner step against autograd through the released equations (float64). One Adam step is
    lr g / (|g| + eps): its second-order part is eps / |g| of the first-order one, seen here only with tiny
    embeddings (scale 0.03: |g| ~ 1e-5)."""
    K, lr = 3, 0.05
    tasks = tasks_data([(1, 4), (3, 7), (2, 2), (5, 9), (4, 3)], scale=scale)
    g = torch.Generator().manual_seed(1)
    W = (0.3 * torch.randn(K, tasks[0][0].shape[1], generator=g, dtype=torch.float64)).requires_grad_()
    s0 = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.autograd.grad(ref_meta_objective(W, s0, tasks, lr, steps, tail, gamma), (W, s0))

    A, start = W.detach().t().clone().requires_grad_(), s0.detach().clone().requires_grad_()
    sup, sup_mask = padded([(t[0], t[1]) for t in tasks])
    qry, qry_mask = padded([(t[2], t[3]) for t in tasks])
    obj, losses = mrm.meta_objective(A, start, sup, sup_mask, qry, qry_mask, inner_lr=lr, inner_steps=steps,
                                     rpo_ratio=tail, rpo_gamma=gamma)
    obj.backward()
    assert len(set(losses.tolist())) == len(tasks)  # distinct losses: the quantile's side matters
    torch.testing.assert_close(A.grad.t(), ref[0], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(start.grad, ref[1], rtol=1e-5, atol=1e-12)


def test_inner_gradient_is_torch_func_grad_first_and_second_order():
    """The inner step's written-out gradient (logit_grad, padded tasks) equals torch.func's vmap(grad) of one task's
    loss, and so does its gradient in the map (what the meta-gradient flows through)."""
    from torch.func import grad, vmap
    g = torch.Generator().manual_seed(0)
    T, N, K, F_dim = 3, 6, 3, 5
    A = torch.randn(F_dim, K, generator=g, dtype=torch.float64, requires_grad=True)
    D = torch.randn(T, N, F_dim, generator=g, dtype=torch.float64)
    mask = torch.ones(T, N, dtype=torch.float64)
    mask[1, 4:], mask[2, 1:] = 0, 0
    s = torch.randn(T, K, generator=g, dtype=torch.float64)
    P = mrm.SCALE * (D @ A)
    by_func = vmap(grad(lambda s1, P1, m1: mrm.task_losses(P1[None], m1[None], s1[None])[0]))(s, P, mask)
    written = mrm.logit_grad(P, mask, s)
    torch.testing.assert_close(written, by_func, rtol=1e-10, atol=1e-14)
    c = torch.randn(T, K, generator=g, dtype=torch.float64)
    second = [torch.autograd.grad((x * c).sum(), A, retain_graph=True)[0] for x in (written, by_func)]
    torch.testing.assert_close(second[0], second[1], rtol=1e-10, atol=1e-14)


def test_quantile_is_torch_quantile():
    x = torch.tensor([0.3, -1.0, 2.0, 0.7, 0.1], requires_grad=True)
    for q in (0.0, 0.25, 0.3, 0.5, 0.7, 1.0):
        a = mrm.quantile(x, q)
        b = torch.quantile(x, q)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])


# --- (b) a new user's adaptation ---

@pytest.mark.parametrize("steps,lr", [(1, 5e-3), (4, 0.05)])
def test_personalize_equals_the_reference_adaptation(steps, lr):
    """New users' logits: evaluate_maml's Adam steps from the meta-learned start on each user's pairs alone."""
    seen, new = table_pairs([8, 5, 12, 3], seed=0), table_pairs([1, 4, 9], seed=1)
    model = MRM(6, K=3, num_epochs=2, eval_inner_steps=steps, inner_learning_rate=lr, seed=3).fit(seen)
    state = model.personalize(new)
    W, s0 = model.A.detach().t(), model.start.detach()
    table = new.table
    for u, rows in enumerate(new.rows_by_user()):
        ref = ref_adapt(W, s0, table[new.chosen[rows]], table[new.rejected[rows]], lr, steps)
        torch.testing.assert_close(state[u], ref, rtol=1e-5, atol=1e-7)
    assert not torch.equal(state[0], s0)  # it moved
    margins = model.margins(new, state)
    ref_margins = torch.cat([ref_reward(table[new.chosen[r]], W, state[u]) - ref_reward(table[new.rejected[r]], W,
                                                                                      state[u])
                             for u, r in enumerate(new.rows_by_user())])
    torch.testing.assert_close(margins, ref_margins, rtol=1e-5, atol=1e-6)


# --- (c) the meta-training loop ---

def test_fit_equals_the_reference_loop():
    """Two epochs of fit (5 users, 2 tasks per batch: a last batch of one task; warm-up and cosine; clipping) against
    maml_train's loop on the same task order and support / query splits (recorded from the module: its own
    generator draws them), then the seen users' states against evaluate_maml's adaptation on all their pairs."""
    seen = table_pairs([7, 1, 12, 4, 20], scale=300.0, seed=2)  # large embeddings: gradients above the clip norm
    model = MRM(6, K=3, num_epochs=2, tasks_per_batch=2, warmup_ratio=0.2, inner_learning_rate=0.05,
                meta_learning_rate=0.01, train_inner_steps=2, eval_inner_steps=2, rpo_ratio=0.5, rpo_gamma=0.5,
                seed=5)
    recorded, batches = [], model._batches

    def record(D, support, query, device):
        recorded.append((support.clone(), query.clone()))
        return batches(D, support, query, device)
    model._batches = record
    model.fit(seen)

    torch.manual_seed(5)  # train.py's MRM under the seed: the layer's init, then randn for the logits
    layer = nn.Linear(6, 3, bias=False)
    W, s0 = nn.Parameter(layer.weight.detach().clone()), nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([W, s0], lr=0.01)
    total = 5 * 2 // 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: ref_lr_factor(i, total, int(total * 0.2)))
    table, norms = seen.table, []
    for support, query in recorded:
        assert len(support) == 5
        for b in range(0, 5, 2):
            tasks = []
            for i in range(b, min(b + 2, 5)):
                s, q = support[i][support[i] >= 0], query[i][query[i] >= 0]
                tasks.append((table[seen.chosen[s]], table[seen.rejected[s]], table[seen.chosen[q]],
                              table[seen.rejected[q]]))
            obj = ref_meta_objective(W, s0, tasks, 0.05, 2, 0.5, 0.5)
            opt.zero_grad()
            obj.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_([W, s0], 1.0)))
            opt.step()
            sched.step()
    assert len(norms) == 6 and max(norms) > 1  # the clipping acted
    torch.testing.assert_close(model.A.detach().t(), W.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.start.detach(), s0.detach(), rtol=1e-5, atol=1e-6)
    for u, rows in enumerate(seen.rows_by_user()):
        ref = ref_adapt(W.detach(), s0.detach(), table[seen.chosen[rows]], table[seen.rejected[rows]], 0.05, 2)
        torch.testing.assert_close(model.W[u], ref, rtol=1e-5, atol=1e-6)


def test_split_tasks_is_the_released_split():
    """MetaDataset: int(n * val_ratio) (at least one) of a user's n pairs are its query set, the rest its support set;
    a user with one pair has it in both; a fresh split each epoch."""
    counts = [1, 2, 5, 10, 11, 47]
    user = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    gen = torch.Generator().manual_seed(0)
    first = mrm.split_tasks(user, len(counts), 0.9, gen)
    for support, query in [first, mrm.split_tasks(user, len(counts), 0.9, gen)]:
        for u, n in enumerate(counts):
            s, q = support[u][support[u] >= 0], query[u][query[u] >= 0]
            assert len(q) == max(1, int(n * 0.9))
            assert (user[s] == u).all() and (user[q] == u).all()
            if n == 1:
                assert s.tolist() == q.tolist()
            else:
                assert len(s) == n - len(q) and sorted(s.tolist() + q.tolist()) == torch.nonzero(user == u).flatten(
                ).tolist()
    again = mrm.split_tasks(user, len(counts), 0.9, gen)
    assert not torch.equal(first[1], again[1])


def test_released_settings_and_checks():
    reddit = {"K": 2, "inner_learning_rate": 5e-3, "meta_learning_rate": 5e-3, "train_inner_steps": 1,
              "eval_inner_steps": 1, "tasks_per_batch": 2, "num_epochs": 200, "val_ratio": 0.9, "rpo_ratio": 0.5,
              "rpo_gamma": 0.5}  # scripts/train_on_reddit.sh and test_on_reddit.sh: the defaults
    assert {k: v for k, v in MRM(4).settings.items() if k in reddit} == reddit and MRM.released["Reddit"] == {}
    prism = methods.full_settings("mrm", dataset="PRISM")  # scripts/train_on_prism.sh for PRISM's run
    assert prism["config"] == "PRISM" and {k: prism[k] for k in reddit} == {
        **reddit, "inner_learning_rate": 1e-3, "meta_learning_rate": 1e-3}
    assert methods.full_settings("mrm", dataset="PersonalLLM")["config"] == "Reddit"  # borrowed
    assert mrm.warmup_cosine(0, 100, 5) == 0.0 and mrm.warmup_cosine(5, 100, 5) == 1.0
    for step in (0, 3, 5, 50, 100, 104):
        assert mrm.warmup_cosine(step, 100, 5) == ref_lr_factor(step, 100, 5)
    with pytest.raises(utils.InputError, match="rpo_ratio"):
        MRM(4, rpo_ratio=0.0)
    with pytest.raises(utils.InputError, match="fit"):
        MRM(4).personalize(table_pairs([2], F_dim=4))
    assert MRM(4).posterior_features(table_pairs([2], F_dim=4)) is None
