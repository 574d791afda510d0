"""Pipelines: fit the basis for every (alpha, K) and evaluate seen and unseen users (fit_ranks), choose K on
held-out pairs of the seen users' training data (select_rank), and unseen-user accuracy against the number of
few-shot examples, drawn at random or asked by a selection rule (vary_shots). They return structured results
(RankResult, ShotsResult); utils.py turns them into the published return layouts.

Imports: config, data, model, selection.
"""
import dataclasses
import time

import numpy as np
import torch

from .config import InputError, check_value, check_values, note_finished, set_seed
from .data import RESULT_NAMES, Pairs, as_pairs, user_accuracies
from .model import LoRe, LoRe_regularized, personalize_users
from .selection import choose_shots


@dataclasses.dataclass
class RankResult:
    """fit_ranks' accuracies for every (alpha, K) of alpha_list x K_list.

    means, stds [4, A, K]: mean and std over users of the accuracy on the four pair sets (RESULT_NAMES: seen
    train, seen test, unseen few-shot, unseen test); models {(alpha, K): {"V" [F, K'], "W" [N, K'],
    "W_unseen" [N_unseen, K']}} (K' < K where LoRe_regularized dropped unused bases)."""
    K_list: list
    alpha_list: list
    means: np.ndarray
    stds: np.ndarray
    models: dict

    def published(self):
        """The published layout of run: 8 flat arrays [A * K], alpha-major: the 4 means, then the 4 stds."""
        return tuple(x.reshape(-1) for x in (*self.means, *self.stds))


@dataclasses.dataclass
class ShotsResult:
    """vary_shots' accuracies for every (alpha, K) and shot count of num_shots, per selection rule of `rules`.

    acc {rule: [4, A, K, S]}: few-shot train accuracy mean and std over trials, unseen-user test accuracy mean
    and std over trials (each trial's value is the mean over its users); NaN where no user has enough examples.
    full_pool [4, A, K] or None: the same four with w fit on each user's whole few-shot pool (mean and std over
    users). skipped [S]: users skipped at each shot count (fewer examples than shots)."""
    K_list: list
    alpha_list: list
    num_shots: list
    rules: list
    acc: dict
    full_pool: np.ndarray | None
    skipped: list


def _fit_basis(model_cls, K, V_final, alpha, pairs, *, num_iterations, learning_rate, device):
    """(W [C, K'], V [F, K']) for rank K: K = 0 is the reference head V_final with w = [1]."""
    if K == 0:
        V = torch.as_tensor(V_final, dtype=torch.float32).reshape(-1, 1)
        return torch.ones(len(pairs), 1), V
    model = model_cls(V_final, alpha, len(pairs), pairs.num_features, K, num_iterations, learning_rate)
    return model.train(pairs, device=device)


def _check_pipeline_args(**settings):
    """InputError naming the argument for the range errors of run / run_regularized / run_few_shot_vary_shots;
    says so when fewshot_iterations=0 (unseen users keep uniform weights over the basis)."""
    check_values(settings)
    if settings["fewshot_iterations"] == 0:
        print("fewshot_iterations=0: no few-shot fit, unseen users keep uniform weights over the basis")


def check_users(named_pairs):
    """Raise when a Pairs has another number of users than expected: named_pairs [(name, pairs, n)]."""
    for name, pairs, n in named_pairs:
        if len(pairs) != n:
            raise InputError(f"{name} has {len(pairs)} users, expected {n}")


def fit_ranks(K_list, alpha_list, V_final, features, N, N_unseen, device=None, *, regularized=False,
              num_iterations=None, learning_rate=0.5, fewshot_iterations=500, fewshot_learning_rate=None, seed=0,
              record=None):
    """The LoRe pipeline for every alpha and K -> RankResult: fit the basis on the seen users, evaluate them on
    their train pairs and on unseen prompts, fit the unseen users' few-shot weights, evaluate them.

    features: the four pair sets (seen train, seen test, unseen few-shot, unseen test; Pairs or lists of
    per-user tensors [m_i, F]) of N and N_unseen users. K = 0: the reference head V_final [F, 1], w = [1];
    K = 1: one Bradley-Terry reward, w = [1], no few-shot step; K >= 2: LoRe (regularized: LoRe_regularized).
    Defaults as published: num_iterations 1000 (regularized 20000), fewshot_learning_rate 0.1 (regularized
    0.5). Every (alpha, K) starts from set_seed(seed). record: the script's RunRecord (what is finished)."""
    model_cls = LoRe_regularized if regularized else LoRe
    if num_iterations is None:
        num_iterations = 20000 if regularized else 1000
    if fewshot_learning_rate is None:
        fewshot_learning_rate = 0.5 if regularized else 0.1
    _check_pipeline_args(K_list=K_list, alpha_list=alpha_list, N=N, N_unseen=N_unseen, num_iterations=num_iterations,
                         learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
                         fewshot_learning_rate=fewshot_learning_rate)
    train, test, train_u, test_u = (as_pairs(x) for x in features)
    check_users([("train_features", train, N), ("test_features_sparse", test, N),
                  ("train_features_unseen", train_u, N_unseen), ("test_features_sparse_unseen", test_u, N_unseen)])
    shape = (len(alpha_list), len(K_list))
    means, stds = np.zeros((4,) + shape), np.zeros((4,) + shape)
    models = {}
    for a, alpha in enumerate(alpha_list):
        for k, K in enumerate(K_list):
            set_seed(seed)
            t0 = time.time()
            W, V = _fit_basis(model_cls, K, V_final, alpha, train, num_iterations=num_iterations,
                              learning_rate=learning_rate, device=device)
            if K <= 1:  # reference head or a single BT reward: everyone gets w = [1]
                W_u = torch.ones(N_unseen, V.shape[1])
            else:
                W_u = personalize_users(train_u, V, fewshot_iterations, fewshot_learning_rate, device)
            V, W, W_u = V.cpu(), W.cpu(), W_u.cpu()
            accs = [user_accuracies(train, V, W), user_accuracies(test, V, W),
                    user_accuracies(train_u, V, W_u), user_accuracies(test_u, V, W_u)]
            for r, acc in enumerate(accs):
                means[r, a, k], stds[r, a, k] = acc.mean(), acc.std()
            note_finished(record, f"alpha={alpha:g} K={K}")
            print(f"alpha={alpha:g} K={K} (kept {V.shape[1]}): " + ", ".join(
                f"{n} {m:.4f}" for n, m in zip(RESULT_NAMES, means[:, a, k])) + f"  [{time.time() - t0:.1f}s]")
            models[(alpha, K)] = {"V": V, "W": W, "W_unseen": W_u}
    return RankResult(list(K_list), list(alpha_list), means, stds, models)


def holdout_pairs(pairs, fraction, seed=0):
    """(fit, held_out): Pairs of the same users splitting `pairs`. A user with m >= 2 pairs holds out
    min(m - 1, max(1, round(fraction * m))) of them (drawn with np.random.RandomState(seed)); one with a single
    pair keeps it for the fit (its held-out accuracy is NaN: use np.nanmean)."""
    pairs = as_pairs(pairs)
    rng = np.random.RandomState(seed)
    held = [torch.zeros(0, dtype=torch.long)]
    for rows in pairs.rows_by_user():
        k = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) >= 2 else 0
        held.append(rows[torch.as_tensor(rng.choice(len(rows), k, replace=False), dtype=torch.long)])
    out = torch.zeros(len(pairs.user), dtype=torch.bool)
    out[torch.cat(held)] = True
    return pairs.select(torch.nonzero(~out).flatten()), pairs.select(torch.nonzero(out).flatten())


def select_rank(K_list, alpha_list, V_final, train_features, device=None, *, regularized=False,
                validation_fraction=0.1, num_iterations=1000, learning_rate=0.5, seed=0):
    """LoRe's (alpha, K), K >= 2, chosen on held-out pairs of the seen users' training data, never on test pairs:
    each user's validation_fraction of its training pairs is held out (holdout_pairs), LoRe (regularized:
    LoRe_regularized) is fit on the rest for every (alpha, K >= 2) as in run, and the one of best mean held-out
    accuracy over users wins (the first on a tie). -> {"alpha", "K", "validation": {"alpha=.. K=..": accuracy}},
    or None when there is nothing to choose (fewer than two candidates, or validation_fraction = 0)."""
    check_value("validation_fraction", validation_fraction)
    candidates = [(a, K) for a in alpha_list for K in K_list if K >= 2]
    if len(candidates) < 2 or validation_fraction == 0:
        return None
    fit, held = holdout_pairs(train_features, validation_fraction, seed)
    scores = {}
    for alpha, K in candidates:
        set_seed(seed)
        W, V = _fit_basis(LoRe_regularized if regularized else LoRe, K, V_final, alpha, fit,
                          num_iterations=num_iterations, learning_rate=learning_rate, device=device)
        scores[(alpha, K)] = float(np.nanmean(user_accuracies(held, V.cpu(), W.cpu())))
        print(f"model choice: alpha={alpha:g} K={K}: held-out seen-user training pairs {scores[(alpha, K)]:.4f}")
    alpha, K = max(scores, key=scores.get)
    return {"alpha": alpha, "K": K, "validation": {f"alpha={a:g} K={k}": v for (a, k), v in scores.items()}}


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


def select_shots(pool, units, users, shots, rule, seed=0):
    """Per user u of `users`, its first min(shots, len(units[u])) examples asked by `rule` (choose_shots) -> lists of
    indices into units[u]. pool: rows d^T V stored chosen minus rejected, the simulated user's answers: the rule sees
    each row in a random orientation (np.random.RandomState(seed * 100003 + u)) and only asked rows are answered."""
    XV = pool.dense().double().numpy()
    out = []
    for u in users:
        rows = torch.cat(units[u]).numpy()
        flip = np.random.RandomState(seed * 100003 + u).choice([-1.0, 1.0], len(rows))
        groups = np.repeat(np.arange(len(units[u])), [len(r) for r in units[u]])
        out.append(choose_shots(XV[rows] * flip[:, None], min(shots, len(units[u])), lambda r: flip[r], rule,
                                groups=groups))
    return out


def vary_shots(trials, alpha_list, K_list, num_shots, train_features, train_features_unseen,
               test_features_sparse_unseen, V_final, N, N_unseen, device=None, *, regularized=False,
               shot_groups=None, num_iterations=None, learning_rate=0.5, fewshot_iterations=500,
               fewshot_learning_rate=None, seed=0, shot_selection="random", full_pool=False, record=None):
    """Unseen-user accuracy against the number of few-shot examples -> ShotsResult.

    The basis is fit once per (alpha, K) on the seen users; then for each shot count and each
    of `trials` draws, every unseen user gets `shots` random examples of its few-shot pool, its
    weights are fit and it is evaluated on its test pairs. An example is a pair, or with
    `shot_groups` ([m] group id, e.g. the dialog, of every pair of train_features_unseen) all
    pairs of one group. Users with fewer than `shots` examples are skipped for that count (the
    number is printed). All trials of a shot count are fit together in one PersonalizeBatch
    (users are independent there, so this equals fitting them one by one).
    num_iterations None: 20000 if regularized else 500 (as published);
    fewshot_learning_rate None: 0.5 if regularized else 0.1.
    shot_selection: a rule or a list of them, each run on the same pools: "random" (the published draws), or
    "uncertainty" / "active": each user's examples are asked one at a time from the same pool (select_shots),
    and w is fit on them as above; deterministic: one trial, std 0. full_pool: also fit w on each user's whole
    pool (the reference the rules approach).
    """
    model_cls = LoRe_regularized if regularized else LoRe
    if num_iterations is None:
        num_iterations = 20000 if regularized else 500
    if fewshot_learning_rate is None:
        fewshot_learning_rate = 0.5 if regularized else 0.1
    _check_pipeline_args(K_list=K_list, alpha_list=alpha_list, N=N, N_unseen=N_unseen, num_iterations=num_iterations,
                         learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
                         fewshot_learning_rate=fewshot_learning_rate, trials=trials, num_shots=num_shots,
                         shot_selection=shot_selection)
    rules = [shot_selection] if isinstance(shot_selection, str) else list(dict.fromkeys(shot_selection))
    train, pool, test_u = (as_pairs(x) for x in (train_features, train_features_unseen, test_features_sparse_unseen))
    check_users([("train_features", train, N), ("train_features_unseen", pool, N_unseen),
                 ("test_features_sparse_unseen", test_u, N_unseen)])
    units = shot_units(pool, shot_groups)
    n_units = torch.tensor([len(u) for u in units])
    unit_name = "pairs" if shot_groups is None else "groups"
    skipped = [int((n_units < s).sum()) for s in num_shots]
    for s, n in zip(num_shots, skipped):
        if n:
            print(f"shots={s}: skipping {n} of {N_unseen} unseen users with fewer than {s} {unit_name}")
    res = np.zeros((len(rules), 4, len(alpha_list), len(K_list), len(num_shots)))
    full = np.zeros((4, len(alpha_list), len(K_list)))
    for a, alpha in enumerate(alpha_list):
        for k, K in enumerate(K_list):
            set_seed(seed)
            _, V = _fit_basis(model_cls, K, V_final, alpha, train, num_iterations=num_iterations,
                              learning_rate=learning_rate, device=device)
            V = V.cpu()
            # work in the K-dim projected space: d^T V is all the few-shot step needs
            eye = torch.eye(V.shape[1])
            pool_V = Pairs(pool.user, N_unseen, diffs=pool.project(V).float())
            test_V = Pairs(test_u.user, N_unseen, diffs=test_u.project(V).float())

            def fit(shot_pairs):
                if V.shape[1] <= 1:
                    return torch.ones(shot_pairs.num_users, V.shape[1])
                return personalize_users(shot_pairs, eye, fewshot_iterations, fewshot_learning_rate, device).cpu()
            for r, rule in enumerate(rules):
                n_trials, tag, chosen = (trials, "", None) if rule == "random" else (1, f" [{rule} shots]", {})
                if rule != "random":  # sequential: the choices for the largest count, once; a count takes a prefix
                    has, t0 = torch.nonzero(n_units >= min(num_shots)).flatten().tolist(), time.time()
                    chosen = dict(zip(has, select_shots(pool_V, units, has, max(num_shots), rule, seed)))
                    print(f"alpha={alpha:g} K={K}: {rule} shots of {len(has)} users chosen in {time.time() - t0:.1f}s")
                for j, shots in enumerate(num_shots):
                    users = torch.nonzero(n_units >= shots).flatten().tolist()
                    if not users:
                        res[r, :, a, k, j] = np.nan
                        continue
                    shot_pairs = stack_trials(pool_V, units, users, shots, n_trials, seed,
                                              None if chosen is None else [chosen[u] for u in users])
                    W_u = fit(shot_pairs)
                    fs = user_accuracies(shot_pairs, eye, W_u).reshape(n_trials, len(users)).mean(1)
                    test = test_V.select_users(users)
                    ts = [user_accuracies(test, eye, W_u[t * len(users):(t + 1) * len(users)]).mean()
                          for t in range(n_trials)]
                    res[r, :, a, k, j] = np.mean(fs), np.std(fs), np.mean(ts), np.std(ts)
                    note_finished(record, f"alpha={alpha:g} K={K} shots={shots}{tag}")
                    print(f"alpha={alpha:g} K={K} shots={shots}{tag}: few-shot train {res[r, 0, a, k, j]:.4f}, "
                          f"unseen test {res[r, 2, a, k, j]:.4f} +- {res[r, 3, a, k, j]:.4f} "
                          f"({len(users)} users, {n_trials} trials)")
            if full_pool:  # the reference: w fit on each user's whole few-shot pool
                users = torch.nonzero(n_units > 0).flatten().tolist()
                whole = pool_V.select_users(users)
                W_u = fit(whole)
                fs, ts = user_accuracies(whole, eye, W_u), user_accuracies(test_V.select_users(users), eye, W_u)
                full[:, a, k] = fs.mean(), fs.std(), ts.mean(), ts.std()
    return ShotsResult(list(K_list), list(alpha_list), list(num_shots), rules,
                       {rule: res[r] for r, rule in enumerate(rules)}, full if full_pool else None, skipped)
