"""Choosing the few-shot comparisons (lorelib/selection.py) and comparing the rules (pipelines.vary_shots,
report.report_shots, intervals.py).

Every score is checked against an independent reference with a tight tolerance: the posterior against L-BFGS and
autograd Jacobians in float64 (not the hand-written gradients), BALD against a 40,001-point quadrature, a dialog's
joint information against the entropy drop of one Sherman-Morrison update per pair, and each question (and each
greedy batch) against the reference's best candidate after the refit.
"""
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

import utils
from lorelib import intervals, selection
from lorelib.fewshot import shot_units
from lorelib.report_shots import report_shots
from lorelib.selection import (
    choose_shots,
    comparison_scores,
    expected_information,
    laplace_posterior,
    select_comparisons,
)
from lorelib.study import select_shots

PRIOR_VAR = 9.0  # the prior N(0, 3^2 I) of a new user's logits
SCALE = 100.0  # the method's logit scale: P(a preferred to b) = sigmoid((e_a - e_b)^T V w / 100)
BALD_TOL = 5e-8  # the closed form's error against quadrature: at most 2.3e-8 over 400 (mean, variance) points


def planted_candidates(seed, n, K=5, scale=1000.0):
    """Planted w ~ Dirichlet(1) [K], candidates X ~ N(0, scale^2) [n, K] (rows d^T V) and Bradley-Terry answers
    y [n] (+1: the row's first side preferred) -> (rng, w, X, y)."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(K))
    X = rng.normal(0, scale, (n, K))
    return rng, w, X, np.where(rng.random(n) < 1 / (1 + np.exp(-X @ w / 100)), 1, -1)


# --- the independent references ---

def ref_logits(u, X):
    return X @ torch.softmax(u, 0) / SCALE


def ref_posterior(known, K):
    """(u_map [K], Sigma [K, K]): L-BFGS on the negative log posterior, polished by Newton steps, both with autograd
    derivatives (float64), and the Gauss-Newton precision I / 9 + J^T diag(lam) J with J = dz/du by autograd."""
    X = torch.as_tensor(np.asarray(known, dtype=np.float64).reshape(-1, K))

    def loss(v):
        return nnf.softplus(-ref_logits(v, X)).sum() + (v @ v) / (2 * PRIOR_VAR)
    u = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([u], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss(u)
        value.backward()
        return value
    opt.step(closure)
    u = u.detach()
    for _ in range(5):
        grad = torch.autograd.functional.jacobian(loss, u)
        u = u - torch.linalg.solve(torch.autograd.functional.hessian(loss, u), grad)
    assert torch.autograd.functional.jacobian(loss, u).abs().max() < 1e-11  # the reference itself converged
    return u.numpy(), np.linalg.inv(np.eye(K) / PRIOR_VAR + ref_fisher(u, X))


def ref_fisher(u, X):
    """sum_i lam_i J_i J_i^T with J = dz/du by autograd."""
    u, X = torch.as_tensor(u), torch.as_tensor(np.asarray(X, dtype=np.float64))
    J = torch.autograd.functional.jacobian(lambda v: ref_logits(v, X), u).numpy()
    z = ref_logits(u, X).numpy()
    return J.T @ (J / (2 + 2 * np.cosh(z))[:, None])  # sigmoid(z) sigmoid(-z) = 1 / (2 + 2 cosh z)


def ref_candidates(X, u, Sigma):
    """(z [n], J [n, K], var [n] = J Sigma J^T, lam [n]) of the candidates, by autograd."""
    u, Xt = torch.as_tensor(u), torch.as_tensor(np.asarray(X, dtype=np.float64))
    J = torch.autograd.functional.jacobian(lambda v: ref_logits(v, Xt), u).numpy()
    z = ref_logits(u, Xt).numpy()
    return z, J, np.einsum("nk,kl,nl->n", J, Sigma, J), 1 / (2 + 2 * np.cosh(z))


def h(p):
    return -(p * np.log(np.maximum(p, 1e-300)) + (1 - p) * np.log(np.maximum(1 - p, 1e-300)))


def ref_bald(mu, var, n=40001):
    """I(y; z) = h(E sigmoid(z)) - E h(sigmoid(z)), z ~ N(mu, var): the trapezoid rule on +-12 standard deviations."""
    t = np.linspace(-12, 12, n)
    pdf = np.exp(-0.5 * t * t)
    pdf /= pdf.sum()
    out = []
    for m, v in zip(np.atleast_1d(mu), np.atleast_1d(var)):
        p = 0.5 * (1 + np.tanh(0.5 * (m + np.sqrt(v) * t)))
        out.append(h(p @ pdf) - h(p) @ pdf)
    return np.array(out)


def ref_curvature(mu, var, n=40001):
    """E[sigmoid(z) sigmoid(-z)], z ~ N(mu, var), by the trapezoid rule on +-12 standard deviations."""
    t = np.linspace(-12, 12, n)
    pdf = np.exp(-0.5 * t * t)
    pdf /= pdf.sum()
    def curvature(z):  # sigmoid(z) sigmoid(-z), without overflow
        e = np.exp(-np.abs(z))
        return e / (1 + e) ** 2
    return np.array([curvature(m + np.sqrt(v) * t) @ pdf for m, v in zip(np.atleast_1d(mu), np.atleast_1d(var))])


def ref_expected_fisher(u, X, Sigma):
    """sum_i E[lam(z_i)] J_i J_i^T, z_i ~ N(x_i^T w / 100, J_i Sigma J_i^T), by autograd and quadrature."""
    z, J, var, _ = ref_candidates(X, u, Sigma)
    return J.T @ (J * ref_curvature(z, var)[:, None])


def ref_unit_information(J, lam, Sigma):
    """The entropy drop of N(., Sigma) when its precision gains sum_i lam_i J_i J_i^T, one pair at a time:
    sum_i 1/2 log(1 + lam_i J_i^T Sigma_i J_i) with Sherman-Morrison updates of Sigma_i."""
    S, total = Sigma.copy(), 0.0
    for g, lm in zip(J, lam):
        v = g @ S @ g
        total += 0.5 * np.log1p(lm * v)
        Sg = S @ g
        S = S - lm * np.outer(Sg, Sg) / (1 + lm * v)
    return total


def ref_scores(rule, X, u, Sigma, groups=None, var0=None):
    """The reference score of every unit: BALD per row or the joint information per group ("active"), the summed
    entropy of the predicted answers, weighted by the share of each row's variance the greedy picks left
    ("uncertainty"), the summed variance ("variance")."""
    z, J, var, _ = ref_candidates(X, u, Sigma)
    if rule == "active" and groups is not None:  # lam: the curvature expected under N(., Sigma)
        lam = ref_curvature(z, var)
        return np.array([ref_unit_information(J[groups == g], lam[groups == g], Sigma)
                         for g in range(groups.max() + 1)])
    rows = {"active": lambda: ref_bald(z, var), "variance": lambda: var,
            "uncertainty": lambda: h(1 / (1 + np.exp(-z))) * (1.0 if var0 is None else var / var0)}[rule]()
    return rows if groups is None else np.bincount(groups, rows)


# --- the posterior and the scores ---

def test_laplace_posterior_matches_the_autograd_reference():
    """u_map and Sigma of laplace_posterior equal L-BFGS + autograd to 1e-7, from 0 (the prior) to 60 answers; the
    hand-written gradient and exact Hessian equal central finite differences."""
    rng, _, X, y = planted_candidates(0, 60)
    for m in (0, 1, 4, 15, 60):
        u, Sigma = laplace_posterior(X[:m] * y[:m, None] if m else np.zeros((0, 5)))
        u_ref, Sigma_ref = ref_posterior(X[:m] * y[:m, None], 5) if m else (np.zeros(5), PRIOR_VAR * np.eye(5))
        assert np.abs(u - u_ref).max() < 1e-7, m
        assert np.abs(Sigma - Sigma_ref).max() < 1e-7 * np.abs(Sigma_ref).max(), m
    known, prec, terms = X[:15] * y[:15, None], np.eye(5) / PRIOR_VAR, selection._posterior_terms
    v, E = rng.normal(0, 1, 5), np.eye(5) * 1e-5
    _, grad, _, H = terms(v, known, prec)
    central = [(terms(v + e, known, prec), terms(v - e, known, prec)) for e in E]
    assert np.allclose(grad, [(a[0] - b[0]) / 2e-5 for a, b in central], atol=1e-6)
    assert np.allclose(H, [(a[1] - b[1]) / 2e-5 for a, b in central], atol=1e-6)


def test_closed_forms_against_quadrature_on_400_points():
    """expected_information and expected_curvature over 400 (mean, variance) points, means N(0, 5^2) and
    U(-40, 40), variances log-uniform in [1e-6, 1e4]: within 5e-8 and 3e-8 of quadrature (the measured errors are at
    most 2.3e-8 and 1.6e-8)."""
    rng = np.random.default_rng(0)
    mu = np.concatenate([rng.normal(0, 5, 300), rng.uniform(-40, 40, 100)])
    var = np.exp(rng.uniform(np.log(1e-6), np.log(1e4), 400))
    assert np.abs(expected_information(mu, var) - ref_bald(mu, var)).max() < BALD_TOL
    assert np.abs(selection.expected_curvature(mu, var) - ref_curvature(mu, var)).max() < 3e-8


def test_every_rule_scores_as_the_reference_does():
    """150 candidates over two decades of scale, under the posterior of 10 answers: "active" is BALD at the posterior
    mean and linearised variance (within 5e-8 of quadrature), "uncertainty" the entropy of the predicted answer
    (1e-12), "variance" J Sigma J^T (1e-9 relative); every score is even in x."""
    rng, _, X, y = planted_candidates(3, 160)
    u, Sigma = laplace_posterior(X[:10] * y[:10, None])
    C = X[10:] * np.exp(rng.uniform(np.log(0.05), np.log(3), 150))[:, None]
    z, _, var, _ = ref_candidates(C, u, Sigma)
    assert np.abs(comparison_scores(C, u, Sigma, "active") - ref_bald(z, var)).max() < BALD_TOL
    assert np.abs(comparison_scores(C, u, Sigma, "uncertainty") - h(1 / (1 + np.exp(-z)))).max() < 1e-12
    assert np.allclose(comparison_scores(C, u, Sigma, "variance"), var, rtol=1e-9, atol=0)
    for rule in ("active", "uncertainty", "variance"):
        assert np.array_equal(comparison_scores(C, u, Sigma, rule), comparison_scores(-C, u, Sigma, rule))


@pytest.mark.parametrize("rule", ["active", "uncertainty", "variance"])
def test_each_question_is_the_reference_best_after_the_refit(rule):
    """choose_shots, 10 questions from 50 candidates: each one is the best free candidate under the reference
    posterior of the answers so far (its reference score within the tolerance of the best), and the information trace
    is the reference's best BALD."""
    _, _, X, y = planted_candidates(5, 50)
    asked, info = choose_shots(X, 10, lambda r: y[r], rule, return_information=True)
    tol = BALD_TOL if rule == "active" else 1e-9
    for t, pick in enumerate(asked):
        free = np.setdiff1d(np.arange(50), asked[:t])
        u, Sigma = ref_posterior(X[asked[:t]] * y[asked[:t], None], 5) if t else (np.zeros(5), PRIOR_VAR * np.eye(5))
        score = ref_scores(rule, X, u, Sigma)
        assert score[pick] >= score[free].max() - tol * max(1.0, score[free].max()), (t, pick)
        assert abs(info[t] - ref_scores("active", X, u, Sigma)[free].max()) < BALD_TOL


@pytest.mark.parametrize("rule", ["active", "uncertainty", "variance"])
def test_a_batch_is_greedy_under_the_expected_fisher_information(rule):
    """select_comparisons(k = 6) after 8 answers: pick j is the reference best once Sigma^-1 has gained the expected
    Fisher information of picks 0..j-1 (for uncertainty: each row's entropy times the share of its variance left).
    With every candidate twice in the pool, the second pick is not the copy of the first (without the update it
    would be: they tie)."""
    _, _, X, y = planted_candidates(6, 48)
    known = X[:8] * y[:8, None]
    picks, info = select_comparisons(X[8:], 6, rule=rule, known=known, return_information=True)
    u, Sigma0 = ref_posterior(known, 5)
    var0 = ref_candidates(X[8:], u, Sigma0)[2]
    tol, Sigma = (BALD_TOL if rule == "active" else 1e-9), Sigma0
    for j, pick in enumerate(picks):
        if j:  # the previous pick's expected Fisher information under the Sigma it was picked with
            Sigma = np.linalg.inv(np.linalg.inv(Sigma) + ref_expected_fisher(u, X[8:][[picks[j - 1]]], Sigma))
        score = ref_scores(rule, X[8:], u, Sigma, var0=var0 if rule == "uncertainty" else None)
        free = np.setdiff1d(np.arange(40), picks[:j])
        assert score[pick] >= score[free].max() - tol * max(1.0, score[free].max()), (j, pick)
        assert abs(info[j] - ref_scores("active", X[8:], u, Sigma)[free].max()) < BALD_TOL
    twice = np.repeat(X[8:28], 2, axis=0)  # rows 2i and 2i + 1 are the same comparison: equal scores
    first, second = select_comparisons(twice, 2, rule=rule, known=known)
    assert first % 2 == 0 and second != first + 1  # after the pick its copy is worth less than another candidate


def test_a_dialog_is_scored_by_its_joint_information():
    """unit_information of dialogs equals the Sherman-Morrison entropy drop (1e-6 relative). A dialog repeating the
    most informative pair three times is worth less than three distinct pairs, though the sum of their BALD says the
    opposite: active asks the distinct ones first, and a greedy batch of dialogs follows the reference."""
    _, _, X, y = planted_candidates(7, 70)
    known = X[:6] * y[:6, None]
    u, Sigma = ref_posterior(known, 5)
    C = X[6:]
    groups = np.repeat(np.arange(16), 4)
    assert np.allclose(selection.unit_information(C, u, Sigma, groups), ref_scores("active", C, u, Sigma, groups),
                       rtol=1e-6, atol=0)  # the closed-form curvature's error is at most 1.6e-8
    bald = ref_scores("active", C, u, Sigma)
    best = int(np.argmax(bald))
    distinct = [p for p in select_comparisons(C, 4, known=known) if p != best][:3]
    pool = np.concatenate([C[[best] * 3], C[distinct]])
    dialogs = np.array([0, 0, 0, 1, 1, 1])
    assert bald[[best] * 3].sum() > bald[distinct].sum()  # the sum of per-pair BALD prefers the repeats
    joint = selection.unit_information(pool, *laplace_posterior(known), dialogs)
    assert joint[1] > joint[0] and select_comparisons(pool, 1, known=known, groups=dialogs) == [1]
    picks, S = select_comparisons(C, 3, known=known, groups=groups), Sigma
    for j, pick in enumerate(picks):
        if j:
            S = np.linalg.inv(np.linalg.inv(S) + ref_expected_fisher(u, C[groups == picks[j - 1]], S))
        score = ref_scores("active", C, u, S, groups)
        assert score[pick] >= np.delete(score, picks[:j]).max() - 1e-6, (j, pick)


def test_uncertainty_and_variance_are_not_the_active_rule():
    """On one pool the three rules ask different first questions (each the argmax of its own reference score), so
    swapping two of them changes the choice."""
    _, _, X, y = planted_candidates(8, 80)
    known = X[:5] * y[:5, None]
    u, Sigma = ref_posterior(known, 5)
    firsts = {rule: select_comparisons(X[5:], 1, rule=rule, known=known)[0]
              for rule in ("active", "uncertainty", "variance")}
    for rule, pick in firsts.items():
        assert pick == int(np.argmax(ref_scores(rule, X[5:], u, Sigma)))
    assert len(set(firsts.values())) == 3, firsts


def test_stopping_rule():
    """choose_shots with stop_below asks exactly the prefix of the full run before the best remaining information
    first falls below the threshold (what stop_points says from the full trace); a batch stops the same way, and so
    does PersonalizedReward.suggest (none at all above the largest information)."""
    _, _, X, y = planted_candidates(9, 60)
    full, info = choose_shots(X, 40, lambda r: y[r], "active", return_information=True)
    assert len(full) == len(info) == 40
    assert selection.stop_points([0.5, 0.2, 0.1], 3, [0.6, 0.3, 0.15, 0.05]) == [1, 1, 2, 3]  # at least one asked
    for first in (4, 13, 25):  # thresholds that let at least `first` questions through
        threshold = min(info[:first]) - 1e-9
        asked, trace = choose_shots(X, 40, lambda r: y[r], "active", stop_below=threshold,
                                          return_information=True)
        n = selection.stop_points(info, 40, [threshold])[0]
        assert n >= first and asked == full[:n] and trace == info[:n + 1]
        assert min(trace[:n]) >= threshold and (n == 40 or trace[n] < threshold)
    known = X[:5] * y[:5, None]
    _, gain = select_comparisons(X, 10, known=known, exclude=range(5), return_information=True)
    assert all(a >= b for a, b in zip(gain, gain[1:]))  # greedy: the best remaining information never grows
    threshold = 0.5 * (gain[4] + gain[5])
    picks, stopped = select_comparisons(X, 10, known=known, exclude=range(5), stop_below=threshold,
                                              return_information=True)
    assert gain[4] > gain[5] and len(picks) == 5 and stopped == gain[:6]
    V = torch.randn(16, 5, dtype=torch.float64)
    rm = utils.PersonalizedReward(V, model_name=None)
    D = torch.as_tensor(X[:30]) @ torch.linalg.pinv(rm.V.double())  # D V = X[:30]
    threshold = select_comparisons((D @ rm.V.double()).numpy(), 10, return_information=True)[1][3] - 1e-9
    assert rm.suggest(D, 10, stop_below=threshold) == \
        select_comparisons((D @ rm.V.double()).numpy(), 10, stop_below=threshold)
    assert 4 <= len(rm.suggest(D, 10, stop_below=threshold)) < 10
    assert rm.suggest(D, 3, answered={0: 1}, stop_below=10.0) == []


def test_bad_indices_and_rules_are_input_errors():
    _, _, X, _ = planted_candidates(10, 12)
    for bad in ([-1], [12], [1.5], [True]):
        with pytest.raises(utils.InputError, match="exclude"):
            select_comparisons(X, 1, exclude=bad)
    with pytest.raises(utils.InputError, match=r"exclude: 3 .*\[0, 3\)"):
        select_comparisons(X, 1, groups=np.repeat(np.arange(3), 4), exclude=[3])
    for groups in (np.repeat([-1, 0, 1], 4), np.repeat([0.0, 1.0, 2.0], 4), np.arange(5)):
        with pytest.raises(utils.InputError, match="groups"):
            select_comparisons(X, 1, groups=groups)
    with pytest.raises(utils.InputError, match="longest.*groups"):
        select_comparisons(X, 1, rule="longest")
    with pytest.raises(utils.InputError, match="stop_below"):
        select_comparisons(X, 1, stop_below=-1.0)
    rm = utils.PersonalizedReward(torch.eye(5), model_name=None)
    with pytest.raises(utils.InputError, match="answered"):
        rm.suggest(torch.as_tensor(X), 1, answered={-1: 1})


# --- what the rules buy, and that they never peek ---

def test_active_selection_needs_fewer_answers_than_random():
    """Planted w, 300 candidates with Bradley-Terry answers, 10 seeds: answers until w, fit by the few-shot step
    (PersonalizeBatch, 500 steps, lr 0.1) on the answers so far, orders 90% of 3,000 held-out comparisons as the
    planted w does (31 if never within 30). Asserted: active needs at least 5 fewer answers than random on
    average, and fewer on at least 7 of the 10 seeds."""
    budget, need, rows = 30, {"random": [], "active": []}, []
    held = []
    for seed in range(10):
        rng, w, X, y = planted_candidates(seed, 300)
        H = rng.normal(0, 1000, (3000, 5))
        held.append((H, np.sign(H @ w)))
        for rule in need:
            order = (rng.permutation(300)[:budget] if rule == "random" else
                     choose_shots(X, budget, lambda r: y[r], "active"))
            rows += [torch.tensor(X[order[:t]] * y[order[:t], None]) for t in range(1, budget + 1)]
    W = utils.personalize_users(utils.Pairs.from_list(rows), torch.eye(5)).double().numpy().reshape(10, 2, budget, 5)
    for seed, (H, truth) in enumerate(held):
        for r, rule in enumerate(need):
            agree = (np.sign(H @ W[seed, r].T) == truth[:, None]).mean(0)
            need[rule].append(int(np.argmax(agree >= 0.9)) + 1 if (agree >= 0.9).any() else budget + 1)
    active, random_ = np.array(need["active"]), np.array(need["random"])
    assert active.mean() + 5 <= random_.mean() and (active < random_).sum() >= 7, need  # measured: 6.0 vs 17.3, 9/10


@pytest.mark.parametrize("rule", ["uncertainty", "active", "variance"])
def test_selection_never_repeats_nor_reads_unanswered_labels(rule):
    rng, _, X, y = planted_candidates(1, 40)
    asked = []

    def answer(rows):
        asked.extend(rows.tolist())
        return y[rows]
    chosen = choose_shots(X, 40, answer, rule)  # the whole pool: each candidate once, answered once
    assert sorted(chosen) == list(range(40)) and asked == chosen
    hidden = y.copy()
    hidden[chosen[12:]] = rng.permutation(hidden[chosen[12:]]) * rng.choice([-1, 1], 28)  # shuffle the unanswered
    assert choose_shots(X, 12, lambda r: hidden[r], rule) == chosen[:12]
    # groups (dialogs): a unit's rows are answered together, units are never repeated
    groups = np.repeat(np.arange(10), 4)
    units = choose_shots(X, 10, lambda r: y[r], rule, groups=groups)
    assert sorted(units) == list(range(10))
    with pytest.raises(utils.InputError, match="k=2"):
        select_comparisons(X[:3], 2, rule=rule, exclude=[0, 2])
    picks = select_comparisons(X, 10, rule=rule, exclude=chosen[:12])  # k > 1: distinct, none asked before
    assert len(set(picks)) == 10 and not set(picks) & set(chosen[:12])
    # in the pipeline, a pair's stored orientation is its answer: flipping the pairs not asked changes nothing
    pool = utils.Pairs(torch.arange(2).repeat_interleave(20), 2, diffs=torch.tensor(X))
    units = shot_units(pool, np.tile(np.repeat(np.arange(5), 4), 2))
    chosen = select_shots(pool, units, [0, 1], 3, rule, seed=2)
    flipped = pool.diffs.clone()
    for u in (0, 1):
        for c in set(range(5)) - set(chosen[u]):
            flipped[units[u][c]] *= -1
    assert select_shots(utils.Pairs(pool.user, 2, diffs=flipped), units, [0, 1], 3, rule, seed=2) == chosen


def test_longest_asks_the_dialogs_with_most_pairs_first():
    """select_shots with "longest": a user's dialogs in decreasing number of pairs (ties at random, seeded)."""
    _, _, X, _ = planted_candidates(11, 30)
    sizes = [1, 4, 2, 4, 3, 1, 5, 2, 3, 5]  # one user, ten dialogs
    pool = utils.Pairs(torch.zeros(30, dtype=torch.long), 1, diffs=torch.tensor(X))
    units = shot_units(pool, np.repeat(np.arange(10), sizes))
    for seed in (0, 1, 2):
        order = select_shots(pool, units, [0], 10, "longest", seed=seed)[0]
        assert [sizes[c] for c in order] == sorted(sizes, reverse=True)


# --- the pipeline: seeds, per-user numbers, the same users' reference, pair budgets, the stopping rule ---

def planted_dialogs(seed, num_users, dialogs_per_user, test_pairs=0, F_dim=12, rank=3):
    """Users with w* on the simplex over a basis V* [F, rank] (the same V* for every seed); each has dialogs of 1-4
    pairs (dialogs_per_user: a count, or one per user) and `test_pairs` pairs, all oriented by d^T V* w*
    -> (Pairs, the dialog of every pair, test Pairs)."""
    counts = [dialogs_per_user] * num_users if isinstance(dialogs_per_user, int) else dialogs_per_user
    V = np.random.default_rng(0).normal(size=(F_dim, rank))
    rng = np.random.default_rng(seed)
    rows, user, dialog, test = [], [], [], []
    for u in range(num_users):
        w = rng.dirichlet(np.full(rank, 0.3))
        for d in range(counts[u]):
            D = rng.normal(size=(rng.integers(1, 5), F_dim))
            rows.append(D * np.sign(D @ V @ w)[:, None])
            user += [u] * len(D)
            dialog += [u * 100 + d] * len(D)
        T = rng.normal(size=(test_pairs, F_dim))
        test.append(torch.tensor(T * np.sign(T @ V @ w)[:, None], dtype=torch.float32))
    pool = utils.Pairs(torch.tensor(user), num_users, diffs=torch.tensor(np.concatenate(rows), dtype=torch.float32))
    return pool, np.array(dialog), utils.Pairs.from_list(test) if test_pairs else None


def small_shots(seed, rules, **kw):
    """vary_shots on 12 seen and 5 unseen planted users with 5, 5, 3, 4, 5 dialogs (K = 3, 2 trials, 1, 2, 5 dialogs:
    two users are left out at 5)."""
    train, _, _ = planted_dialogs(seed, 12, 6)
    pool, dialogs, test = planted_dialogs(seed + 100, 5, [5, 5, 3, 4, 5], test_pairs=30)
    return utils.vary_shots(2, [0.0], [3], [1, 2, 5], train, pool, test, torch.randn(12, 1), 12, 5, "cpu",
                            num_iterations=40, fewshot_iterations=30, seed=seed, shot_selection=rules,
                            full_pool=True, shot_groups=dialogs, **kw)


def test_vary_shots_keeps_per_user_numbers_and_the_stopping_rule():
    """Per-user accuracies average to the curves; the answered comparisons are the dialogs' pairs ("longest" asks at
    least as many as any rule with the same dialog count); a pair budget answers exactly P comparisons; the stopping
    rule asks fewer answers at a larger threshold, never more than the budget, at least one."""
    res = small_shots(0, ["random", "active", "longest"], pair_budgets=[2, 6], stop_thresholds=[0.5, 0.05])
    for rule in res.rules:
        for j in range(3):
            users = ~np.isnan(res.user_acc[rule][0, 0, j])
            assert abs(res.user_acc[rule][0, 0, j][users].mean() - res.acc[rule][2, 0, 0, j]) < 1e-6
    assert (res.pairs_asked["longest"][0, 0, 0] >= res.pairs_asked["active"][0, 0, 0]).all()
    assert abs(np.nanmean(res.full_pool_users[0, 0]) - res.full_pool[2, 0, 0]) < 1e-6
    assert set(res.budget_acc) == {"random", "active", "longest"} and res.budget_acc["active"].shape == (1, 1, 2, 5)
    units = [[torch.arange(3), torch.arange(3, 7)], [torch.arange(7, 8), torch.arange(8, 10)]]
    pool = utils.Pairs(torch.tensor([0] * 7 + [1] * 3), 2, diffs=torch.randn(10, 4))
    from lorelib.study import _stack
    stacked = _stack(pool, units, [0, 1], [[1, 0], [0, 1]], budget=3)
    assert stacked.counts().tolist() == [3, 3] and torch.equal(stacked.diffs[:3], pool.diffs[3:6])
    stop = res.stopping[(0.0, 3)]
    assert (stop["asked"][0] <= stop["asked"][1]).all() and (stop["asked"] <= stop["budget"]).all()
    assert (stop["asked"] >= 1).all() and stop["budget"].tolist() == [5, 5, 3, 4, 5]
    assert np.isnan(res.user_acc["active"][0, 0, 2]).tolist() == [False, False, True, True, False]
    pool, _, test = planted_dialogs(0, 4, 2, test_pairs=3)
    with pytest.raises(utils.InputError, match="longest"):  # single pairs: no dialogs to order
        utils.vary_shots(1, [0.0], [2], [1], pool, pool, test, torch.randn(12, 1), 4, 4, "cpu",
                         shot_selection=["random", "longest"])


def test_stratified_and_paired_intervals_by_hand():
    """Two seeds: users [1, 2, 3] and [4, 6] (NaN dropped): the mean over seeds of the means is 3.5 and the variance
    of that mean (1/4)(1/3 + 2/2) = 1/3. Paired: the interval of the per-user differences, narrower than either."""
    a = [np.array([1.0, 2.0, 3.0, np.nan]), np.array([4.0, 6.0])]
    mean, half = intervals.stratified_mean(a)
    assert mean == 3.5 and half == pytest.approx(intervals.Z95 * np.sqrt(1 / 3), rel=1e-12)
    b = [np.array([0.5, 1.7, 2.4, np.nan]), np.array([3.1, 5.3])]  # differences 0.5, 0.3, 0.6 and 0.9, 0.7
    d, d_half = intervals.paired_difference(a, b)
    var = (np.var([0.5, 0.3, 0.6], ddof=1) / 3 + np.var([0.9, 0.7], ddof=1) / 2) / 4
    assert d == pytest.approx((0.4666666666666667 + 0.8) / 2, rel=1e-12)
    assert d_half == pytest.approx(intervals.Z95 * np.sqrt(var), rel=1e-12) and d_half < half / 5
    assert np.isnan(intervals.stratified_mean([np.array([np.nan])])[0])


def test_intervals_edge_cases_and_the_normal_quantile():
    """Z95 is the 97.5% quantile of the standard normal (the test above reads it from the module). A seed with one
    user counts in the mean, but its variance is unknown: the half-width is NaN, without a NumPy warning. float32
    per-user values are averaged in float64 (the same numbers as the values widened first; float32 sums differ)."""
    assert 0.5 * math.erfc(-intervals.Z95 / math.sqrt(2)) == pytest.approx(0.975, abs=1e-15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no variance (ddof 1) of a single value
        mean, half = intervals.stratified_mean([np.array([1.0, 2.0]), np.array([5.0, np.nan])])
    assert mean == 3.25 and np.isnan(half)
    a = [np.array([0.1, 0.2, 0.4, np.nan], np.float32), np.array([0.3, 0.9], np.float32)]
    assert intervals.stratified_mean(a) == intervals.stratified_mean([v.astype(np.float64) for v in a])


def test_report_over_seeds_pairs_users_and_matches_the_reference_users(tmp_path):
    """report_shots over two seeds: each point's mean, interval and difference from random are intervals.* of the
    per-user numbers; the whole-pool reference of a point averages the same users only."""
    runs = [small_shots(s, ["random", "active"], pair_budgets=[3]) for s in (0, 1)]
    report_shots(runs, {"seeds": [0, 1]}, tmp_path, "cmp", "test")
    out = json.loads((tmp_path / "cmp.json").read_text())
    assert out["seeds"] == [0, 1] and (tmp_path / "cmp.png").is_file()
    for j, entry in enumerate(out["results_by_selection"]["active"]):
        acc = [r.user_acc["active"][0, 0, j] for r in runs]
        mean, half = intervals.stratified_mean(acc)
        assert entry["unseen_test"]["mean"] == pytest.approx(mean) and \
            entry["unseen_test"]["ci95"] == pytest.approx([mean - half, mean + half])
        d, dh = intervals.paired_difference(acc, [r.user_acc["random"][0, 0, j] for r in runs])
        assert entry["vs_random"]["ci95"] == pytest.approx([d - dh, d + dh])
        ref = np.mean([np.nanmean(np.where(np.isnan(a), np.nan, r.full_pool_users[0, 0])) for a, r in zip(acc, runs)])
        assert entry["full_pool_same_users"] == pytest.approx(ref) and entry["users"] == (10 if j < 2 else 6)
    assert [e["pairs"] for e in out["results_by_answered_pairs"]["active"]] == [3]


def test_published_vary_shots_layout_with_several_rules():
    """utils.run_few_shot_vary_shots keeps its published layouts: the random entry of a list of rules equals the
    published call; the rules are deterministic (std 0); an unknown rule is an InputError naming them."""
    train, _, _ = planted_dialogs(7, 12, 4)
    pool, _, test = planted_dialogs(8, 4, 3, test_pairs=20)
    args = (2, [0], [2], [2, 4], train, pool, test, torch.randn(12, 1), 12, 4, "cpu")
    kw = dict(num_iterations=60, fewshot_iterations=50, seed=3, return_skipped=True)
    published = utils.run_few_shot_vary_shots(*args, **kw)
    out, skipped = utils.run_few_shot_vary_shots(*args, **kw, shot_selection=["random", "uncertainty", "active",
                                                                              "variance"])
    assert all(np.array_equal(a, b) for a, b in zip(out["random"], published[:4])) and skipped == published[4]
    for rule in ("uncertainty", "active", "variance"):  # deterministic: one run, std 0
        assert np.isfinite(out[rule][2]).all() and (out[rule][1] == 0).all() and (out[rule][3] == 0).all()
    assert len(out["full_pool"]) == 4 and out["full_pool"][2].shape == (1,)
    with pytest.raises(utils.InputError, match="'greedy'.*one of random, uncertainty, active, variance, longest"):
        utils.run_few_shot_vary_shots(*args, **kw, shot_selection=["random", "greedy"])
