"""Intervals over users and seeds: each seed (a fresh data draw, basis and users) is a stratum, its users the units.
A point's value is the mean over seeds of the mean over that seed's users; its 95% interval is that value
± 1.96 standard errors, with the variance (1 / S^2) sum_s var_s / n_s (var_s: the variance over the n_s users of
seed s, ddof 1). A comparison of two rules is paired: the same users, so the interval is that of the per-user
differences, which is far narrower than the two intervals side by side when users differ more than rules do.

Imports: nothing of lorelib.
"""
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
