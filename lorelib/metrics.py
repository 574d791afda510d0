"""The metrics of a pair set, one function each, registered in PAIR_METRICS: every method is scored with every one
of them on every pair set (evaluate.py), and every script's table and results JSON show them. A metric is a
function (margins [M], user [M], num_users) -> [C] per-user value; "accuracy" (a tie is wrong, as published) is the
headline and is reported as the set's "mean" and "std" over users, every other metric by its mean over users.
Choice quality (best-of-N among a prompt's candidates) has its own registry in choice.py.

To add a metric: one function here and one entry in PAIR_METRICS.

Imports: data.
"""
import torch

from .data import TIE_TOLERANCE, accuracy_by_user


def _per_user(values, user, num_users):
    """[C] mean of each user's values [M] (float32, as accuracy_by_user)."""
    counts = torch.bincount(user, minlength=num_users).float()
    return (torch.zeros(num_users).index_add_(0, user, values) / counts).numpy()


def ties_by_user(margins, user, num_users, tolerance=TIE_TOLERANCE):
    """[C] share of each user's pairs that are near-ties (|margin| <= tolerance)."""
    margins, user = margins.detach().float().cpu(), user.cpu()
    return _per_user((margins.abs() <= tolerance).float(), user, num_users)


def ties_half_by_user(margins, user, num_users, tolerance=TIE_TOLERANCE):
    """[C] accuracy with a near-tie counted half and a larger positive margin right: a model whose margins collapse
    to ties scores 0 under the tie-is-wrong accuracy and 1/2 here."""
    margins, user = margins.detach().float().cpu(), user.cpu()
    credit = (margins > tolerance).float() + 0.5 * (margins.abs() <= tolerance).float()
    return _per_user(credit, user, num_users)


PAIR_METRICS = {"accuracy": accuracy_by_user, "ties_half": ties_half_by_user, "ties": ties_by_user}
HEADLINE = "accuracy"


def pair_metrics(margins, pairs):
    """{metric: [C] per-user value} of every registered metric, for the margins [M] of the pairs `pairs`."""
    return {name: fn(margins, pairs.user, pairs.num_users) for name, fn in PAIR_METRICS.items()}
