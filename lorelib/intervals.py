"""Intervals over users and seeds: each seed (a fresh data draw, basis and users) is a stratum, its users the units.
A point's value is the mean over seeds of the mean over that seed's users; its 95% interval is that value
± 1.96 standard errors, with the variance (1 / S^2) sum_s var_s / n_s (var_s: the variance over the n_s users of
seed s, ddof 1). A comparison of two rules is paired: the same users, so the interval is that of the per-user
differences, which is far narrower than the two intervals side by side when users differ more than rules do.

Imports: nothing of lorelib.
"""
import math

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def stratified_mean(per_seed):
    """per_seed: a list of S arrays [n_s] of per-user values (NaN: the user is not in this point; dropped, and a seed
    without users with it) -> (mean over seeds of the mean over users, half-width of the 95% interval; NaN without
    users, half-width NaN where a seed has a single user)."""
    values = [np.asarray(v, dtype=np.float64) for v in per_seed]
    values = [v[~np.isnan(v)] for v in values]
    values = [v for v in values if len(v)]
    if not values:
        return float("nan"), float("nan")
    mean = float(np.mean([v.mean() for v in values]))
    if any(len(v) < 2 for v in values):
        return mean, float("nan")
    return mean, float(Z95 * np.sqrt(sum(v.var(ddof=1) / len(v) for v in values)) / len(values))


def paired_difference(a, b):
    """stratified_mean of the per-user differences a - b: a, b lists of S arrays [n_s] over the same users."""
    return stratified_mean([np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64) for x, y in zip(a, b)])


def _betacf(a, b, x, steps=200, eps=1e-15):
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, steps + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + num / c
            c = c if abs(c) > 1e-300 else 1e-300
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom (regularized incomplete beta)."""
    if t == 0:
        return 0.5
    x = df / (df + t * t)
    a, b = df / 2.0, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tail = front * _betacf(a, b, x) / a if x < (a + 1) / (a + b + 2) else 1.0 - front * _betacf(b, a, 1 - x) / b
    return 1.0 - 0.5 * tail if t > 0 else 0.5 * tail


def t_quantile(p, df):
    """The p-quantile of Student's t with df degrees of freedom (bisection on t_cdf)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values, level=0.95):
    """(mean, low, high): the mean of `values` (users or seeds; NaN dropped) and its Student-t interval; (mean, NaN,
    NaN) for a single value."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = t_quantile(0.5 + level / 2, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, m - half, m + half


def worst_share(values, share=0.1):
    """Mean of the lowest ceil(share * n) of `values` (the worst users; NaN dropped)."""
    v = np.sort(np.asarray(values, dtype=np.float64)[~np.isnan(np.asarray(values, dtype=np.float64))])
    return float(v[:max(1, math.ceil(share * len(v)))].mean()) if len(v) else float("nan")
