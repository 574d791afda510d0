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
from .selection import choose_shots, stop_points


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
    users). skipped [S]: users skipped at each shot count (fewer examples than shots).
    Per user (NaN where a user is not in the point): user_acc {rule: [A, K, S, N_unseen]} unseen-test accuracy (mean
    over trials), pairs_asked {rule: [A, K, S, N_unseen]} the comparisons in its shots (mean over trials),
    full_pool_users [A, K, N_unseen] the whole-pool test accuracy. stopping {(alpha, K): vary_shots' stopping rule
    (_stopping's dict)} or None. seed: the run's seed. pair_budgets [B] and budget_acc {rule: [A, K, B, N_unseen]}:
    the unseen-test accuracy (mean over trials) after exactly P answered comparisons, the rule's units in its order
    with the last one cut short (grouped shots only), or None."""
    K_list: list
    alpha_list: list
    num_shots: list
    rules: list
    acc: dict
    full_pool: np.ndarray | None
    skipped: list
    user_acc: dict | None = None
    pairs_asked: dict | None = None
    full_pool_users: np.ndarray | None = None
    stopping: dict | None = None
    seed: int = 0
    pair_budgets: list | None = None
    budget_acc: dict | None = None


def _fit_basis(model_cls, K, V_final, alpha, pairs, *, num_iterations, learning_rate, device):
    """(W [C, K'], V [F, K']) for rank K: K = 0 is the reference head V_final with w = [1]."""
    if K == 0:
        V = torch.as_tensor(V_final, dtype=torch.float32).reshape(-1, 1)
        return torch.ones(len(pairs), 1), V
    model = model_cls(V_final, alpha, len(pairs), pairs.num_features, K, num_iterations, learning_rate)
    return model.train(pairs, device=device)


def _published(regularized, num_iterations, fewshot_learning_rate, joint_steps):
    """(model class, num_iterations, fewshot_learning_rate) with the published defaults for None: LoRe_regularized,
    20000 steps and few-shot lr 0.5 (PRISM), or LoRe, `joint_steps` steps and few-shot lr 0.1."""
    return (LoRe_regularized if regularized else LoRe,
            (20000 if regularized else joint_steps) if num_iterations is None else num_iterations,
            (0.5 if regularized else 0.1) if fewshot_learning_rate is None else fewshot_learning_rate)


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
    model_cls, num_iterations, fewshot_learning_rate = _published(regularized, num_iterations, fewshot_learning_rate,
                                                                  joint_steps=1000)
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


def check_shot_selection(config, dialogs=False):
    """InputError unless a vary_fewshot.py config's selection settings fit together: "longest" needs dialogs
    (shot_groups), and several `seeds` run the rules only (baselines=[])."""
    rules = config.get("shot_selection", "random")
    rules = [rules] if isinstance(rules, str) else list(rules)
    if "longest" in rules and not dialogs:
        raise InputError(f"shot_selection={config['shot_selection']!r}: 'longest' orders dialogs by their number of "
                         "pairs; this dataset's shots are single pairs: leave it out")
    if len(config.get("seeds") or []) > 1 and config.get("baselines"):
        raise InputError(f"seeds={config['seeds']!r} with baselines={config['baselines']!r}: several seeds compare "
                         "the selection rules only; pass baselines=[] (or one seed)")


def _stack_prefixes(pool, units, users, chosen, counts):
    """One Pairs of the first counts[i] examples in chosen[i] of each of `users`: user i is users[i]."""
    rows = [torch.cat([units[u][c] for c in chosen[i][:counts[i]]]) for i, u in enumerate(users)]
    owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(r) for r in rows]))
    return pool.select(torch.cat(rows), owner, len(rows))


def _stopping(pool_V, test_V, units, users, chosen, traces, budget, thresholds, fit, eye):
    """The stopping rule on the active choices: per threshold, each user of `users` answers until the best remaining
    expected information falls below it (stop_points, at most min(budget, its pool)); w fit on those answers.
    -> {"thresholds", "asked" [T, U], "pairs" [T, U], "acc" [T, U], "budget" [U], "budget_pairs" [U],
    "acc_budget" [U], "users" [U]} (test accuracy; pairs: the comparisons in the units asked)."""
    caps = [len(c) for c in chosen]
    counts = [stop_points(info, cap, thresholds) for info, cap in zip(traces, caps)]
    per = [[c[t] for c in counts] for t in range(len(thresholds))] + [caps]
    stacked = [_stack_prefixes(pool_V, units, users, chosen, n) for n in per]
    acc = [user_accuracies(test_V.select_users(users), eye, fit(p)) for p in stacked]
    pairs = [p.counts().numpy() for p in stacked]
    return {"thresholds": list(thresholds), "users": list(users), "asked": np.array(per[:-1]),
            "pairs": np.array(pairs[:-1]), "acc": np.array(acc[:-1]), "budget": np.array(caps),
            "budget_pairs": pairs[-1], "acc_budget": acc[-1]}


def _stack_budget(pool, units, users, orders, budget):
    """One Pairs of the first `budget` comparisons of each of `users` when its units are answered in orders[i] (a unit's
    comparisons in their stored order, the last unit cut short): user i is users[i]."""
    rows = [torch.cat([units[u][c] for c in orders[i]])[:budget] for i, u in enumerate(users)]
    owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(r) for r in rows]))
    return pool.select(torch.cat(rows), owner, len(rows))


def vary_shots(trials, alpha_list, K_list, num_shots, train_features, train_features_unseen,
               test_features_sparse_unseen, V_final, N, N_unseen, device=None, *, regularized=False,
               shot_groups=None, num_iterations=None, learning_rate=0.5, fewshot_iterations=500,
               fewshot_learning_rate=None, seed=0, shot_selection="random", full_pool=False, stop_thresholds=None,
               pair_budgets=None, record=None):
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
    "uncertainty" / "active" / "variance" / "longest" (groups only): each user's examples are asked one at a time
    from the same pool (select_shots), and w is fit on them as above; deterministic: one trial, std 0. full_pool:
    also fit w on each user's whole pool (the reference the rules approach). stop_thresholds (nats): also run the
    stopping rule on the active choices, up to max(num_shots) examples (ShotsResult.stopping). pair_budgets (with
    shot_groups): also compare the rules at exactly P answered comparisons per user for each P, a rule's units taken
    in its order (random: a fresh order per trial and user, np.random.default_rng([seed, trial, user])) with the last
    one cut short; the users whose units asked by every rule hold at least P comparisons (ShotsResult.budget_acc).
    """
    model_cls, num_iterations, fewshot_learning_rate = _published(regularized, num_iterations, fewshot_learning_rate,
                                                                  joint_steps=500)
    _check_pipeline_args(K_list=K_list, alpha_list=alpha_list, N=N, N_unseen=N_unseen, num_iterations=num_iterations,
                         learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
                         fewshot_learning_rate=fewshot_learning_rate, trials=trials, num_shots=num_shots,
                         shot_selection=shot_selection)
    rules = [shot_selection] if isinstance(shot_selection, str) else list(dict.fromkeys(shot_selection))
    check_shot_selection({"shot_selection": shot_selection}, dialogs=shot_groups is not None)
    if stop_thresholds is not None:
        check_value("stop_thresholds", stop_thresholds)
    if pair_budgets is not None:
        check_value("pair_budgets", pair_budgets)
        if shot_groups is None:
            raise InputError("pair_budgets: the shots are single comparisons already; give shot_groups or leave it out")
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
    per_user = np.full((2, len(rules), len(alpha_list), len(K_list), len(num_shots), N_unseen), np.nan)
    full = np.zeros((4, len(alpha_list), len(K_list)))
    full_users = np.full((len(alpha_list), len(K_list), N_unseen), np.nan)
    stopping = {}
    budget_acc = np.full((len(rules), len(alpha_list), len(K_list), len(pair_budgets or []), N_unseen), np.nan)
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
            has = torch.nonzero(n_units >= min(num_shots)).flatten().tolist()
            active = None  # with stop_thresholds: the active choices and their information traces
            orders = {}  # each rule's choices per user (None: random)
            for r, rule in enumerate(rules):
                n_trials, tag, chosen = (trials, "", None) if rule == "random" else (1, f" [{rule} shots]", {})
                if rule != "random":  # sequential: the choices for the largest count, once; a count takes a prefix
                    t0, trace = time.time(), rule == "active" and stop_thresholds is not None
                    picks = select_shots(pool_V, units, has, max(num_shots), rule, seed, return_information=trace)
                    active, picks = (picks, picks[0]) if trace else (active, picks)
                    chosen = dict(zip(has, picks))
                    print(f"alpha={alpha:g} K={K}: {rule} shots of {len(has)} users chosen in {time.time() - t0:.1f}s")
                orders[rule] = chosen
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
                    accs = [user_accuracies(test, eye, W_u[t * len(users):(t + 1) * len(users)])
                            for t in range(n_trials)]
                    ts = [acc.mean() for acc in accs]
                    res[r, :, a, k, j] = np.mean(fs), np.std(fs), np.mean(ts), np.std(ts)
                    per_user[0, r, a, k, j, users] = np.mean(accs, 0)
                    per_user[1, r, a, k, j, users] = shot_pairs.counts().reshape(n_trials, len(users)).double() \
                        .mean(0).numpy()
                    note_finished(record, f"alpha={alpha:g} K={K} shots={shots}{tag}")
                    print(f"alpha={alpha:g} K={K} shots={shots}{tag}: few-shot train {res[r, 0, a, k, j]:.4f}, "
                          f"unseen test {res[r, 2, a, k, j]:.4f} +- {res[r, 3, a, k, j]:.4f} "
                          f"({len(users)} users, {n_trials} trials)")
            for b, budget in enumerate(pair_budgets or []):  # every rule at exactly `budget` answered comparisons
                limit = [min((sum(len(units[u][c]) for c in o[u]) for o in orders.values() if o is not None),
                             default=len(torch.cat(units[u]))) for u in has]
                users = [u for u, n in zip(has, limit) if n >= budget]
                if not users:
                    continue
                for r, rule in enumerate(rules):
                    n_trials = trials if rule == "random" else 1
                    runs = [[np.random.default_rng([seed, t, u]).permutation(len(units[u])) for u in users]
                            if orders[rule] is None else [orders[rule][u] for u in users] for t in range(n_trials)]
                    W_u = fit(_stack_budget(pool_V, units, users * n_trials, sum(runs, []), budget))
                    test = test_V.select_users(users)
                    budget_acc[r, a, k, b, users] = np.mean([user_accuracies(
                        test, eye, W_u[t * len(users):(t + 1) * len(users)]) for t in range(n_trials)], 0)
                print(f"alpha={alpha:g} K={K}: {budget} answered comparisons ({len(users)} users): " + ", ".join(
                    f"{rule} {np.nanmean(budget_acc[r, a, k, b]):.4f}" for r, rule in enumerate(rules)))
            if full_pool:  # the reference: w fit on each user's whole few-shot pool
                users = torch.nonzero(n_units > 0).flatten().tolist()
                whole = pool_V.select_users(users)
                W_u = fit(whole)
                fs, ts = user_accuracies(whole, eye, W_u), user_accuracies(test_V.select_users(users), eye, W_u)
                full[:, a, k] = fs.mean(), fs.std(), ts.mean(), ts.std()
                full_users[a, k, users] = ts
            if stop_thresholds is not None and has:  # the stopping rule, on the active choices
                active = active or select_shots(pool_V, units, has, max(num_shots), "active", seed, True)
                stopping[(alpha, K)] = _stopping(pool_V, test_V, units, has, *active, max(num_shots),
                                                 stop_thresholds, fit, eye)
    return ShotsResult(list(K_list), list(alpha_list), list(num_shots), rules,
                       {rule: res[r] for r, rule in enumerate(rules)}, full if full_pool else None, skipped,
                       user_acc={rule: per_user[0, r] for r, rule in enumerate(rules)},
                       pairs_asked={rule: per_user[1, r] for r, rule in enumerate(rules)},
                       full_pool_users=full_users if full_pool else None, stopping=stopping or None, seed=seed,
                       pair_budgets=None if pair_budgets is None else list(pair_budgets),
                       budget_acc=None if pair_budgets is None else dict(zip(rules, budget_acc)))
