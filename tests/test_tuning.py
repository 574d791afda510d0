"""The baselines' tuned rows and what a table shows of a fit: the grid is scored on held-out pairs of the seen users'
training data only, PAL's per-epoch scores equal separate fits, PAL's bias decay switch, VPL's duplicated passes and
context lengths, near-ties counted and flagged."""
import numpy as np
import pytest
import torch
from test_baselines import planted

import utils
from lorelib import experiment, methods, report, tuning
from lorelib.data import RESULT_NAMES, TIE_TOLERANCE
from lorelib.evaluate import evaluate, holdout_pairs
from lorelib.methods import baseline_runs
from lorelib.metrics import pair_metrics
from lorelib.newusers import pseudo_new_split, validate_new_users
from lorelib.pal import PAL
from lorelib.vpl import VPL

PAL_TINY = dict(dim=16, batch_size=8, fewshot_epochs=2)
GRID = {"pal": {"num_epochs": [1, 2], "user_learning_rate,fewshot_learning_rate": [5e-3, 0.5]},
        "vpl": {"context_length": ["fixed", "2..C"]}}


@pytest.fixture(scope="module")
def data():
    d = planted(seen_per_type=8, unseen_per_type=4)
    return {k: d[k] for k in ("train", "test", "fewshot", "test_unseen")}


def flip_labels(pairs, seed):
    """The same pairs with chosen and rejected swapped on a random half of them."""
    swap = torch.rand(len(pairs.user), generator=torch.Generator().manual_seed(seed)) < 0.5
    table, chosen, rejected = pairs.sides()
    return utils.Pairs(pairs.user, pairs.num_users, table=table, chosen=torch.where(swap, rejected, chosen),
                       rejected=torch.where(swap, chosen, rejected))


def test_the_tuned_choice_never_reads_test_pairs(data):
    """Flipping half the test labels (seen and unseen users) changes the test accuracies and nothing of the tuning:
    every point's held-out score and the chosen point stay the same."""
    settings = {"pal": PAL_TINY, "vpl": dict(hidden_dim=8, latent_dim=4, num_epochs=1)}
    runs = [experiment.run_methods(["pal", "vpl"], (data["train"], test, data["fewshot"], test_u), "cpu",
                                    settings=settings, tune_grid=GRID, validation_fraction=0.2)
            for test, test_u in [(data["test"], data["test_unseen"]),
                                 (flip_labels(data["test"], 1), flip_labels(data["test_unseen"], 2))]]
    for name in ("pal", "vpl"):
        a, b = runs[0][f"{name}_tuned"]["tuning"], runs[1][f"{name}_tuned"]["tuning"]
        grid = tuning.grid_points(GRID[name])  # the grid's points first, then any widening of an edge axis
        assert [p["settings"] for p in a["points"][:len(grid)]] == grid and a["chosen"] in [
            p["settings"] for p in a["points"]]
        assert [p["validation"] for p in a["points"]] == [p["validation"] for p in b["points"]]
        assert a["chosen"] == b["chosen"] == max(a["points"], key=lambda p: p["validation"])["settings"]
        assert all(runs[0][f"{name}_tuned"]["settings"][k] == v for k, v in a["chosen"].items())
        assert runs[0][f"{name}_tuned"]["settings"] == runs[1][f"{name}_tuned"]["settings"]
        for entry in (name, f"{name}_tuned"):  # the test sets did change what is measured on them
            assert runs[0][entry]["seen_test"]["mean"] != runs[1][entry]["seen_test"]["mean"]
            assert runs[0][entry]["unseen_test"]["mean"] != runs[1][entry]["unseen_test"]["mean"]
    pal = runs[0]["pal_tuned"]
    assert len({p["validation"] for p in pal["tuning"]["points"]}) > 1  # the grid's points are told apart
    assert pal["label"] == "PAL (tuned)" and pal["settings"]["user_learning_rate"] == pal["tuning"]["chosen"][
        "user_learning_rate"] == pal["settings"]["fewshot_learning_rate"]


def test_pal_scored_after_each_epoch_equals_a_fit_of_that_many_epochs(data):
    """One fit of the largest num_epochs scored after every epoch gives the margins, and tune the held-out scores,
    of separate fits with num_epochs = 1, 2, 3 (one fit per point of the other settings)."""
    fit, held = holdout_pairs(data["train"], 0.2, 0)
    seen = {}
    model = PAL(16, K=2, num_epochs=3, **PAL_TINY)
    model.fit(fit, "cpu", on_epoch=lambda e: seen.__setitem__(e, model.margins(held)))
    assert sorted(seen) == [1, 2, 3]
    for e in (1, 3):
        alone = PAL(16, K=2, num_epochs=e, **PAL_TINY).fit(fit, "cpu")
        torch.testing.assert_close(seen[e], alone.margins(held), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen[1], seen[3])

    made = []
    grid = {"num_epochs": [1, 3], "K": [2, 3]}
    out = tuning.tune(lambda s: made.append(s) or PAL(16, **PAL_TINY, **s), grid, data["train"],
                      validation_fraction=0.2, seed=0, device="cpu", log=lambda _: None, widen=0)
    assert len(made) == 1 + 2  # one to read fit's signature, then one fit per K
    for point in out["points"]:
        alone = PAL(16, **PAL_TINY, **point["settings"]).fit(fit, "cpu")
        assert point["validation"] == pytest.approx(float(np.nanmean(alone.accuracies(held))), abs=1e-9)


@pytest.mark.parametrize("variant", ["A", "B"])
def test_pal_bias_decay_switch_puts_the_biases_in_a_group_without_decay(data, variant, monkeypatch):
    """bias_decay=True (as released): weight decay on every projector parameter, biases included; False: on the
    weight matrices only."""
    groups = []
    adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda g, **kw: groups.append(g) or adam(g, **kw))
    for bias_decay in (True, False):
        groups.clear()
        model = PAL(16, variant=variant, dim=8, num_epochs=1, bias_decay=bias_decay)
        model.fit(data["train"].select_users(range(3)), "cpu")
        decay = {id(p) for g in groups[0] if g["weight_decay"] > 0 for p in g["params"]}
        projectors = [p for m in ([model.f] + ([model.g] if variant == "B" else [])) for p in m.parameters()]
        assert {id(p) for p in projectors if p.dim() >= 2} <= decay
        biases = {id(p) for p in projectors if p.dim() < 2}
        assert (biases <= decay) if bias_decay else not (biases & decay)
        assert sum(len(g["params"]) for g in groups[0]) == len(projectors) + 1  # tau (B) or P (A), no decay


def test_vpl_duplicates_pass_over_every_pair_that_many_times_with_their_own_contexts(data):
    """num_duplicates=3: an epoch passes over each pair 3 times, each copy with its own contexts; "2..C" draws
    2 to 8 context pairs, "fixed" always 8."""
    small = data["train"].select_users(range(0, data["train"].num_users, 2))  # 8 users x 30 pairs
    table, chosen, rejected = small.sides()
    M = len(small.user)
    for rule, D in [("2..C", 3), ("fixed", 1)]:
        model = VPL(16, hidden_dim=8, latent_dim=4, num_epochs=1, num_duplicates=D, context_length=rule)
        steps = -(-D * M // model.batch_size)
        items, contexts = [], []
        reward, ctx_of = model.reward, model._contexts
        model.reward = lambda e, z: items.append(e) or reward(e, z)
        model._contexts = lambda t, c, r, ctx: contexts.append(ctx.clone()) or ctx_of(t, c, r, ctx)
        model.fit(small)
        rows = {tuple(v.tolist()): i for i, v in enumerate(table)}
        targets = [(rows[tuple(e.tolist())], rows[tuple(f.tolist())]) for x in items[:steps]
                   for e, f in zip(x[:len(x) // 2], x[len(x) // 2:])]
        ctx = torch.cat(contexts[:steps])
        assert len(targets) == D * M == len(ctx)
        pairs = list(zip(chosen.tolist(), rejected.tolist()))
        assert sorted(targets) == sorted(pairs * D)  # each pair D times
        lengths = (ctx >= 0).sum(1)
        assert (lengths.min(), lengths.max()) == ((2, 8) if rule == "2..C" else (8, 8))
        if D > 1:
            by_pair = {}
            for target, c in zip(targets, ctx):
                by_pair.setdefault(target, []).append(tuple(sorted(c[c >= 0].tolist())))
            unique = [v for k, v in by_pair.items() if pairs.count(k) == 1]
            assert all(len(v) == D for v in unique)
            assert np.mean([len(set(v)) == D for v in unique]) > 0.9  # own contexts per copy


def test_near_ties_count_half_and_a_collapsed_fit_is_flagged(data, monkeypatch, capsys, tmp_path):
    """pair_metrics: a margin <= 0 is wrong in "accuracy", a near-tie (|margin| <= TIE_TOLERANCE) half in
    "ties_half"; a PAL whose item features collapse (all margins 0) scores 0 / 0.5 / ties 1 in run_methods, and
    report_run flags it."""
    margins = torch.tensor([0.0, TIE_TOLERANCE / 2, -TIE_TOLERANCE / 2, 1.0, -1.0, 3 * TIE_TOLERANCE])
    stats = pair_metrics(margins, utils.Pairs(torch.tensor([0, 0, 0, 1, 1, 1]), 2, diffs=torch.zeros(6, 1)))
    np.testing.assert_allclose(stats["accuracy"], [1 / 3, 2 / 3])  # as published: only a margin <= 0 is wrong
    np.testing.assert_allclose(stats["ties_half"], [0.5, 2 / 3])
    np.testing.assert_allclose(stats["ties"], [1, 0])

    fit = PAL.fit

    def collapsed(self, pairs, device=None, on_epoch=None):
        fit(self, pairs, device, on_epoch)
        with torch.no_grad():
            self.f[-1].weight.zero_()  # f(e) = the last bias for every item: every margin is 0
        return self
    monkeypatch.setattr(PAL, "fit", collapsed)
    out = experiment.run_methods(["per_user_bt", "pal"], (data["train"], data["test"], data["fewshot"],
                                                          data["test_unseen"]), "cpu", settings={"pal": PAL_TINY})
    for n in RESULT_NAMES:
        assert (out["pal"][n]["mean"], out["pal"][n]["ties_half"], out["pal"][n]["ties"]) == (0.0, 0.5, 1.0)
        assert out["per_user_bt"][n]["ties"] < 0.05 and out["per_user_bt"][n]["ties_half"] >= out[
            "per_user_bt"][n]["mean"]
    runs = baseline_runs(["per_user_bt", "pal"], 16, overrides={"pal": PAL_TINY})
    results = evaluate(runs, (data["train"], data["test"], data["fewshot"], data["test_unseen"]), "cpu")
    capsys.readouterr()
    report.report_run(results, {}, tmp_path, "t", "T")
    table = capsys.readouterr().out
    assert "PAL (TLDR config) * [ties 100%]" in table and "per-user BT [ties" not in table
    assert "degenerate fit (PAL (TLDR config))" in table and "*: departs from its released code" in table


def test_stored_tuned_settings_give_the_same_row_in_both_pipelines(data):
    """tuned_settings: a "<name>_tuned" run with the released settings, the overrides, then the stored budget, the
    same in run_baselines and run_baselines_vary_shots."""
    stored = {"pal": {"num_epochs": 2, "user_learning_rate": 0.5, "fewshot_learning_rate": 0.5, "K": 3}}
    plain = experiment.run_methods(["pal"], (data["train"], data["test"], data["fewshot"], data["test_unseen"]), "cpu",
                                    settings={"pal": PAL_TINY}, tuned_settings=stored)
    shots = experiment.method_curves(["pal"], 1, [10], data["train"], data["fewshot"], data["test_unseen"],
                                               "cpu", settings={"pal": PAL_TINY}, tuned_settings=stored)
    tuned = plain["pal_tuned"]
    assert tuned["settings"] == {**methods.full_settings("pal", PAL_TINY), **stored["pal"]}
    assert tuned["tuning"] == {"provenance": "given: tuned_settings", "chosen": stored["pal"], "data": None}
    assert shots["pal_tuned"]["label"] == tuned["label"] == "PAL (tuned)"
    assert shots["pal_tuned"]["settings"] == tuned["settings"] and shots["pal_tuned"]["tuning"] == tuned["tuning"]
    assert shots["pal"]["settings"] == plain["pal"]["settings"] == methods.full_settings("pal", PAL_TINY)
    assert tuned["unseen_test"]["mean"] != plain["pal"]["unseen_test"]["mean"]
    assert shots["pal_tuned"]["accuracies"][2][0] != shots["pal"]["accuracies"][2][0]


class Bump:
    """A toy method whose held-out accuracy is a known function of its settings: 1 - |x - 7| / 10 - |lr - 0.1|
    (x an integer setting, best at 7; lr best at 0.1)."""
    def __init__(self, x, lr=0.1):
        self.x, self.lr = x, lr

    def fit(self, pairs, device=None):
        return self

    def accuracies(self, pairs, state=None, device=None):
        return np.full(pairs.num_users, 1 - abs(self.x - 7) / 10 - abs(self.lr - 0.1))


def test_an_edge_choice_is_widened_until_interior_or_a_hard_limit(data):
    """x's best (7) lies beyond the grid [1, 3]: the search steps by the grid's ratio to 9, then 27 (worse), and
    stops with 9 inside; lr's best is inside the grid: no widening; an axis that walks into its range rule stops
    there with the edge noted; a search out of steps notes that too."""
    out = tuning.tune(lambda s: Bump(**s), {"x": [1, 3], "lr": [0.01, 0.1, 1.0]}, data["train"], log=lambda *a: None,
                      rules={"x": "int >= 1", "lr": "> 0"})
    assert out["chosen"] == {"x": 9, "lr": 0.1}
    assert out["edges"]["x"] == {"values": [1, 3, 9, 27], "chosen": 9, "edge": False, "limit": None}
    assert out["edges"]["lr"]["values"] == [0.01, 0.1, 1.0] and not out["edges"]["lr"]["edge"]
    low = tuning.tune(lambda s: Bump(s["x"] + 10), {"x": [3, 2]}, data["train"], log=lambda *a: None,
                      rules={"x": "int >= 1"})  # best x + 10 = 7: x = -3, below the rule's 1
    assert low["chosen"] == {"x": 1} and low["edges"]["x"]["edge"] and "out of range" in low["edges"]["x"]["limit"]
    far = tuning.tune(lambda s: Bump(**s), {"x": [1, 2]}, data["train"], log=lambda *a: None, widen=2)
    assert far["chosen"] == {"x": 8} and far["edges"]["x"]["limit"] == "widened 2 times"  # 1, 2, 4, 8
    assert tuning.step_beyond([1e-4, 1e-3], True) == pytest.approx(1e-2) and tuning.step_beyond([2, 5], False) == 1
    assert tuning.step_beyond([128, 512], False) == 32 and tuning.step_beyond([2, 3], True) == 4  # ratio 1.5: +1
    assert tuning.step_beyond([0.0, 1e-4], False) == pytest.approx(-1e-4)  # from 0: by the difference
    assert tuning.step_beyond(["fixed", "2..C"], True) is None and tuning.step_beyond([True, False], True) is None


class Epochs:
    """An epoch-scored model (a fit that takes on_epoch) whose held-out accuracy falls with each epoch."""

    def __init__(self, num_epochs):
        self.num_epochs, self.epoch = num_epochs, 0

    def fit(self, pairs, device=None, on_epoch=None):
        for e in range(1, self.num_epochs + 1):
            self.epoch = e
            if on_epoch is not None:
                on_epoch(e)
        return self

    def accuracies(self, pairs, state=None, device=None):
        return np.full(pairs.num_users, 1 - self.epoch / 10)


def test_an_epoch_axis_widened_below_one_stops_at_its_rule(data):
    """The fewest epochs best: the widening steps from 1 to 0 (half, rounded), which every fitted method's rule
    refuses (a model is scored after epochs 1, 2, ...: no fit is scored after 0)."""
    out = tuning.tune(lambda s: Epochs(**s), {"num_epochs": [1, 2]}, data["train"], log=lambda *a: None,
                      rules={"num_epochs": "int >= 1"})
    assert out["chosen"] == {"num_epochs": 1} and out["edges"]["num_epochs"]["edge"]
    assert "0 is out of range" in out["edges"]["num_epochs"]["limit"]
    assert [p["validation"] for p in out["points"]] == pytest.approx([0.9, 0.8])
    with pytest.raises(RuntimeError, match="never scored after epoch 0"):  # a rule that let 0 through
        tuning.tune(lambda s: Epochs(**s), {"num_epochs": [1, 2]}, data["train"], log=lambda *a: None,
                    rules={"num_epochs": "int >= 0"})
    for method in ("pal", "vpl", "mrm"):
        assert methods.METHODS[method].rules["num_epochs"] == "int >= 1"


def test_pseudo_new_users_come_from_seen_training_pairs_only(data):
    """The pseudo-new split: a share of the seen users, their few-shot and held-out pairs are their own training
    pairs (a partition of them), the other seen users keep theirs (only the seen training pairs are passed: no
    unseen user's pair can enter); the validation is seeded."""
    train = data["train"]
    split = pseudo_new_split(train, shots=5, fraction=0.25, seed=3)
    assert len(split.users) == round(0.25 * train.num_users) and split.fit.num_users == train.num_users - 4
    rows = train.rows_by_user()
    for i, u in enumerate(split.users):
        few, test = split.fewshot.rows_by_user([i])[0], split.test.rows_by_user([i])[0]
        assert len(few) == 5
        mine = {(int(c), int(r)) for c, r in zip(train.chosen[rows[u]], train.rejected[rows[u]])}
        got = [(int(c), int(r)) for p, idx in ((split.fewshot, few), (split.test, test))
               for c, r in zip(p.chosen[idx], p.rejected[idx])]
        assert sorted(got) == sorted(mine)  # the user's own training pairs, each once
    stay = [u for u in range(train.num_users) if u not in split.users]
    assert split.fit.counts().tolist() == [len(rows[u]) for u in stay]
    out = validate_new_users(lambda: PAL(16, **PAL_TINY), {"fewshot_learning_rate": [5e-3, 5e-2]}, split,
                             log=lambda *a: None, widen=0)
    again = validate_new_users(lambda: PAL(16, **PAL_TINY), {"fewshot_learning_rate": [5e-3, 5e-2]},
                               pseudo_new_split(train, shots=5, fraction=0.25, seed=3), log=lambda *a: None, widen=0)
    assert out["points"] == again["points"] and out["chosen"] in [p["settings"] for p in out["points"]]
    with pytest.raises(utils.InputError, match="too few"):
        pseudo_new_split(train, shots=10_000)


def test_whole_groups_are_held_out_together(data):
    """With groups (PRISM's dialogs), holdout_pairs and pseudo_new_split move whole groups: no group has a pair on
    both sides."""
    train = data["train"]
    groups = torch.arange(len(train.user)) // 3  # groups of 3 consecutive pairs (a user's pairs are contiguous)
    fit, held = holdout_pairs(train, 0.2, 0, groups)
    side = {}
    for part, p in (("fit", fit), ("held", held)):
        for c, r in zip(p.chosen.tolist(), p.rejected.tolist()):
            side.setdefault((c, r), set()).add(part)
    key = {(int(c), int(r)): int(g) for c, r, g in zip(train.chosen, train.rejected, groups)}
    by_group = {}
    for pair, parts in side.items():
        by_group.setdefault(key[pair], set()).update(parts)
    assert all(len(parts) == 1 for parts in by_group.values()) and any(p == {"held"} for p in by_group.values())
    split = pseudo_new_split(train, shots=2, seed=1, groups=groups)
    assert all(n % 3 == 0 for n in split.fewshot.counts().tolist())  # 2 whole groups of 3
