"""Which comparisons to ask a new user (the published protocol draws them at random).

With V frozen a new user is K numbers, so a candidate matters only through x = (e_a - e_b)^T V [K] (the pool is
projected once). A unit is what is asked at once: one comparison, or a group of them (a PRISM dialog, whose answer
reveals all its pairs). The rules see x in either orientation and the answers so far, never those of unasked units:
  "active"       the largest expected information about the user's weights under a Laplace posterior (unit_information:
                 BALD for single comparisons, 1/2 log det(I + Sigma G^T Lambda G) for a group);
  "uncertainty"  the answers predicted nearest 50/50 (the entropy of the predicted answers);
  "variance"     the largest predictive variance of the logits (a yardstick: the posterior's spread, no noise model);
  "longest"      the unit with the most comparisons (a yardstick for groups: ignores the model).
k > 1 picks greedily (every rule but "longest" sees each pick's expected Fisher information). A stopping rule
(stop_below) ends the questions once the best remaining expected information falls below a threshold.

Imports: config, model.
"""
import functools

import numpy as np
import torch

from .config import InputError, check_value
from .model import LOGIT_SCALE

PRIOR_SCALE = 3.0  # s: the prior N(0, s^2 I) of a new user's K logits u (w = softmax(u)) in laplace_posterior
SCORED_RULES = ("active", "uncertainty", "variance", "longest")  # the rules of select_comparisons


def _sigmoid_np(z):
    return np.exp(-np.logaddexp(0.0, -z))


def _entropy_np(p):  # binary entropy h(p) = -p log p - (1 - p) log(1 - p), nats
    return -(p * np.log(np.maximum(p, 1e-300)) + (1 - p) * np.log1p(-p))


def _logits_and_grads(X, u):
    """(w = softmax(u) [K], z = X w / 100 [n], G [n, K] rows g = dz/du = w * (x - x^T w) / 100) for rows X [n, K]."""
    w = np.exp(u - u.max())
    w /= w.sum()
    z = X @ w / LOGIT_SCALE
    return w, z, w * (X / LOGIT_SCALE - z[:, None])


def _fisher(G, z):
    """[K, K] Fisher information sum_i lam_i g_i g_i^T at the logits z [n] of rows with gradients G [n, K]
    (lam_i = sigmoid(z_i) sigmoid(-z_i))."""
    return (G * (_sigmoid_np(z) * _sigmoid_np(-z))[:, None]).T @ G


def _posterior_terms(u, X, prior_prec):
    """(-log posterior, gradient, Gauss-Newton Hessian, exact Hessian) of laplace_posterior at u [K], prior_prec =
    I / s^2. The exact Hessian adds -sum_i sigmoid(-z_i) d2z_i/du2, where d2z_i/du2 = diag(g_i) - g_i w^T - w g_i^T."""
    w, z, G = _logits_and_grads(X, u)
    rg = _sigmoid_np(-z) @ G
    H_gn = _fisher(G, z) + prior_prec
    H = H_gn - np.diag(rg) + rg[:, None] * w + w[:, None] * rg
    return np.logaddexp(0.0, -z).sum() + 0.5 * u @ prior_prec @ u, prior_prec @ u - rg, H_gn, H


def laplace_posterior(X, prior_scale=PRIOR_SCALE, max_steps=100):
    """Laplace posterior N(u_map, Sigma) of a new user's logits u [K] (w = softmax(u)) -> (u_map [K], Sigma [K, K])
    from the comparisons answered so far, X [m, K] rows d^T V oriented preferred minus other (m = 0: the prior).
    Model: u ~ N(0, s^2 I), P(answer | u) = sigmoid(z), z = x^T softmax(u) / 100 (the few-shot fit's likelihood).
    u_map: damped Newton from u = 0 (exact Hessian where positive definite, else Gauss-Newton; Armijo steps).
    Sigma = (I / s^2 + sum_i lam_i g_i g_i^T)^-1 at u_map, the Gauss-Newton precision, with g_i = dz_i/du =
    w * (x_i - x_i^T w) / 100 and lam_i = sigmoid(z_i) sigmoid(-z_i)."""
    X = np.asarray(X, dtype=np.float64).reshape(-1, np.shape(X)[-1])
    u, prior_prec = np.zeros(X.shape[1]), np.eye(X.shape[1]) / prior_scale ** 2
    loss, grad, H_gn, H = _posterior_terms(u, X, prior_prec)
    for _ in range(max_steps if len(X) else 0):
        try:
            np.linalg.cholesky(H)
        except np.linalg.LinAlgError:
            H = H_gn  # the exact Hessian is not positive definite here: a Gauss-Newton step
        step, t = np.linalg.solve(H, grad), 1.0
        while (new := _posterior_terms(u - t * step, X, prior_prec))[0] > loss - 1e-4 * t * (grad @ step):
            t /= 2  # Armijo backtracking; no decrease along the step: at the optimum up to round-off
            if t < 1e-10:
                return u, np.linalg.inv(H_gn)
        u, (loss, grad, H_gn, H) = u - t * step, new
        if np.abs(t * step).max() < 1e-8:
            break
    return u, np.linalg.inv(H_gn)


@functools.cache
def _logistic_mixture(J=10):
    """(a [J], b [J]): sigmoid'(z) ~ sum_j a_j b_j phi(b_j z), a scale mixture of normal densities fit by least
    squares on z in [-60, 60] (b_j geometric in [0.2, 1.5], sum(a) = 1). Integrating, sigmoid(z) ~ sum_j a_j Phi(b_j z)
    and, as d h(sigmoid(z))/dz = -z sigmoid'(z), h(sigmoid(z)) ~ sum_j (a_j / b_j) phi(b_j z), both within 1e-6."""
    b, z = np.geomspace(0.2, 1.5, J), np.linspace(-60.0, 60.0, 24001)
    a = np.linalg.lstsq(np.exp(-0.5 * np.outer(z, b) ** 2) * b / np.sqrt(2 * np.pi),
                        _sigmoid_np(z) * _sigmoid_np(-z), rcond=None)[0]
    return a / a.sum(), b


def expected_information(mu, var):
    """[n] mutual information I(y; z) = h(E[sigmoid(z)]) - E[h(sigmoid(z))] (nats) between y ~ Bernoulli(sigmoid(z))
    and z ~ N(mu, var), mu, var [n]; in closed form through _logistic_mixture, with c_j = (1 + b_j^2 var)^-1/2:
    E[sigmoid(z)] = sum_j a_j Phi(b_j c_j mu) and E[h(sigmoid(z))] = sum_j (a_j / b_j) c_j phi(b_j c_j mu)."""
    mix_a, mix_b = _logistic_mixture()  # fit once, at the first call
    c = 1.0 / np.sqrt(1.0 + np.outer(var, mix_b ** 2))
    x = c * np.outer(np.abs(mu), mix_b)  # h is symmetric, so |mu|: Phi(-x) is the smaller side, no cancellation
    p = torch.special.ndtr(torch.from_numpy(-x)).numpy() @ mix_a
    return np.maximum(_entropy_np(p) - (c * np.exp(-0.5 * x ** 2)) @ (mix_a / mix_b) / np.sqrt(2 * np.pi), 0.0)


def _row_variance(G, Sigma):
    """[n] predictive variance g^T Sigma g of each row's logit (linearised around u)."""
    return np.maximum(((G @ Sigma) * G).sum(1), 0.0)


def expected_curvature(mu, var):
    """[n] E[sigmoid(z) sigmoid(-z)], z ~ N(mu, var) (mu, var [n]): the Fisher information of an answer about its
    logit, averaged over the posterior's spread of the logit; in closed form through _logistic_mixture,
    sigmoid'(z) ~ sum_j a_j b_j phi(b_j z), so the expectation is sum_j a_j phi(mu / s_j) / s_j, s_j^2 = 1/b_j^2 + var.
    (At the posterior mean alone it vanishes for a confident prediction even when the logit is far from known.)"""
    mix_a, mix_b = _logistic_mixture()
    s = np.sqrt(1.0 / mix_b ** 2 + np.asarray(var, dtype=np.float64)[:, None])
    return (np.exp(-0.5 * (np.asarray(mu, dtype=np.float64)[:, None] / s) ** 2) / s) @ mix_a / np.sqrt(2 * np.pi)


def _expected_fisher(G, z, Sigma):
    """[K, K] sum_i lam_i g_i g_i^T with lam_i = expected_curvature(z_i, g_i^T Sigma g_i): the expected Fisher
    information of answering rows with logits z [n], gradients G [n, K] (it does not depend on the answers)."""
    return (G * expected_curvature(z, _row_variance(G, Sigma))[:, None]).T @ G


def comparison_scores(X, u, Sigma, rule="active"):
    """[n] value of asking each candidate X [n, K] (rows x = d^T V, either orientation: every score is even in x)
    under the posterior N(u, Sigma) of laplace_posterior, with w = softmax(u) and z = x^T w / 100:
      "uncertainty": h(sigmoid(z)), the entropy of the predicted answer: largest where it is nearest 0.5;
      "variance": g^T Sigma g, the predictive variance of z with z linearised around u, g = w * (x - x^T w) / 100;
      "active": the expected information gain of the answer about u (BALD), z ~ N(x^T w / 100, g^T Sigma g):
          I = h(E[sigmoid(z)]) - E[h(sigmoid(z))];
      "longest": 1 (a unit's score is its number of rows)."""
    _, z, G = _logits_and_grads(X, u)
    if rule == "uncertainty":
        return _entropy_np(_sigmoid_np(-np.abs(z)))
    if rule == "longest":
        return np.ones(len(z))
    var = _row_variance(G, Sigma)
    return var if rule == "variance" else expected_information(z, var)


def unit_information(X, u, Sigma, groups=None, num_units=None):
    """[U] expected information (nats) about u of asking each unit under N(u, Sigma). groups None: each row X [n, K]
    is a unit and this is its BALD (comparison_scores "active"). Else unit j, the rows R_j of groups [n] == j
    (U = num_units, default groups.max() + 1), scores its joint information 1/2 log det(I + Sigma G_j^T Lambda_j G_j),
    G_j [|R_j|, K] the rows' gradients g, Lambda_j = diag(lam_i), lam_i = expected_curvature(z_i, g_i^T Sigma g_i): the
    drop of the Gaussian posterior's entropy when its precision gains the unit's expected Fisher information (a unit
    of similar pairs is worth little more than one of them; the sum of their BALD would count each)."""
    if groups is None:
        return comparison_scores(X, u, Sigma, "active")
    groups = np.asarray(groups)
    _, z, G = _logits_and_grads(X, u)
    A = (G * np.sqrt(expected_curvature(z, _row_variance(G, Sigma)))[:, None]) @ np.linalg.cholesky(Sigma)
    order = np.argsort(groups, kind="stable")  # det(I + Sigma G^T Lambda G) = det(I + L^T G^T Lambda G L)
    present, starts = np.unique(groups[order], return_index=True)
    M = np.zeros((int(groups.max()) + 1 if num_units is None else num_units,) + Sigma.shape)
    M[present] = np.add.reduceat(A[order, :, None] * A[order, None, :], starts, axis=0)
    return 0.5 * np.linalg.slogdet(np.eye(len(Sigma)) + M)[1]


def _unit_scores(rule, X, u, Sigma, groups, U, var0):
    """[U] scores of every unit under N(u, Sigma): "active" unit_information, else the sum over the unit's rows of
    comparison_scores; "uncertainty" weighs each row's entropy by the share of its predictive variance that the greedy
    picks so far left, g^T Sigma g / var0 (var0: under the posterior of the answers, None before the first pick, where
    the share is 1; 1 where var0 = 0)."""
    if rule == "active":
        return unit_information(X, u, Sigma, groups, U)
    rows = comparison_scores(X, u, Sigma, rule)
    if rule == "uncertainty" and var0 is not None:
        var = _row_variance(_logits_and_grads(X, u)[2], Sigma)
        rows = rows * np.divide(var, var0, out=np.ones_like(var), where=var0 > 0)
    return rows if groups is None else np.bincount(groups, rows, U)


def _check_units(X, groups, exclude):
    """(X float64 [n, K], groups int [n] or None, U, free [U] bool) with InputError for a bad shape or index."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or not np.isfinite(X).all():
        raise InputError(f"candidates must be a finite [n, K] array, got shape {X.shape}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (len(X),) or (len(groups) and (groups.dtype.kind not in "iu" or groups.min() < 0)):
            raise InputError(f"groups must give one unit id (an integer >= 0) per candidate row ({len(X)}), "
                             f"got {groups!r:.100}")
    U = len(X) if groups is None else int(groups.max()) + 1 if len(groups) else 0
    free = np.ones(U, dtype=bool) if groups is None else np.bincount(groups, minlength=U) > 0
    for i in exclude:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < U:
            raise InputError(f"exclude: {i!r} is not a candidate index in [0, {U}); pass the indices of the units "
                             "already asked")
        free[i] = False
    return X, groups, U, free


def select_comparisons(X, k=1, *, rule="active", known=None, exclude=(), groups=None, prior_scale=PRIOR_SCALE,
                       stop_below=None, return_information=False):
    """The k units to ask next, best first -> list of unit indices (fewer when stop_below stops it).
    X [n, K]: the candidates projected once, x = (e_a - e_b)^T V, in either orientation. groups [n]: the unit of each
    row, 0..U-1 (e.g. a dialog, whose answer reveals all its pairs; None: each row its own). known [m, K]: the
    answers so far, rows preferred minus other; exclude: units already asked (never returned; an index outside
    [0, U) is an InputError). Scores: _unit_scores under laplace_posterior(known); ties go to the lowest index.
    k > 1 is greedy: after each pick Sigma^-1 gains the unit's expected Fisher information (_expected_fisher; it does
    not depend on the answers) and the rest are rescored, so a near-duplicate of a pick loses its value ("longest"
    ignores this).
    stop_below (nats): stop before a pick when the best remaining unit_information is below it (the stopping rule).
    return_information: also return info, the best remaining unit_information before each pick, plus, when
    stop_below stopped the list, the value that fell below it (len(info) = len(picks) + 1 then)."""
    check_value("rule", rule, "one of " + " ".join(SCORED_RULES))
    X, groups, U, free = _check_units(X, groups, list(exclude))
    if rule == "longest" and groups is None:
        raise InputError("rule='longest' orders units by their number of comparisons; it needs groups (e.g. the "
                         "dialog of every pair)")
    if not 1 <= k <= free.sum():
        raise InputError(f"k={k}: must lie in [1, {free.sum()}], the candidates not yet asked")
    if stop_below is not None:
        check_value("stop_below", stop_below, "> 0")
    u, Sigma = laplace_posterior(np.zeros((0, X.shape[1])) if known is None else known, prior_scale)
    var0 = _row_variance(_logits_and_grads(X, u)[2], Sigma) if rule == "uncertainty" and k > 1 else None
    picks, info = [], []
    for _ in range(k):
        if rule == "active" or stop_below is not None or return_information:
            gain = unit_information(X, u, Sigma, groups, U)
            info.append(float(gain[free].max()))
            if stop_below is not None and info[-1] < stop_below:
                break
        score = gain if rule == "active" else _unit_scores(rule, X, u, Sigma, groups, U, var0 if picks else None)
        picks.append(int(np.argmax(np.where(free, score, -np.inf))))
        free[picks[-1]] = False
        if rule != "longest" and len(picks) < k:
            _, z, G = _logits_and_grads(X[[picks[-1]]] if groups is None else X[groups == picks[-1]], u)
            Sigma = np.linalg.inv(np.linalg.inv(Sigma) + _expected_fisher(G, z, Sigma))
    return (picks, info) if return_information else picks


def choose_shots(X, shots, answer, rule="active", *, groups=None, prior_scale=PRIOR_SCALE, stop_below=None,
                 return_information=False):
    """Ask up to `shots` units one at a time (select_comparisons, the posterior refit after each answer) -> the unit
    indices in the order asked; X, groups as there. answer(rows) -> [len(rows)] +1 (side a preferred) or -1, called
    with the rows of the unit just asked only. The first n choices do not depend on `shots` (a larger count extends
    them). stop_below: stop once the best remaining expected information is below it (fewer than `shots` asked).
    return_information: (asked, info), info[t] the best remaining unit_information before question t (and, when
    stop_below stopped the questions, the value that fell below it)."""
    X = np.asarray(X, dtype=np.float64)
    asked, known, info = [], np.zeros((0, X.shape[1])), []
    trace = return_information or stop_below is not None
    for _ in range(shots):
        picks = select_comparisons(X, 1, rule=rule, known=known, exclude=asked, groups=groups,
                                   prior_scale=prior_scale, stop_below=stop_below, return_information=trace)
        if trace:
            picks, gain = picks
            info += gain
        if not picks:
            break
        asked += picks
        rows = np.flatnonzero(np.asarray(groups) == asked[-1]) if groups is not None else np.array(asked[-1:])
        y = np.asarray(answer(rows), dtype=np.float64).reshape(-1)
        if y.shape != rows.shape or not np.isin(y, (-1, 1)).all():
            raise InputError(f"answer(rows) must give one +1 or -1 per row ({len(rows)}), got {y!r:.100}")
        known = np.concatenate([known, X[rows] * y[:, None]])
    return (asked, info) if return_information else asked


def stop_points(info, budget, thresholds):
    """[T] how many units the stopping rule asks at each threshold: the first t < budget with info[t] (the best
    remaining expected information before question t, choose_shots' trace) below it, else budget; at least 1 (the
    first question is always asked). As the choices do not depend on the threshold, this equals running
    choose_shots with stop_below at each threshold (floored at 1)."""
    info = np.asarray(info[:budget], dtype=np.float64)
    out = []
    for t in thresholds:
        below = np.flatnonzero(info < t)
        out.append(max(1, int(below[0]) if len(below) else budget))
    return out
