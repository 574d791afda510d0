"""The paper's few-shot protocol, for any Method: a new user's accuracy against the number of its few-shot examples.

For each shot count and each of `trials` random draws, every unseen user with enough examples gets `shots` random
examples of its few-shot pool, is personalized from them by the fitted method, and is scored on its test pairs;
users with fewer examples are skipped for that count. An example (a unit) is one pair, or with shot groups
(PRISM's dialogs) every pair of one group. Every method sees the same draws (stack_trials).

    units = shot_units(data.unseen_fewshot)
    curve = fewshot_curve(model.fit(data.seen_train), data.unseen_fewshot, data.unseen_test, units, [1, 5], 5)
    curve.acc[2]        # [S] unseen-test accuracy, mean over trials of the mean over users

Imports: config.
"""
import dataclasses

import numpy as np
import torch

from .config import note_finished


@dataclasses.dataclass
class Curve:
    """fewshot_curve's result for shot counts num_shots [S].

    acc [4, S]: few-shot train accuracy mean and std over trials, unseen-test accuracy mean and std over trials
    (each trial's value is the mean over its users); NaN where no user has enough examples. user_acc [S, C]: each
    user's unseen-test accuracy (mean over trials; NaN: not in the point); pairs_asked [S, C]: the comparisons in
    its shots (mean over trials). skipped [S]: users with fewer examples than shots."""
    num_shots: list
    acc: np.ndarray
    user_acc: np.ndarray
    pairs_asked: np.ndarray
    skipped: list


def shot_units(pool, shot_groups=None):
    """Each user's few-shot examples: per user of `pool` (Pairs), a list of tensors of pair rows of `pool`,
    one per example: a single pair, or with shot_groups ([m] group id of every pair) all pairs of a group."""
    units = []
    for rows in pool.rows_by_user():
        if shot_groups is None:
            units.append(list(rows.split(1)))
        else:
            groups = torch.as_tensor(shot_groups)[rows]
            units.append([rows[groups == g] for g in torch.unique(groups)])
    return units


def stack_trials(pool, units, users, shots, trials, seed, chosen=None):
    """`shots` random examples of each of `users` in every trial, all in one Pairs of rows of `pool`:
    user t * len(users) + i is users[i] in trial t. Trial t draws with np.random.RandomState(seed * 100003 + t).
    chosen: per user of `users` its examples in the order asked (select_shots); the first `shots` are taken instead."""
    rows, owner = [], []
    for trial in range(trials):
        rng = np.random.RandomState(seed * 100003 + trial)
        for i, u in enumerate(users):
            picks = rng.choice(len(units[u]), shots, replace=False) if chosen is None else chosen[i][:shots]
            picked = torch.cat([units[u][c] for c in picks])
            rows.append(picked)
            owner.append(torch.full((len(picked),), trial * len(users) + i))
    return pool.select(torch.cat(rows), torch.cat(owner), trials * len(users))


def personalize_trials(model, stacked, trials, device=None):
    """[trials] states of the users of `stacked` (stack_trials' layout): one personalize call for all trials when the
    method fits each user alone (Method.independent_users), else one per trial."""
    n = stacked.num_users // trials
    if model.independent_users:
        state = model.personalize(stacked, device)
        return [state[t * n:(t + 1) * n] for t in range(trials)]
    return [model.personalize(stacked.select_users(range(t * n, (t + 1) * n)), device) for t in range(trials)]


def fewshot_curve(model, pool, test, units, num_shots, trials, seed=0, device=None, *, chosen=None, label="",
                  record=None, log=print):
    """The protocol for a fitted Method -> Curve. pool, test: the unseen users' few-shot and test Pairs; units:
    shot_units(pool). chosen: {user: its examples in the order a selection rule asked them} (one deterministic
    trial, the first `shots` of them) instead of random draws."""
    n_units = torch.tensor([len(u) for u in units])
    C = pool.num_users
    acc = np.full((4, len(num_shots)), np.nan)
    user_acc, pairs_asked = np.full((2, len(num_shots), C), np.nan)
    trials = 1 if chosen is not None else trials
    for j, shots in enumerate(num_shots):
        users = torch.nonzero(n_units >= shots).flatten().tolist()
        if not users:
            continue
        stacked = stack_trials(pool, units, users, shots, trials, seed, None if chosen is None else
                               [chosen[u] for u in users])
        states = personalize_trials(model, stacked, trials, device)
        test_u = test.select_users(users)
        n = len(users)
        fs = [model.accuracies(stacked.select_users(range(t * n, (t + 1) * n)), s, device).mean()
              for t, s in enumerate(states)]
        accs = [model.accuracies(test_u, s, device) for s in states]
        ts = [a.mean() for a in accs]
        acc[:, j] = np.mean(fs), np.std(fs), np.mean(ts), np.std(ts)
        user_acc[j, users] = np.mean(accs, 0)
        pairs_asked[j, users] = stacked.counts().reshape(trials, n).double().mean(0).numpy()
        note_finished(record, f"{label} shots={shots}")
        log(f"{label} shots={shots}: few-shot train {acc[0, j]:.4f}, unseen test {acc[2, j]:.4f} "
            f"+- {acc[3, j]:.4f} ({n} users, {trials} trials)")
    return Curve(list(num_shots), acc, user_acc, pairs_asked, [int((n_units < s).sum()) for s in num_shots])
