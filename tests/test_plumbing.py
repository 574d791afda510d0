"""Known answers for the plumbing between the method and its reports: which settings a tuned baseline row runs with,
which pair sets the near-tie flag reads, how many pairs holdout_pairs holds out, which accuracies the choice-quality
rank agreement pairs with each group, the simulated answers of the few-shot selection study, the stopping rule's
cost, pair budgets at exactly the budget, the direction of answered comparisons in suggest, the per-seed spread of
the rules' comparison, the logit scale of K = 1 model files and the synthetic stand-in reference direction.
Every test is tiny (hand-built numbers, no training beyond a few steps) and asserts the numbers themselves."""
import json
import math

import numpy as np
import pytest
import torch

from lorelib import experiment
from lorelib.choice import Candidates, ChoiceRun
from lorelib.data import RESULT_NAMES, Pairs, PreferenceData
from lorelib.evaluate import MethodResult, Run, holdout_pairs
from lorelib.fewshot import shot_units
from lorelib.files import stand_in_reference
from lorelib.intervals import Z95
from lorelib.learned import PersonalizedReward, load_lore_model, save_models
from lorelib.pipelines import ShotsResult, vary_shots
from lorelib.report import report_run
from lorelib.report_shots import report_shots
from lorelib.study import select_shots


def diff_pairs(counts, F=3, seed=0):
    """Pairs of difference rows [sum(counts), F] (seeded normal), counts[i] pairs for user i."""
    g = torch.Generator().manual_seed(seed)
    user = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return Pairs(user, len(counts), diffs=torch.randn(int(sum(counts)), F, generator=g))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def half_width(*seeds):
    """The 95% half-width of intervals.stratified_mean written out: seeds = [(variance ddof 1, users)] per seed."""
    return Z95 * math.sqrt(sum(v / n for v, n in seeds)) / len(seeds)


# 1. a tuned row's settings: the stored choice over the script's overrides, the other overrides carried
def test_tuned_row_keeps_the_stored_choice_and_carries_the_other_overrides():
    """Script overrides num_iterations = 7 (also named by the stored choice, 3), learning_rate = 0.02 (not named by
    it) and sweeps logit_scale: the tuned row runs num_iterations 3 (the stored choice wins), learning_rate 0.02 (the
    override carries), logit_scale the default 100 (a sweep does not carry); the released rows keep 7."""
    train, test, fewshot, test_u = (diff_pairs([3, 3], seed=s) for s in range(4))
    overrides = {"per_user_bt": {"num_iterations": 7, "learning_rate": 0.02, "logit_scale": [50.0, 70.0]}}
    stored = {"per_user_bt": {"num_iterations": 3}}
    out = experiment.run_methods(["per_user_bt"], (train, test, fewshot, test_u), "cpu", settings=overrides,
                                 tuned_settings=stored, validation_fraction=0.5)
    assert sorted(out) == ["per_user_bt_logit_scale50.0", "per_user_bt_logit_scale70.0", "per_user_bt_tuned"]
    tuned = out["per_user_bt_tuned"]["settings"]
    assert (tuned["num_iterations"], tuned["learning_rate"], tuned["logit_scale"]) == (3, 0.02, 100.0)
    assert out["per_user_bt_tuned"]["tuning"]["chosen"] == {"num_iterations": 3}
    released = out["per_user_bt_logit_scale50.0"]["settings"]
    assert (released["num_iterations"], released["learning_rate"], released["logit_scale"]) == (7, 0.02, 50.0)


# 2. the near-tie flag reads the test pair sets only
def _baseline_entry(label, ties):
    """A method's evaluated result with made-up accuracies and the share of near-ties `ties` {pair set: share}."""
    users = {n: {"accuracy": np.array([0.4, 0.6]), "ties_half": np.array([0.5, 0.5]),
                 "ties": np.array([ties[n], ties[n]])} for n in RESULT_NAMES}
    return MethodResult(Run(label.lower(), label.lower(), label, None), users, 0.0)


def test_tie_flag_reads_test_pairs_not_training_pairs(tmp_path, capsys):
    train_ties = _baseline_entry("TrainTies", {"seen_train": 1.0, "seen_test": 0.0, "unseen_fewshot": 1.0,
                                               "unseen_test": 0.0})
    seen_ties = _baseline_entry("SeenTies", {"seen_train": 0.0, "seen_test": 0.6, "unseen_fewshot": 0.0,
                                             "unseen_test": 0.3})
    unseen_ties = _baseline_entry("UnseenTies", {"seen_train": 0.0, "seen_test": 0.2, "unseen_fewshot": 0.0,
                                                 "unseen_test": 0.8})
    capsys.readouterr()
    report_run([train_ties, seen_ties, unseen_ties], {}, tmp_path, "t", "T")
    table = capsys.readouterr().out
    assert "TrainTies [ties" not in table
    assert "SeenTies [ties 60%]" in table and "UnseenTies [ties 80%]" in table  # the larger of the two test sets
    assert "degenerate fit (SeenTies, UnseenTies)" in table


# 3. the held-out share of each user's pairs
@pytest.mark.parametrize("fraction, held", [
    (0.1, [1, 2, 2, 1, 0]),   # 0.5 -> 0 -> at least 1; 1.5 -> 2; 2.5 -> 2 (round half to even); 0.2 -> 1; one pair: 0
    (0.3, [2, 4, 8, 1, 0]),   # 1.5 -> 2; 4.5 -> 4; 7.5 -> 8; 0.6 -> 1
    (0.95, [4, 14, 24, 1, 0]),  # 4.75 -> 5, 14.25 -> 14, 23.75 -> 24, 1.9 -> 2: at most m - 1
])
def test_holdout_counts_are_pinned(fraction, held):
    counts = [5, 15, 25, 2, 1]
    pairs = diff_pairs(counts)
    fit, out = holdout_pairs(pairs, fraction, seed=3)
    assert out.counts().tolist() == held
    assert fit.counts().tolist() == [m - h for m, h in zip(counts, held)]
    rows = sorted(map(tuple, torch.cat([fit.diffs, out.diffs]).tolist()))
    assert rows == sorted(map(tuple, pairs.diffs.tolist()))  # a partition of the user's pairs
    again = holdout_pairs(pairs, fraction, seed=3)[1]
    assert torch.equal(again.diffs, out.diffs)  # seeded


# 4. the rank agreement pairs seen-user accuracy with seen choice metrics, unseen with unseen
def test_rank_agreement_pairs_each_group_with_its_own_accuracy():
    """Four methods (LoRe at K = 0, 2, 3 and one baseline): seen-user test accuracy rises along them, unseen-user
    falls. The seen metrics ("top" rising, "gain" falling, "spearman" mostly rising) give tau 1, -1, 2/3 against
    the seen accuracy; the unseen metrics (two rising, "spearman" mostly rising) -1, -1, -2/3 against the unseen
    accuracy. Either group paired with the other's accuracy (or a training set's), in the LoRe rows or the
    baseline's, gives other numbers."""
    table = torch.eye(2)
    cands = Candidates(table, [[0, 1]], [0], [0], [[1.0, 2.0]], 1, "rating")
    run = ChoiceRun({"seen": cands, "unseen": cands}, head=None)
    seen = {"top": [0.1, 0.2, 0.3, 0.4], "gain": [0.4, 0.3, 0.2, 0.1], "spearman": [0.1, 0.3, 0.2, 0.4]}
    unseen = {"top": [0.1, 0.2, 0.3, 0.4], "gain": [0.2, 0.3, 0.35, 0.4], "spearman": [0.0, 0.2, 0.1, 0.3]}

    def row(i):
        return {g: {m: {"mean": v[i], "std": 0.0, "users": 1} for m, v in vals.items()}
                for g, vals in (("seen", seen), ("unseen", unseen))}
    accuracy = {"seen_test": [0.6, 0.7, 0.8, 0.9], "unseen_test": [0.9, 0.8, 0.7, 0.6],
                "seen_train": [0.9, 0.8, 0.7, 0.1],  # the other order: must not be read
                "unseen_fewshot": [0.6, 0.7, 0.8, 0.95]}  # must not be read
    results = []
    for i, name in enumerate(["lore", "lore", "lore", "b"]):
        r = MethodResult(Run(f"{name}{i}", name, name, None),
                         {n: {"accuracy": np.array([a[i]])} for n, a in accuracy.items()}, 0.0)
        r.choice = row(i)
        results.append(r)
    tau = run.payload(results)["rank_agreement"]
    assert tau["seen"] == pytest.approx({"top": 1.0, "gain": -1.0, "spearman": 2 / 3})
    assert tau["unseen"] == pytest.approx({"top": -1.0, "gain": -1.0, "spearman": -2 / 3})


# 5. the simulated user's answers in the selection study
def test_select_shots_answers_with_the_stored_orientation():
    """Three comparisons in K = 2, stored chosen minus rejected: x0 = (200, -200) (the user prefers basis 0), then
    x1 = (100, -300) and x2 = (-300, 100). The first question is x0 (its answer is 50/50 under the prior); once it is
    answered in its stored orientation, x1 is the uncertain one and is asked next. An answer of -flip (or +1 whatever
    the row's shown orientation) makes x2 the next question for every user (or for those shown x0 flipped)."""
    x = torch.tensor([[200.0, -200.0], [100.0, -300.0], [-300.0, 100.0]])
    users = 6
    pool = Pairs(torch.arange(users).repeat_interleave(3), users, diffs=x.repeat(users, 1))
    units = shot_units(pool)
    for rule in ("active", "uncertainty"):
        assert select_shots(pool, units, list(range(users)), 3, rule, seed=0) == [[0, 1, 2]] * users
        assert select_shots(pool, units, list(range(users)), 2, rule, seed=5) == [[0, 1]] * users


# 6. the stopping rule's trade-off
def test_stopping_report_cost_saved_and_budget_accuracy(tmp_path):
    """Four users, budgets 4, 4, 2, 2 answers (mean 3). Threshold 0.01: 1, 2, 1, 2 asked (mean 1.5: saved 1.5, half the
    mean budget), accuracy 0.5, 0.6, 0.7, 0.6 against 0.8, 0.8, 0.9, 0.7 at the budget: cost +0.2 (budget minus
    stop, per user). Threshold 0.1: 1 each, accuracy 0.4 each: cost 0.4. (Through report_shots, the public door to
    report._report_stopping.)"""
    stopping = {"thresholds": [0.01, 0.1], "users": [0, 1, 2, 3],
                "asked": np.array([[1, 2, 1, 2], [1, 1, 1, 1]]), "pairs": np.array([[2, 3, 1, 4], [1, 1, 1, 1]]),
                "acc": np.array([[0.5, 0.6, 0.7, 0.6], [0.4, 0.4, 0.4, 0.4]]), "budget": np.array([4, 4, 2, 2]),
                "budget_pairs": np.array([6, 8, 2, 4]), "acc_budget": np.array([0.8, 0.8, 0.9, 0.7])}
    acc = np.full((4, 1, 1, 1), 0.5)
    result = ShotsResult([2], [0.0], [4], ["active"], {"active": acc}, None, [0], stopping={(0.0, 2): stopping})
    report_shots(result, {}, tmp_path, "s", "S")
    out = read_json(tmp_path / "s.json")["stopping"]
    h = half_width((0.02 / 3, 4))  # both [0.3, 0.2, 0.2, 0.1] (cost) and [0.8, 0.8, 0.9, 0.7]: variance 0.02 / 3
    assert out["budget"] == pytest.approx(3.0) and out["budget_pairs"] == pytest.approx(5.0)
    assert out["unseen_test_at_budget"]["mean"] == pytest.approx(0.8)
    assert out["unseen_test_at_budget"]["ci95"] == pytest.approx([0.8 - h, 0.8 + h])
    first, second = out["thresholds"]
    assert first["threshold"] == 0.01 and first["asked"] == pytest.approx(1.5) and first["saved"] == pytest.approx(1.5)
    assert first["saved_fraction"] == pytest.approx(0.5) and first["pairs_asked"] == pytest.approx(2.5)
    assert first["unseen_test"]["mean"] == pytest.approx(0.6)
    assert first["cost"]["mean"] == pytest.approx(0.2) and first["cost"]["ci95"] == pytest.approx([0.2 - h, 0.2 + h])
    assert second["saved"] == pytest.approx(2.0) and second["saved_fraction"] == pytest.approx(2 / 3)
    assert second["cost"]["mean"] == pytest.approx(0.4) and second["unseen_test"]["mean"] == pytest.approx(0.4)


def test_stopping_rule_counts_and_budget_accuracy_from_vary_shots():
    """vary_shots' own stopping dict (pipelines): the budget is min(max shots, the pool) answers; at a threshold no
    information falls below the rule asks the whole budget, at one above every value it asks the first question only,
    and the accuracies are those of the active rule's own points at 3 and 1 shots (the same answers, the same fit)."""
    g = torch.Generator().manual_seed(0)
    F, N = 4, 3
    train, test = (Pairs(torch.arange(N).repeat_interleave(6), N, diffs=torch.randn(6 * N, F, generator=g))
                   for _ in range(2))
    pool = Pairs(torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2]), N, diffs=torch.randn(11, F, generator=g))
    res = vary_shots(1, [0.0], [2], [1, 3], train, pool, test, torch.randn(F, 1, generator=g), N, N, "cpu",
                     num_iterations=5, fewshot_iterations=5, shot_selection="active", stop_thresholds=[100.0, 1e-12])
    stop = res.stopping[(0.0, 2)]
    assert stop["users"] == [0, 1, 2] and stop["budget"].tolist() == [3, 2, 3]
    assert stop["budget_pairs"].tolist() == [3, 2, 3]
    assert stop["asked"].tolist() == [[1, 1, 1], [3, 2, 3]] and stop["pairs"].tolist() == [[1, 1, 1], [3, 2, 3]]
    at = res.user_acc["active"][0, 0]  # [shots, users]
    np.testing.assert_allclose(stop["acc"][0], at[0])
    np.testing.assert_allclose(stop["acc_budget"][[0, 2]], at[1][[0, 2]])  # user 1 has 2 pairs: not in 3 shots
    np.testing.assert_allclose(stop["acc"][1], stop["acc_budget"])
    assert not np.allclose(stop["acc"][0], stop["acc_budget"])  # one question and the whole budget differ here


# 7. a user with exactly P comparisons is in the point of budget P
def test_pair_budget_includes_a_user_with_exactly_that_many_comparisons():
    """Unseen user 0's dialogs hold 2 + 1 = 3 comparisons, user 1's 2 + 2 = 4. K = 0 (the reference head, w = 1):
    every test pair of user 0 is right, user 1 gets 1 of 2. Budget 3 has both users, budget 4 user 1 only."""
    F = 2
    head = torch.tensor([[1.0], [0.0]])
    train = Pairs(torch.tensor([0, 1]), 2, diffs=torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    pool = Pairs(torch.tensor([0, 0, 0, 1, 1, 1, 1]), 2, diffs=torch.ones(7, F))
    groups = [0, 0, 1, 0, 0, 1, 1]  # user 0: dialogs of 2 and 1 comparisons, user 1: two of 2
    test = Pairs(torch.tensor([0, 0, 1, 1]), 2, diffs=torch.tensor([[1.0, 0.0], [2.0, 5.0], [1.0, 0.0],
                                                                   [-1.0, 0.0]]))
    res = vary_shots(1, [0.0], [0], [1], train, pool, test, head, 2, 2, "cpu", shot_groups=groups,
                     pair_budgets=[3, 4])
    assert res.pair_budgets == [3, 4]
    np.testing.assert_array_equal(res.budget_acc["random"][0, 0], [[1.0, 0.5], [np.nan, 0.5]])


# 8. answered comparisons in suggest point from the chosen side
def test_suggest_reads_answers_in_their_direction():
    """V = I (F = K = 2); candidates as in the selection test: x0 = (200, -200), x1 = (100, -300), x2 = (-300, 100).
    An answer "a preferred" to x0 (or the difference chosen minus rejected x0) says w0 > w1, and x1 is then the
    question to ask; "b preferred" (the difference -x0) says w1 > w0, and x2 is."""
    rm = PersonalizedReward(torch.eye(2), model_name=None)
    x = torch.tensor([[200.0, -200.0], [100.0, -300.0], [-300.0, 100.0]])
    for rule in ("active", "uncertainty"):
        assert rm.suggest(x, rule=rule) == [0]
        assert rm.suggest(x, answered={0: 1}, rule=rule) == [1]
        assert rm.suggest(x, answered={0: -1}, rule=rule) == [2]
        assert rm.suggest(x[1:], answered=x[:1], rule=rule) == [0]
        assert rm.suggest(x[1:], answered=-x[:1], rule=rule) == [1]


# 9. the per-seed spread of the rules' comparison
def _seed_result(seed, random_acc, active_acc, acc):
    """A two-rule ShotsResult of shot counts [1, 2]: per-user unseen-test accuracies {rule: [2, N]} (NaN: not in the
    point), acc {rule: [4, 2]} (few-shot train mean, std, unseen test mean, std over trials)."""
    user_acc = {r: np.asarray(a, float)[None, None] for r, a in (("random", random_acc), ("active", active_acc))}
    asked = {r: np.where(np.isnan(a), np.nan, np.array([1.0, 2.0])[:, None]) for r, a in user_acc.items()}
    return ShotsResult([2], [0.0], [1, 2], ["random", "active"],
                       {r: np.asarray(a, float)[:, None, None, :] for r, a in acc.items()}, None, [0, 0],
                       user_acc=user_acc, pairs_asked=asked, seed=seed)


def test_comparison_reports_per_seed_means_intervals_and_stds(tmp_path):
    nan = np.nan
    s0 = _seed_result(0, [[0.5, 0.6, 0.7], [0.7, 0.7, 0.8]], [[0.6, 0.8, 0.7], [0.9, 0.8, 0.8]],
                      {"random": [[0.9, 0.95], [0.01, 0.02], [0.6, 0.73], [0.03, 0.04]],
                       "active": [[1.0, 1.0], [0.0, 0.0], [0.7, 0.83], [0.0, 0.0]]})
    s1 = _seed_result(1, [[0.4, 0.5, nan, 0.6], [nan] * 4], [[0.5, 0.7, nan, 0.6], [nan] * 4],
                      {"random": [[0.8, nan], [0.03, nan], [0.5, nan], [0.05, nan]],
                       "active": [[1.0, nan], [0.0, nan], [0.6, nan], [0.0, nan]]})
    report_shots([s0, s1], {}, tmp_path, "c", "C")
    out = read_json(tmp_path / "c.json")
    assert out["seeds"] == [0, 1]
    rnd, act = out["results_by_selection"]["random"], out["results_by_selection"]["active"]
    h0 = half_width((0.01, 3), (0.01, 3))  # every seed's users at one shot: variance 0.01 over 3 users
    assert rnd[0]["unseen_test"]["per_seed"] == pytest.approx([0.6, 0.5])
    assert rnd[0]["unseen_test"]["mean"] == pytest.approx(0.55)
    assert rnd[0]["unseen_test"]["ci95"] == pytest.approx([0.55 - h0, 0.55 + h0])
    assert rnd[0]["unseen_test"]["std"] == pytest.approx(0.04)  # mean over seeds of the std over trials
    assert rnd[0]["fewshot_train"] == pytest.approx({"mean": 0.85, "std": 0.02})
    assert rnd[0]["users"] == 6 and rnd[0]["pairs_asked"] == pytest.approx(1.0)
    assert act[0]["unseen_test"]["per_seed"] == pytest.approx([0.7, 0.6])
    assert act[0]["unseen_test"]["ci95"] == pytest.approx([0.65 - h0, 0.65 + h0])
    assert act[0]["vs_random"]["mean"] == pytest.approx(0.1)  # per user: 0.1, 0.2, 0 in both seeds
    assert act[0]["vs_random"]["ci95"] == pytest.approx([0.1 - h0, 0.1 + h0])
    # two shots: seed 1 has no user (per_seed None, left out of the mean), its std over trials NaN
    h1 = half_width((0.01 / 3, 3))  # [0.7, 0.7, 0.8]
    assert rnd[1]["unseen_test"]["per_seed"] == [pytest.approx(0.7 + 1 / 30), None]
    assert rnd[1]["unseen_test"]["mean"] == pytest.approx(0.7 + 1 / 30)
    assert rnd[1]["unseen_test"]["ci95"] == pytest.approx([0.7 + 1 / 30 - h1, 0.7 + 1 / 30 + h1])
    assert rnd[1]["unseen_test"]["std"] is None and rnd[1]["users"] == 3
    assert act[1]["unseen_test"]["per_seed"] == [pytest.approx(0.8 + 1 / 30), None]


# 10. the logit scale recorded in model files
def test_saved_models_record_logit_scale_1_for_the_head_and_100_from_K_1(tmp_path):
    F = 3
    seen, unseen = diff_pairs([2, 2], F), diff_pairs([2], F, seed=1)
    data = PreferenceData(seen, seen, unseen, unseen, torch.ones(F, 1))
    models = {(0.0, K): {"V": torch.ones(F, max(K, 1)), "W": torch.ones(2, max(K, 1)),
                         "W_unseen": torch.ones(1, max(K, 1))} for K in (0, 1, 2)}
    paths = save_models(tmp_path, models, data, dataset="t", fewshot_iterations=5, fewshot_learning_rate=0.1)
    scale = {name: load_lore_model(p)["logit_scale"] for name, p in paths.items()}
    K1 = PersonalizedReward.load(paths["K=1 alpha=0"])
    assert scale == {"K=0 alpha=0": 1.0, "K=1 alpha=0": 100.0, "K=2 alpha=0": 100.0}
    assert torch.allclose(K1.head(0), torch.full((F,), 0.01))  # calibrated: V w / 100


# 11. the synthetic stand-in for the published reference direction
def test_stand_in_reference_has_the_head_norm_and_is_seeded():
    head = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 0.0]).reshape(6, 1)
    r0, r1 = stand_in_reference(head, 0), stand_in_reference(head, 1)
    assert r0.shape == (6, 1) and r0.norm().item() == pytest.approx(5.0, rel=1e-6)
    assert r1.norm().item() == pytest.approx(5.0, rel=1e-6)
    assert torch.equal(stand_in_reference(head, 0), r0) and not torch.allclose(r0, r1)
    cos = (r0.T @ head).item() / 25
    assert cos == pytest.approx(0.730283, abs=1e-5)  # seeded: torch's CPU generator at seed 0 + 7919
    assert r0[:2, 0].tolist() == pytest.approx([1.704047, 3.286232], abs=1e-5)
    big = torch.ones(400, 1)
    ref = stand_in_reference(big, 2)
    assert ref.norm().item() == pytest.approx(20.0, rel=1e-6)
    assert abs((ref.T @ big).item()) / 400 < 0.2  # unrelated to the head: far from parallel
