"""Choice quality (lorelib/choice.py): known answers on planted candidate sets, the vectorised metrics against a plain
loop, every method's per-candidate scores against its pair margins, and the datasets' candidate sets."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

import utils
from lorelib import experiment, methods
from lorelib.choice import Candidates, ChoiceRun, choice_quality, kendall_tau, lore_scorer, method_scorer, pick
from lorelib.evaluate import MethodResult
from lorelib.files import save_tensors
from lorelib.pal import PAL
from lorelib.pipelines import lore_runs
from PersonalLLM import personalllm
from PRISM import prism


def random_sets(kind, Q=300, P=40, J=5, C=7, F=6, seed=0, ties=False):
    """Candidates with random rows (some prompts padded to fewer candidates) and random truth."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(P * J, F, generator=g)
    rows = torch.arange(P * J).reshape(P, J)
    n = torch.randint(2, J + 1, (P,), generator=g)
    rows[torch.arange(J) >= n[:, None]] = -1
    prompt, user = torch.randint(P, (Q,), generator=g), torch.randint(C, (Q,), generator=g)
    truth = torch.randn(Q, J, generator=g, dtype=torch.float64)
    if ties:
        truth = truth.mul(2).round()  # ratings with ties
    truth[rows[prompt] < 0] = float("nan")
    return Candidates(table, rows, prompt, user, truth, C, kind)


def truth_scorer(c):
    return c.truth.nan_to_num()


@pytest.mark.parametrize("sign", [1, -1])
def test_true_reward_picks_the_best_and_reversed_picks_the_worst(sign):
    c = random_sets("reward")
    res = choice_quality(lambda c: sign * truth_scorer(c), c)
    s = res["summary"]
    best = c.truth.masked_fill(~c.valid, -math.inf if sign > 0 else math.inf)
    expected = best.argmax(1) if sign > 0 else best.argmin(1)
    assert torch.equal(res["picks"], expected)
    assert s["regret"]["mean"] == (0.0 if sign > 0 else 1.0) and s["regret"]["std"] == 0.0
    r = choice_quality(lambda c: sign * truth_scorer(c), random_sets("rating"))["summary"]
    assert r["top"]["mean"] == (1.0 if sign > 0 else 0.0)
    assert r["spearman"]["mean"] == pytest.approx(sign * 1.0)


def tiny_planted():
    """2 prompts x 3 candidates in 2-d, 2 users on both prompts; the head [1, 0] rewards the first coordinate."""
    table = torch.tensor([[3., 0], [1, 0], [2, 0], [0, 1], [5, 0], [4, 2]])
    rows = torch.tensor([[0, 1, 2], [3, 4, 5]])
    truth = torch.tensor([[0., 10, 4],     # user 0, prompt 0: the head picks row 0 (3), truth 0 -> regret 1
                          [1, 0, 3],       # user 0, prompt 1: the head picks row 4 (5), truth 0 -> regret 1
                          [6, 2, 8],       # user 1, prompt 0: head's row 0 is 6: (8 - 6) / (8 - 2) = 1/3
                          [2, 7, 9]], dtype=torch.float64)  # user 1, prompt 1: row 4 is 7: (9 - 7) / 7 = 2/7
    return Candidates(table, rows, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]), truth, 2, "reward")


def test_reference_head_regret_and_win_rates_equal_a_hand_computation():
    c = tiny_planted()
    head = torch.tensor([[1.0], [0.0]])
    ref = choice_quality(lore_scorer(head, torch.ones(1)), c)
    assert ref["picks"].tolist() == [0, 1, 0, 1]
    per_user = [1.0, (1 / 3 + 2 / 7) / 2]
    assert ref["summary"]["regret"]["mean"] == pytest.approx(np.mean(per_user))
    assert ref["summary"]["regret"]["std"] == pytest.approx(np.std(per_user))
    # a user-specific LoRe: user 0 follows coordinate 2, user 1 coordinate 1, K = 2
    V, W = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    lore = choice_quality(lore_scorer(V, W), c, against={"ref": ref["picks"]})
    assert lore["picks"].tolist() == [0, 2, 0, 1]  # user 0 on prompt 0: all 0 on coordinate 2, the first wins
    # wins over the head's picks: user 0: tie (same pick), 3 > 0 -> (0.5 + 1) / 2; user 1: two ties -> 0.5
    assert lore["summary"]["win_vs_ref"]["mean"] == pytest.approx((0.75 + 0.5) / 2)
    # chance: a random pick's regret, (best - mean) / (best - worst), and its win rate against the head's pick
    chance = [[(10 - 14 / 3) / 10, (3 - 4 / 3) / 3], [(8 - 16 / 3) / 6, (9 - 6) / 7]]
    assert lore["chance"]["regret"]["mean"] == pytest.approx(np.mean(np.mean(chance, 1)))
    assert lore["chance"]["win_vs_ref"]["mean"] == pytest.approx(np.mean([(2.5 / 3 + 2.5 / 3) / 2,
                                                                          (1.5 / 3 + 1.5 / 3) / 2]))


def test_ratings_with_ties_top_spearman_and_chance_by_hand():
    table = torch.randn(4, 3)
    truth = torch.tensor([[10., 20, 20, 40], [30, 30, 10, 5], [30, 30, 10, 5]], dtype=torch.float64)
    c = Candidates(table, torch.tensor([[0, 1, 2, 3]]), torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), truth, 3,
                   "rating")
    res = choice_quality(lambda c: torch.tensor([[1., 2, 3, 4], [0, 1, 2, 3], [0, 3, 2, 1]]), c)
    s = res["summary"]
    assert res["picks"].tolist() == [3, 3, 1]
    # user 0 picks its top, user 1 its worst, user 2 the second of its two tied tops (a tie at the top counts)
    assert s["top"]["mean"] == pytest.approx(2 / 3)
    assert s["gain"]["mean"] == pytest.approx(((40 - 22.5) + (5 - 18.75) + (30 - 18.75)) / 3)
    # user 0: ranks [1, 2, 3, 4] against [1, 2.5, 2.5, 4]: 4.5 / sqrt(5 * 4.5); user 1: [1, 2, 3, 4] against
    # [3.5, 3.5, 2, 1]: centred (-1.5, -.5, .5, 1.5) . (1, 1, -.5, -1.5) = -4.5, |.|^2 = 5 and 4.5; user 2:
    # [1, 4, 3, 2] against the same: (-1.5, 1.5, .5, -.5) . (1, 1, -.5, -1.5) = 0.5
    assert s["spearman"]["mean"] == pytest.approx((4.5 - 4.5 + 0.5) / math.sqrt(22.5) / 3)
    # chance: a tie at the top counts for each tied reply: users 1 and 2 have two of four
    assert res["chance"]["top"]["mean"] == pytest.approx((1 / 4 + 2 / 4 + 2 / 4) / 3)
    # a user whose ratings are all equal has no Spearman (left out of the mean, not counted as 0)
    flat = Candidates(table, torch.tensor([[0, 1, 2, 3]]), torch.tensor([0, 0]), torch.tensor([0, 1]),
                      torch.tensor([[10., 20, 30, 40], [50, 50, 50, 50]], dtype=torch.float64), 2, "rating")
    s = choice_quality(lambda c: torch.tensor([[1., 2, 3, 4], [1, 2, 3, 4]]), flat)["summary"]
    assert s["spearman"] == {"mean": 1.0, "std": 0.0, "users": 1} and s["top"]["users"] == 2


def plain_metrics(c, scores, against):
    """Per user mean of each metric, query by query with Python lists (average ranks by hand)."""
    out = {}
    for q in range(len(c.prompt)):
        idx = [j for j in range(c.rows.shape[1]) if c.rows[c.prompt[q], j] >= 0]
        t, s = [float(c.truth[q, j]) for j in idx], [float(scores[q, j]) for j in idx]
        p = max(range(len(idx)), key=lambda j: (s[j], -j))
        vals = {}
        if c.kind == "reward":
            vals["regret"] = (max(t) - t[p]) / (max(t) - min(t))
            for name, other in against.items():
                o = t[idx.index(int(other[q]))]
                vals[f"win_vs_{name}"] = 1.0 if t[p] > o else 0.5 if t[p] == o else 0.0
        else:
            def ranks(x):
                return [sum(y < v for y in x) + (sum(y == v for y in x) + 1) / 2 for v in x]
            vals["top"] = float(t[p] == max(t))
            vals["gain"] = t[p] - sum(t) / len(t)
            if len(set(t)) > 1 and len(set(s)) > 1:
                vals["spearman"] = float(np.corrcoef(ranks(s), ranks(t))[0, 1])
        for k, v in vals.items():
            out.setdefault(k, {}).setdefault(int(c.user[q]), []).append(v)
    return {k: np.mean([np.mean(v) for v in users.values()]) for k, users in out.items()}


@pytest.mark.parametrize("kind", ["reward", "rating"])
def test_vectorised_metrics_equal_a_plain_loop(kind):
    c = random_sets(kind, ties=kind == "rating")
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(c.truth.shape, generator=g).round()  # ties in the scores too: the first candidate wins
    against = {"ref": pick(torch.randn(c.truth.shape, generator=g), c.valid)} if kind == "reward" else None
    got = choice_quality(lambda c: scores, c, against)["summary"]
    expected = plain_metrics(c, scores, against or {})
    assert {k: v["mean"] for k, v in got.items()} == pytest.approx(expected)


def test_pads_are_never_picked_and_bad_sets_are_refused():
    c = random_sets("reward")
    huge = torch.where(c.valid, torch.zeros(()), torch.full((), 1e9))
    assert bool(c.valid.gather(1, choice_quality(lambda c: huge, c)["picks"][:, None]).all())
    with pytest.raises(ValueError, match="NaN or infinite"):
        choice_quality(lambda c: torch.full(c.truth.shape, float("nan")), c)
    with pytest.raises(utils.InputError, match="finite exactly where"):
        Candidates(c.table, c.rows, c.prompt, c.user, c.truth.nan_to_num(), c.num_users, "reward")


def test_lore_scorer_equals_a_plain_loop():
    c = random_sets("reward", C=4, F=5)
    V, W = torch.randn(5, 3), torch.softmax(torch.randn(4, 3), 1)
    s = lore_scorer(V, W)(c)
    for q in [0, 7, 123]:
        for j in range(c.rows.shape[1]):
            if c.rows[c.prompt[q], j] >= 0:
                e = c.table[c.rows[c.prompt[q], j]]
                assert float(s[q, j]) == pytest.approx(float(e @ V @ W[c.user[q]]), abs=1e-5)


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # one discordant pair of six
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(2 * 3))  # tau-b: a tie in x
    assert kendall_tau([3, 2, 1], [1, 2, 3]) == -1 and math.isnan(kendall_tau([1, 1], [1, 2]))


def test_choice_run_scores_each_group_with_its_own_weights():
    """ChoiceRun on LoRe's runs: seen users with W, unseen with W_unseen; the head and the K = 1 reward are the win
    rates' references (each wins half against itself; the head, measured before K = 1, gets its win rate against
    it at the end); rank agreement pairs each group's test accuracy with that group's metrics."""
    sets = {"seen": random_sets("reward", C=7, F=6, seed=0), "unseen": random_sets("reward", C=5, F=6, seed=1)}
    sets["unseen"].table = sets["seen"].table
    g = torch.Generator().manual_seed(2)
    head, v = torch.randn(6, 1, generator=g), torch.randn(6, 1, generator=g)
    V, W, W_u = torch.randn(6, 2, generator=g), torch.rand(7, 2, generator=g), torch.rand(5, 2, generator=g)
    fits = [(head, torch.ones(7, 1), torch.ones(5, 1)), (v, torch.ones(7, 1), torch.ones(5, 1)), (V, W, W_u)]
    seen, unseen = [0.6, 0.7, 0.9], [0.9, 0.7, 0.6]  # seen test, unseen test accuracy at K = 0, 1, 2
    run, results = ChoiceRun(sets, head), []
    for r, (V_k, W_k, W_uk), s, u in zip(lore_runs([0, 1, 2], [0.0], head, 6), fits, seen, unseen):
        model = r.make()
        model.V, model.W = V_k, W_k
        result = MethodResult(r, {"seen_test": {"accuracy": np.array([s])}, "unseen_test": {"accuracy": np.array([u])}},
                              0.0)
        result.choice = run.measure(r.entry, model, W_uk)
        results.append(result)
    assert "win_vs_BT" not in results[0].choice["seen"]  # the head came before the K = 1 reward ...
    run.finish(results)
    ref, bt, lore = run.ranks
    assert ref["seen"] == results[0].choice["seen"] and "win_vs_BT" in ref["seen"]  # ... and has it at the end
    assert ref["seen"]["win_vs_ref"] == {"mean": 0.5, "std": 0.0, "users": 7}
    assert bt["unseen"]["win_vs_BT"] == {"mean": 0.5, "std": 0.0, "users": 5}
    against = {"ref": choice_quality(lore_scorer(head, torch.ones(1)), sets["unseen"])["picks"],
               "BT": choice_quality(lore_scorer(v, torch.ones(1)), sets["unseen"])["picks"]}
    assert lore["unseen"] == choice_quality(lore_scorer(V, W_u), sets["unseen"], against)["summary"]
    taus = run.payload(results)["rank_agreement"]
    for group in ("seen", "unseen"):
        sign = 1 if group == "seen" else -1
        regret = [-r[group]["regret"]["mean"] for r in run.ranks]
        assert taus[group]["regret"] == pytest.approx(sign * kendall_tau([0, 1, 2], regret))


# --- the baselines' per-candidate scores ---

def planted_pairs(F=8, R=200, C=6, m=20, seed=0):
    """Random table pairs of C users, each user oriented by its own direction."""
    g = torch.Generator().manual_seed(seed)
    table, U = torch.randn(R, F, generator=g), torch.randn(C, F, generator=g)
    chosen, rejected = [], []
    for u in range(C):
        a, b = torch.randint(R, (2, m), generator=g)
        b = torch.where(a == b, (b + 1) % R, b)
        better = table[a] @ U[u] > table[b] @ U[u]
        chosen.append(torch.where(better, a, b))
        rejected.append(torch.where(better, b, a))
    return utils.Pairs.from_indices(table, chosen, rejected)


SMALL = {"per_user_bt": {"num_iterations": 50}, "vpl": dict(hidden_dim=16, latent_dim=8, num_epochs=1),
         "pal": dict(dim=16, num_epochs=1, fewshot_epochs=2)}


@pytest.mark.parametrize("name,variant", [("per_user_bt", None), ("vpl", None), ("pal", "B"), ("pal", "A")])
def test_scores_of_a_two_candidate_prompt_give_the_pair_margin(name, variant):
    """Every method scores candidates with the weights / state its accuracy uses: for a prompt of a pair's two
    rows, score(chosen) - score(rejected) is the pair's margin (seen users and new users)."""
    train, fewshot = planted_pairs(seed=0), planted_pairs(seed=1, C=4)
    settings = dict(SMALL[name], **({"variant": variant} if variant else {}))
    model = methods.make_method(name, 8, seed=0, **settings).fit(train, "cpu")
    state = model.personalize(fewshot, "cpu")
    for pairs, st in [(train, None), (fewshot, state)]:
        rows = torch.stack([pairs.chosen, pairs.rejected], 1)  # one prompt per pair
        s = model.scores(pairs.table, rows, torch.arange(len(rows)), pairs.user, st, "cpu")
        torch.testing.assert_close(s[:, 0] - s[:, 1], model.margins(pairs, st, "cpu"), atol=1e-4, rtol=1e-4)


def test_pal_b_prompt_proxy_is_the_mean_of_all_the_candidates():
    train = planted_pairs()
    model = PAL(8, seed=0, **SMALL["pal"]).fit(train, "cpu")
    rows = torch.tensor([[0, 1, 2, -1], [3, 4, 5, 6]])
    prompt, user = torch.tensor([0, 1, 1]), torch.tensor([2, 2, 5])
    s = model.scores(train.table, rows, prompt, user, None, "cpu")
    with torch.no_grad():
        for q in range(3):
            r = rows[prompt[q]][rows[prompt[q]] >= 0]
            proxy = train.table[r].mean(0)
            a = sum(w * g(proxy) for w, g in zip(model.user_weights()[user[q]], model.g))
            expected = model.tau.exp().clamp(max=100) * nnf.cosine_similarity(a[None], model.f(train.table[r]))
            torch.testing.assert_close(s[q, :len(r)], expected, atol=1e-5, rtol=1e-5)


def test_the_choice_hook_changes_no_baseline_number():
    train, test, fewshot, test_u = (planted_pairs(seed=s, C=c) for s, c in [(0, 6), (2, 6), (1, 4), (3, 4)])
    settings = {k: v for k, v in SMALL.items()}
    plain = experiment.run_methods(list(SMALL), (train, test, fewshot, test_u), "cpu", settings=settings)
    sets = {g: Candidates(train.table, torch.arange(200).reshape(50, 4), torch.arange(50).repeat(n),
                          torch.arange(n).repeat_interleave(50), torch.randn(50 * n, 4, dtype=torch.float64), n,
                          "reward") for g, n in [("seen", 6), ("unseen", 4)]}
    run = ChoiceRun(sets, torch.randn(8, 1))
    hooked = experiment.run_methods(list(SMALL), (train, test, fewshot, test_u), "cpu", settings=settings, choice=run)
    for e in plain:
        plain[e].pop("seconds"), hooked[e].pop("seconds")
    assert hooked == plain and set(run.baselines) == set(SMALL)
    for e in SMALL:  # new users are scored with their few-shot state, seen users with the fit (refit: the same seed)
        utils.set_seed(0)
        model = methods.make_method(e, 8, seed=0, **methods.full_settings(e, settings[e])).fit(train, "cpu")
        state = model.personalize(fewshot, "cpu")
        for g, st in [("seen", None), ("unseen", state)]:
            expected = choice_quality(method_scorer(model, st), sets[g], run.against[g])["summary"]
            assert run.baselines[e][g] == expected


# --- the datasets' candidate sets ---

def test_personalllm_sets_hold_every_user_on_the_same_test_prompts_with_its_true_reward():
    utils.set_seed(0)
    data = personalllm.load(synthetic=True, synthetic_prompts=(300, 40), synthetic_features=16, N=12, N_unseen=5,
                            train_density=0.05, fewshot_density=0.02, choice=True, choice_prompts=10)
    sets, W = data.info["choice"], data.info["true_weights"]
    assert (len(sets["seen"].prompt), len(sets["unseen"].prompt)) == (12 * 10, 5 * 10)
    prompts = sets["seen"].rows[:, 0] // 8
    assert torch.equal(sets["unseen"].rows, sets["seen"].rows) and len(torch.unique(prompts)) == 10
    for g, test in [("seen", data.seen_test), ("unseen", data.unseen_test)]:
        c = sets[g]
        assert c.table is test.table and W[g].shape == (c.num_users, 10)
        # the true reward's pick on each prompt is the chosen response of that user's test pair on it
        picks = choice_quality(truth_scorer, c)["picks"]
        on = torch.isin(test.chosen // 8, prompts)
        assert torch.equal(c.rows[c.prompt, picks], test.chosen[on])  # both by user, then prompt


def test_prism_synthetic_first_turns_carry_the_users_ratings():
    data = prism.load(synthetic=True, synthetic_users=60, choice=True)
    sets = data.info["choice"]
    for g, n in [("seen", data.N), ("unseen", data.N_unseen)]:
        c = sets[g]
        assert c.kind == "rating" and c.rows.shape[1] == 4 and c.num_users == n and bool(c.valid.all())
        assert torch.unique(c.user).tolist() == list(range(n))  # every user has a test dialog
        assert ((c.truth >= 1) & (c.truth <= 100)).all() and bool((c.truth == c.truth.round()).all())
        assert bool((c.truth[:, 0] == c.truth.max(1).values).all())  # the chosen reply has the top rating


def test_prism_file_without_ratings_is_refused_with_the_command_that_adds_them(tmp_path):
    t = prism.make_synthetic(40, 8)
    t.pop("true_directions")
    old = {k: v for k, v in t.items() if k not in prism.SCORES}
    save_tensors(tmp_path / "embeddings.safetensors", old)
    with pytest.raises(utils.InputError, match=r"has no `chosen_score` tensor .*add it with: python .*prepare\.py "
                                               r"data_dir=.*without embedding again.*choice_quality=False"):
        prism.load(data_dir=tmp_path, choice=True)
    assert "choice" not in prism.load(data_dir=tmp_path).info  # accuracy only, when asked for
    save_tensors(tmp_path / "embeddings.safetensors", old, metadata={"converted_from": "x"})
    with pytest.raises(utils.InputError, match="published pkl files hold no ratings"):
        prism.check_config({"choice_quality": True, "data_dir": str(tmp_path)})
    save_tensors(tmp_path / "embeddings.safetensors", t)
    c = prism.load(data_dir=tmp_path, choice=True).info["choice"]["seen"]
    assert c.kind == "rating" and len(c.prompt) > 0
