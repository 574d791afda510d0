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
        assert len(a["points"]) == len(tuning.grid_points(GRID[name])) and a["chosen"] in tuning.grid_points(
            GRID[name])
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
                      validation_fraction=0.2, seed=0, device="cpu", log=lambda _: None)
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
    assert "PAL [ties 100%]" in table and "per-user BT [ties" not in table and "degenerate fit (PAL)" in table


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
