"""LoRe's pipelines behind the published wrappers (utils.run, run_regularized, run_few_shot_vary_shots): every
(alpha, K) as a method (lore.LoReMethod) through the one evaluation path (fit_ranks -> RankResult), K chosen on
held-out pairs of the seen users' training data (select_rank), and unseen-user accuracy against the number of
few-shot examples, drawn at random (fewshot.py) or asked by a selection rule (study.py) (vary_shots -> ShotsResult).

Imports: config, data, lore, evaluate, tuning, fewshot, study.
"""
import dataclasses
import time

import numpy as np
import torch

from . import study
from .config import InputError, check_value, check_values, set_seed
from .data import RESULT_NAMES, as_pairs
from .evaluate import Run, evaluate, held_out_score, holdout_pairs
from .fewshot import fewshot_curve, shot_units
from .lore import LoReMethod
from .study import projected_pool, select_shots
from .tuning import step_beyond


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
    full_pool_users [A, K, N_unseen] the whole-pool test accuracy. stopping {(alpha, K): study.stopping's dict} or
    None. seed: the run's seed. pair_budgets [B] and budget_acc {rule: [A, K, B, N_unseen]}: the unseen-test accuracy
    (mean over trials) after exactly P answered comparisons (study.pair_budgets), or None."""
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


def published_defaults(regularized, num_iterations, fewshot_learning_rate, joint_steps):
    """(num_iterations, fewshot_learning_rate) with the published defaults for None: 20000 steps and few-shot lr 0.5
    (LoRe_regularized, PRISM), or `joint_steps` steps and few-shot lr 0.1 (LoRe)."""
    return ((20000 if regularized else joint_steps) if num_iterations is None else num_iterations,
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


def lore_runs(K_list, alpha_list, V_final, num_features, *, regularized=False, num_iterations=1000, learning_rate=0.5,
              fewshot_iterations=500, fewshot_learning_rate=0.1, seed=0, sweep_alpha=None):
    """[Run] of LoRe at every (alpha, K) of alpha_list x K_list (alpha-major): families "ref" (K = 0), "BT" (K = 1)
    and "LoRe" (K >= 2, swept over K, and alpha when there are several or sweep_alpha)."""
    sweep_alpha = len(alpha_list) > 1 if sweep_alpha is None else sweep_alpha
    runs = []
    for alpha in alpha_list:
        for K in K_list:
            def make(K=K, alpha=alpha):
                return LoReMethod(num_features, K, alpha, V_final, regularized, num_iterations, learning_rate,
                                  fewshot_iterations, fewshot_learning_rate, seed)
            family = "ref" if K == 0 else "BT" if K == 1 else "LoRe"
            sweep = {} if K <= 1 else {"K": K, "alpha": alpha} if sweep_alpha else {"K": K}
            settings = {"K": K, "alpha": alpha, "regularized": regularized, "num_iterations": num_iterations,
                        "learning_rate": learning_rate, "fewshot_iterations": fewshot_iterations,
                        "fewshot_learning_rate": fewshot_learning_rate}
            runs.append(Run(f"lore_alpha{alpha:g}_K{K}", "lore", f"{family} (alpha = {alpha:g}, K = {K})", make,
                            family=family, sweep=sweep, row="ours", settings=settings))
    return runs


def rank_result(results, K_list, alpha_list):
    """RankResult of evaluate's results of lore_runs(K_list, alpha_list)."""
    shape = (len(alpha_list), len(K_list))
    means, stds = np.zeros((4,) + shape), np.zeros((4,) + shape)
    models = {}
    for i, r in enumerate(results):
        a, k = divmod(i, len(K_list))
        for s, name in enumerate(RESULT_NAMES):
            means[s, a, k], stds[s, a, k] = r.users[name]["accuracy"].mean(), r.users[name]["accuracy"].std()
        models[(alpha_list[a], K_list[k])] = r.model
    return RankResult(list(K_list), list(alpha_list), means, stds, models)


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
    num_iterations, fewshot_learning_rate = published_defaults(regularized, num_iterations, fewshot_learning_rate,
                                                               joint_steps=1000)
    _check_pipeline_args(K_list=K_list, alpha_list=alpha_list, N=N, N_unseen=N_unseen, num_iterations=num_iterations,
                         learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
                         fewshot_learning_rate=fewshot_learning_rate)
    sets = [as_pairs(x) for x in features]
    check_users([(n, p, c) for n, p, c in zip(("train_features", "test_features_sparse", "train_features_unseen",
                                                "test_features_sparse_unseen"), sets, (N, N, N_unseen, N_unseen))])
    runs = lore_runs(K_list, alpha_list, V_final, sets[0].num_features, regularized=regularized,
                     num_iterations=num_iterations, learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
                     fewshot_learning_rate=fewshot_learning_rate, seed=seed)
    return rank_result(evaluate(runs, sets, device, seed=seed, record=record), K_list, alpha_list)


def select_rank(K_list, alpha_list, V_final, train_features, device=None, *, regularized=False,
                validation_fraction=0.1, num_iterations=1000, learning_rate=0.5, seed=0):
    """LoRe's (alpha, K), K >= 2, chosen on held-out pairs of the seen users' training data, never on test pairs:
    each user's validation_fraction of its training pairs is held out (evaluate.holdout_pairs), LoRe (regularized:
    LoRe_regularized) is fit on the rest for every (alpha, K >= 2) as in run, and the one of best mean held-out
    accuracy over users wins (the first on a tie). -> {"alpha", "K", "validation": {"alpha=.. K=..": accuracy}},
    or None when there is nothing to choose (fewer than two candidates, or validation_fraction = 0)."""
    check_value("validation_fraction", validation_fraction)
    train = as_pairs(train_features)
    runs = [r for r in lore_runs(K_list, alpha_list, V_final, train.num_features, regularized=regularized,
                                 num_iterations=num_iterations, learning_rate=learning_rate, seed=seed) if r.sweep]
    if len(runs) < 2 or validation_fraction == 0:
        return None
    fit, held = holdout_pairs(train, validation_fraction, seed)
    scores = {}
    for r in runs:
        key = r.settings["alpha"], r.settings["K"]
        scores[key] = held_out_score(r.make, fit, held, seed, device)
        print(f"model choice: {r.label}: held-out seen-user training pairs {scores[key]:.4f}")
    alpha, K = max(scores, key=scores.get)
    return {"alpha": alpha, "K": K, "validation": {f"alpha={a:g} K={k}": v for (a, k), v in scores.items()}}


def widen_rank(results, make_run, train, validation_fraction=0.1, *, seed=0, device=None, groups=None, widen=3,
               evaluate_run=None, log=print):
    """LoRe's (alpha, K) chosen on held-out pairs (evaluate.choose), widened past an edge: while the chosen K (or
    alpha) is the largest or smallest tried, the next one beyond it (tuning.step_beyond; K >= 2, alpha >= 0 are hard
    limits) is scored on the same held-out pairs, and when it wins, evaluate_run(run) -> its MethodResult is added
    to `results` as the chosen one. make_run(K, alpha) -> a Run of lore_runs. At most `widen` steps per axis.
    -> {axis: {"values", "chosen", "edge", "limit"}} (nothing chosen: {})."""
    best = next((r for r in results if r.run.name == "lore" and r.chosen), None)
    if best is None:
        return {}
    fit, held = holdout_pairs(train, validation_fraction, seed, groups)
    rules, edges = {"K": "int >= 2", "alpha": ">= 0"}, {}
    for axis in best.run.sweep:
        other = {k: v for k, v in best.run.sweep.items() if k != axis}
        tried = [r.run.settings[axis] for r in results if r.run.name == "lore" and r.run.sweep
                 and all(r.run.settings[k] == v for k, v in other.items())]
        limit = None
        for _ in range(widen + 1):
            chosen = best.run.settings[axis]
            if min(tried) < chosen < max(tried) or len(tried) < 2:
                limit = None
                break
            new = step_beyond(tried, chosen == max(tried))
            new = int(new) if axis == "K" else float(new)
            try:
                check_value(axis, new, rules[axis])
            except InputError:
                limit = f"{new:g} is out of range ({rules[axis]})"
                break
            if _ == widen:
                limit = f"widened {widen} times"
                break
            settings = {**best.run.settings, axis: new}
            run = make_run(settings["K"], settings["alpha"])
            tried.append(new)
            score = held_out_score(run.make, fit, held, seed, device)
            log(f"model choice: {run.label}: held-out seen-user training pairs {score:.4f} (past the edge of {axis})")
            if score <= best.validation:
                limit = None
                break
            result = evaluate_run(run)
            result.validation, result.chosen, best.chosen = score, True, False
            results.append(result)
            best = result
        chosen = best.run.settings[axis]
        edge = chosen in (min(tried), max(tried))
        edges[axis] = {"values": sorted(tried), "chosen": chosen, "edge": edge, "limit": limit if edge else None}
    return edges


def check_shot_selection(config, dialogs=False):
    """InputError unless a vary_fewshot.py config's selection settings fit together: "longest" needs dialogs
    (shot_groups)."""
    rules = config.get("shot_selection", "random")
    rules = [rules] if isinstance(rules, str) else list(rules)
    if "longest" in rules and not dialogs:
        raise InputError(f"shot_selection={config['shot_selection']!r}: 'longest' orders dialogs by their number of "
                         "pairs; this dataset's shots are single pairs: leave it out")


def vary_shots(trials, alpha_list, K_list, num_shots, train_features, train_features_unseen,
               test_features_sparse_unseen, V_final, N, N_unseen, device=None, *, regularized=False,
               shot_groups=None, num_iterations=None, learning_rate=0.5, fewshot_iterations=500,
               fewshot_learning_rate=None, seed=0, shot_selection="random", full_pool=False, stop_thresholds=None,
               pair_budgets=None, record=None):
    """Unseen-user accuracy against the number of few-shot examples -> ShotsResult.

    The basis is fit once per (alpha, K) on the seen users (from set_seed(seed)); then the paper's protocol
    (fewshot.fewshot_curve: per shot count, `trials` random draws of each unseen user's examples, w fit on them,
    the user scored on its test pairs). An example is a pair, or with `shot_groups` ([m] group id, e.g. the dialog,
    of every pair of train_features_unseen) all pairs of one group. Users with fewer than `shots` examples are
    skipped for that count (the number is printed). num_iterations None: 20000 if regularized else 500 (as
    published); fewshot_learning_rate None: 0.5 if regularized else 0.1.
    shot_selection: a rule or a list of them, each run on the same pools: "random" (the published draws), or
    "uncertainty" / "active" / "variance" / "longest" (groups only): each user's examples are asked one at a time
    from the same pool (study.select_shots), and w is fit on them as above; deterministic: one trial, std 0.
    full_pool: also fit w on each user's whole pool (the reference the rules approach). stop_thresholds (nats): also
    run the stopping rule on the active choices, up to max(num_shots) examples (ShotsResult.stopping). pair_budgets
    (with shot_groups): also compare the rules at exactly P answered comparisons per user (study.pair_budgets).
    """
    num_iterations, fewshot_learning_rate = published_defaults(regularized, num_iterations, fewshot_learning_rate,
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
    skipped = [int((n_units < s).sum()) for s in num_shots]
    for s, n in zip(num_shots, skipped):
        if n:
            print(f"shots={s}: skipping {n} of {N_unseen} unseen users with fewer than {s} "
                  f"{'pairs' if shot_groups is None else 'groups'}")
    A, K_, S = len(alpha_list), len(K_list), len(num_shots)
    res = np.zeros((len(rules), 4, A, K_, S))
    per_user = np.full((2, len(rules), A, K_, S, N_unseen), np.nan)
    full, full_users = np.zeros((4, A, K_)), np.full((A, K_, N_unseen), np.nan)
    stops, budget_acc = {}, {rule: np.full((A, K_, len(pair_budgets or []), N_unseen), np.nan) for rule in rules}
    has = torch.nonzero(n_units >= min(num_shots)).flatten().tolist()
    for a, alpha in enumerate(alpha_list):
        for k, K in enumerate(K_list):
            set_seed(seed)
            model = LoReMethod(train.num_features, K, alpha, V_final, regularized, num_iterations, learning_rate,
                               fewshot_iterations, fewshot_learning_rate, seed).fit(train, device)
            active, orders = None, {}  # the active choices with their information traces; each rule's choices
            for r, rule in enumerate(rules):
                chosen, tag = None, ""
                if rule != "random":  # sequential: the choices for the largest count, once; a count takes a prefix
                    t0, trace = time.time(), rule == "active" and stop_thresholds is not None
                    picks = select_shots(projected_pool(model, pool), units, has, max(num_shots), rule, seed,
                                         return_information=trace)
                    active, picks = (picks, picks[0]) if trace else (active, picks)
                    chosen, tag = dict(zip(has, picks)), f" [{rule} shots]"
                    print(f"alpha={alpha:g} K={K}: {rule} shots of {len(has)} users chosen in {time.time() - t0:.1f}s")
                orders[rule] = chosen
                curve = fewshot_curve(model, pool, test_u, units, num_shots, trials, seed, device, chosen=chosen,
                                      label=f"alpha={alpha:g} K={K}{tag}", record=record)
                res[r, :, a, k] = curve.acc
                per_user[:, r, a, k] = curve.user_acc, curve.pairs_asked
            if pair_budgets:
                for rule, acc in study.pair_budgets(model, pool, test_u, units, has, orders, pair_budgets,
                                                     trials, seed, device).items():
                    budget_acc[rule][a, k] = acc
            if full_pool:
                full[:, a, k], full_users[a, k] = study.full_pool(model, pool, test_u, units, device)
            if stop_thresholds is not None and has:  # the stopping rule, on the active choices
                active = active or select_shots(projected_pool(model, pool), units, has, max(num_shots), "active",
                                                seed, True)
                stops[(alpha, K)] = study.stopping(model, pool, test_u, units, has, *active, stop_thresholds, device)
    return ShotsResult(list(K_list), list(alpha_list), list(num_shots), rules,
                       {rule: res[r] for r, rule in enumerate(rules)}, full if full_pool else None, skipped,
                       user_acc={rule: per_user[0, r] for r, rule in enumerate(rules)},
                       pairs_asked={rule: per_user[1, r] for r, rule in enumerate(rules)},
                       full_pool_users=full_users if full_pool else None, stopping=stops or None, seed=seed,
                       pair_budgets=None if pair_budgets is None else list(pair_budgets),
                       budget_acc=None if pair_budgets is None else budget_acc)
