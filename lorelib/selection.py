"""Which comparisons to ask a new user (the published protocol draws them at random).

With V frozen a new user is K numbers, so a candidate matters only through x = (e_a - e_b)^T V [K] (the pool is
projected once). The rules see x in either orientation and the answers so far, never those of unasked candidates:
  "uncertainty"  the answer predicted nearest 50/50;
  "active"       the largest expected information about the user's weights (BALD) under a Laplace posterior.

Imports: config, model.
"""
import functools

import numpy as np
import torch

from .config import InputError, check_value
from .model import LOGIT_SCALE

PRIOR_SCALE = 3.0  # s: the prior N(0, s^2 I) of a new user's K logits u (w = softmax(u)) in laplace_posterior


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


def _posterior_terms(u, X, prior_prec):
    """(-log posterior, gradient, Gauss-Newton Hessian, exact Hessian) of laplace_posterior at u [K], prior_prec =
    I / s^2. The exact Hessian adds -sum_i sigmoid(-z_i) d2z_i/du2, where d2z_i/du2 = diag(g_i) - g_i w^T - w g_i^T."""
    w, z, G = _logits_and_grads(X, u)
    rg = _sigmoid_np(-z) @ G
    H_gn = (G * (_sigmoid_np(-z) * _sigmoid_np(z))[:, None]).T @ G + prior_prec
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


def comparison_scores(X, u, Sigma, rule="active"):
    """[n] value of asking each candidate X [n, K] (rows x = d^T V, either orientation: both scores are even in x)
    under the posterior N(u, Sigma) of laplace_posterior, with w = softmax(u) and z = x^T w / 100:
      "uncertainty": h(sigmoid(z)), the entropy of the predicted answer: largest where it is nearest 0.5;
      "active": the expected information gain of the answer about u (BALD), with z linearised around u so that
          z ~ N(x^T w / 100, g^T Sigma g), g = w * (x - x^T w) / 100:  I = h(E[sigmoid(z)]) - E[h(sigmoid(z))]."""
    _, z, G = _logits_and_grads(X, u)
    if rule == "uncertainty":
        return _entropy_np(_sigmoid_np(-np.abs(z)))
    return expected_information(z, np.maximum(((G @ Sigma) * G).sum(1), 0.0))


def select_comparisons(X, k=1, *, rule="active", known=None, exclude=(), groups=None, prior_scale=PRIOR_SCALE):
    """The k candidates to ask next, best first -> list of k candidate (unit) indices.
    X [n, K]: the candidates projected once, x = (e_a - e_b)^T V, in either orientation. groups [n]: the unit of each
    row, 0..U-1 (e.g. a dialog, whose answer reveals all its pairs; None: each row its own), scored by the sum over
    its rows. known [m, K]: the answers so far, rows preferred minus other; exclude: units already asked (never
    returned). Scores: comparison_scores under laplace_posterior(known); ties go to the lowest index. k > 1 with
    "active" is greedy: after each pick Sigma^-1 gains the unit's expected Fisher information sum_i lam_i g_i g_i^T
    (it does not depend on the answers) and the rest are rescored."""
    check_value("selection", rule)
    X = np.asarray(X, dtype=np.float64)
    groups = np.arange(len(X)) if groups is None else np.asarray(groups)
    if X.ndim != 2 or not np.isfinite(X).all() or groups.shape != (len(X),):
        raise InputError(f"candidates must be a finite [n, K] array with one group id per row, got {X.shape}")
    free = np.ones(int(groups.max()) + 1 if len(groups) else 0, dtype=bool)
    free[np.asarray(list(exclude), dtype=np.int64)] = False
    if not 1 <= k <= free.sum():
        raise InputError(f"k={k}: must lie in [1, {free.sum()}], the candidates not yet asked")
    u, Sigma = laplace_posterior(np.zeros((0, X.shape[1])) if known is None else known, prior_scale)
    picks = []
    for _ in range(k):
        score = np.where(free, np.bincount(groups, comparison_scores(X, u, Sigma, rule), len(free)), -np.inf)
        picks.append(int(np.argmax(score)))
        free[picks[-1]] = False
        if rule == "active" and len(picks) < k:
            _, z, G = _logits_and_grads(X[groups == picks[-1]], u)
            Sigma = np.linalg.inv(np.linalg.inv(Sigma) + (G * (_sigmoid_np(z) * _sigmoid_np(-z))[:, None]).T @ G)
    return picks


def choose_shots(X, shots, answer, rule="active", *, groups=None, prior_scale=PRIOR_SCALE):
    """Ask `shots` units one at a time (select_comparisons, the posterior refit after each answer) -> the unit indices
    in the order asked; X, groups as there. answer(rows) -> [len(rows)] +1 (side a preferred) or -1, called with the
    rows of the unit just asked only. The first n choices do not depend on `shots` (a larger count extends them)."""
    X = np.asarray(X, dtype=np.float64)
    groups = np.arange(len(X)) if groups is None else np.asarray(groups)
    asked, known = [], np.zeros((0, X.shape[1]))
    for _ in range(shots):
        asked += select_comparisons(X, 1, rule=rule, known=known, exclude=asked, groups=groups,
                                    prior_scale=prior_scale)
        rows = np.flatnonzero(groups == asked[-1])
        y = np.asarray(answer(rows), dtype=np.float64).reshape(-1)
        if y.shape != rows.shape or not np.isin(y, (-1, 1)).all():
            raise InputError(f"answer(rows) must give one +1 or -1 per row ({len(rows)}), got {y!r:.100}")
        known = np.concatenate([known, X[rows] * y[:, None]])
    return asked

