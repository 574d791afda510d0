"""The few-shot selection study: instead of random draws, each unseen user's examples are asked one at a time by a
selection rule (selection.choose_shots: "active", "uncertainty", the yardsticks "variance" and "longest") on a
Laplace posterior over its weights, which needs a method with such a posterior (Method.posterior_features: LoRe).
Beside the rules: the whole-pool reference (w fit on the user's whole pool), the rules at exactly P answered
comparisons (pair budgets, grouped examples), and the stopping rule for a live user (ask until the best remaining
expected information falls below a threshold).

Imports: config, data, selection.
"""
import numpy as np
import torch

from .config import InputError
from .data import Pairs
from .selection import choose_shots, stop_points


def select_shots(pool, units, users, shots, rule, seed=0, return_information=False):
    """Per user u of `users`, its first min(shots, len(units[u])) examples asked by `rule` (choose_shots) -> lists of
    indices into units[u]. pool: rows d^T V stored chosen minus rejected, the simulated user's answers: the rule sees
    each row in a random orientation and the units in a random order (ties, e.g. dialogs of equal length, fall at
    random), both from np.random.RandomState(seed * 100003 + u); only asked rows are answered.
    return_information: (choices, traces), traces[i] choose_shots' best remaining expected information per question."""
    XV = pool.dense().double().numpy()
    out, traces = [], []
    for u in users:
        rng = np.random.RandomState(seed * 100003 + u)
        flip = rng.choice([-1.0, 1.0], sum(len(r) for r in units[u]))
        order = rng.permutation(len(units[u]))
        rows = torch.cat([units[u][c] for c in order]).numpy()
        sizes = [len(units[u][c]) for c in order]
        groups = None if max(sizes) == 1 else np.repeat(np.arange(len(order)), sizes)
        asked = choose_shots(XV[rows] * flip[:, None], min(shots, len(order)), lambda r: flip[r], rule,
                             groups=groups, return_information=return_information)
        if return_information:
            asked, info = asked
            traces.append(info)
        out.append([int(order[p]) for p in asked])
    return (out, traces) if return_information else out


def projected_pool(model, pool):
    """pool as Pairs of its posterior features (d^T V [M, K]): what the selection rules see. InputError when the
    method has no posterior over a new user's weights."""
    X = model.posterior_features(pool)
    if X is None:
        raise InputError(f"{model.label} has no posterior over a new user's weights: the selection rules run on LoRe")
    return Pairs(pool.user, pool.num_users, diffs=X)


def _stack(pool, units, users, orders, counts=None, budget=None):
    """One Pairs of each user's examples in orders[i]: the first counts[i] of them, or the first `budget`
    comparisons (the last example cut short): user i is users[i]."""
    rows = [torch.cat([units[u][c] for c in (orders[i] if counts is None else orders[i][:counts[i]])])[:budget]
            for i, u in enumerate(users)]
    owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(r) for r in rows]))
    return pool.select(torch.cat(rows), owner, len(rows))


def stopping(model, pool, test, units, users, chosen, traces, thresholds, device=None):
    """The stopping rule on the active choices: per threshold, each user of `users` answers until the best remaining
    expected information falls below it (stop_points, at most its asked examples); w fit on those answers.
    -> {"thresholds", "asked" [T, U], "pairs" [T, U], "acc" [T, U], "budget" [U], "budget_pairs" [U],
    "acc_budget" [U], "users" [U]} (test accuracy; pairs: the comparisons in the units asked)."""
    caps = [len(c) for c in chosen]
    counts = [stop_points(info, cap, thresholds) for info, cap in zip(traces, caps)]
    per = [[c[t] for c in counts] for t in range(len(thresholds))] + [caps]
    stacked = [_stack(pool, units, users, chosen, counts=n) for n in per]
    test_u = test.select_users(users)
    acc = [model.accuracies(test_u, model.personalize(p, device), device) for p in stacked]
    pairs = [p.counts().numpy() for p in stacked]
    return {"thresholds": list(thresholds), "users": list(users), "asked": np.array(per[:-1]),
            "pairs": np.array(pairs[:-1]), "acc": np.array(acc[:-1]), "budget": np.array(caps),
            "budget_pairs": pairs[-1], "acc_budget": acc[-1]}


def full_pool(model, pool, test, units, device=None):
    """(fs [4] few-shot and test accuracy mean and std over users, test accuracy [C] per user, NaN without a pool)
    with w fit on each user's whole few-shot pool: the reference the rules approach."""
    users = [u for u in range(len(units)) if len(units[u])]
    whole = pool.select_users(users)
    state = model.personalize(whole, device)
    fs, ts = model.accuracies(whole, state, device), model.accuracies(test.select_users(users), state, device)
    per_user = np.full(pool.num_users, np.nan)
    per_user[users] = ts
    return np.array([fs.mean(), fs.std(), ts.mean(), ts.std()]), per_user


def pair_budgets(model, pool, test, units, has, orders, budgets, trials, seed, device=None, log=print):
    """Every rule at exactly P answered comparisons for each P of `budgets`: a rule's units in its order (orders
    {rule: {user: units in order}}, None for random: a fresh order per trial and user,
    np.random.default_rng([seed, trial, user])), the last one cut short; the users of `has` whose units asked by
    every rule hold at least P comparisons. -> {rule: [B, C]} unseen-test accuracy (mean over trials)."""
    out = {rule: np.full((len(budgets), pool.num_users), np.nan) for rule in orders}
    for b, budget in enumerate(budgets):
        limit = [min((sum(len(units[u][c]) for c in o[u]) for o in orders.values() if o is not None),
                     default=len(torch.cat(units[u]))) for u in has]
        users = [u for u, n in zip(has, limit) if n >= budget]
        if not users:
            continue
        test_u = test.select_users(users)
        for rule, order in orders.items():
            n_trials = trials if order is None else 1
            runs = [[np.random.default_rng([seed, t, u]).permutation(len(units[u])) for u in users]
                    if order is None else [order[u] for u in users] for t in range(n_trials)]
            state = model.personalize(_stack(pool, units, users * n_trials, sum(runs, []), budget=budget), device)
            out[rule][b, users] = np.mean([model.accuracies(test_u, state[t * len(users):(t + 1) * len(users)],
                                                            device) for t in range(n_trials)], 0)
        log(f"{budget} answered comparisons ({len(users)} users): " + ", ".join(
            f"{rule} {np.nanmean(out[rule][b]):.4f}" for rule in orders))
    return out

