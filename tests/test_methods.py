"""The conformance checks every registered method passes by registration alone (methods.METHODS), in the spirit of
scikit-learn's check_estimator: output shapes, the same seed gives the same state, test pairs reach no fit, it learns
a planted two-type population beyond one shared Bradley-Terry reward, it personalizes a new user from a few shots, and
a bad setting is an InputError. A method is built with its class's `quick` settings (small data) and its data
`inputs` (LoRe: the head)."""
import numpy as np
import pytest
import torch

import utils
from lorelib.choice import Candidates, choice_quality, method_scorer
from lorelib.evaluate import Run, evaluate
from lorelib.methods import METHODS

F_DIM = 16


def planted(seed=0, seen_per_type=8, unseen_per_type=4, train=150, shots=12, test=60, items=400):
    """Two user types with opposite linear rewards r(e) = +-e.u on a shared table of items [items, F]: one shared
    Bradley-Terry reward is at chance, a per-type reward is right. Pairs of random items, the higher reward chosen.
    -> {"train", "test", "fewshot", "test_unseen": Pairs (table pairs), "head" [F, 1], "table", "types"}."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(items, F_DIM, generator=g)
    u = torch.randn(F_DIM, generator=g)
    u /= u.norm()

    def pairs(types, m):
        chosen, rejected = [], []
        for t in types:
            a, b = torch.randint(items, (2, m), generator=g)
            b = torch.where(a == b, (b + 1) % items, b)
            better = (table[a] - table[b]) @ u * (1 if t == 0 else -1) > 0
            chosen.append(torch.where(better, a, b))
            rejected.append(torch.where(better, b, a))
        return utils.Pairs.from_indices(table, chosen, rejected)
    seen, unseen = [0, 1] * seen_per_type, [0, 1] * unseen_per_type
    return {"train": pairs(seen, train), "test": pairs(seen, test), "fewshot": pairs(unseen, shots),
            "test_unseen": pairs(unseen, test), "head": torch.randn(F_DIM, 1, generator=g), "table": table,
            "types": (seen, unseen)}


@pytest.fixture(scope="module")
def data():
    return planted()


def build(name, data, seed=0, **settings):
    """A fresh model of method `name` with its quick settings, its data inputs and `settings`."""
    cls = METHODS[name]
    inputs = {"reference": data["head"]} if "reference" in cls.inputs else {}
    return cls(F_DIM, seed=seed, **inputs, **{**cls.quick, **settings})


def fit(name, data, seed=0):
    utils.set_seed(seed)
    model = build(name, data, seed)
    model.fit(data["train"], "cpu")
    return model, model.personalize(data["fewshot"], "cpu")


def features(data, flip=False):
    """The four pair sets; flip: the test sets' chosen and rejected swapped (every test label flipped)."""
    def flipped(p):
        return utils.Pairs(p.user, p.num_users, table=p.table, chosen=p.rejected, rejected=p.chosen)
    return [data["train"], flipped(data["test"]) if flip else data["test"], data["fewshot"],
            flipped(data["test_unseen"]) if flip else data["test_unseen"]]


@pytest.fixture(scope="module")
def fits(data):
    return {name: fit(name, data) for name in METHODS}


def shared_bt_accuracy(data):
    """Seen- and unseen-test accuracy of one Bradley-Terry reward shared by everyone (LoRe K = 1)."""
    result = evaluate([Run("bt", "lore", "BT", lambda: build("lore", data, K=1))], features(data), "cpu")[0]
    return result.mean("seen_test"), result.mean("unseen_test")


@pytest.mark.parametrize("name", list(METHODS))
def test_shapes(name, data, fits):
    model, state = fits[name]
    assert len(state) == data["fewshot"].num_users
    for pairs, st in [(data["test"], None), (data["test_unseen"], state)]:
        m = model.margins(pairs, st, "cpu")
        assert m.shape == (len(pairs.user),) and torch.isfinite(m).all()
        assert model.accuracies(pairs, st, "cpu").shape == (pairs.num_users,)
    rows = torch.arange(40).reshape(10, 4)
    rows[3, 2:] = -1  # a prompt with two candidates
    C = data["fewshot"].num_users
    prompt, user = torch.arange(10).repeat(C), torch.arange(C).repeat_interleave(10)
    s = model.scores(data["table"], rows, prompt, user, state, "cpu")
    assert s.shape == (10 * C, 4) and torch.isfinite(s[rows[prompt] >= 0]).all()
    cands = Candidates(data["table"], rows, prompt, user, torch.where(rows[prompt] >= 0, 1.0, float("nan")), C,
                       "reward")
    assert choice_quality(method_scorer(model, state), cands)["picks"].shape == (10 * C,)
    assert set(model.settings) == set(model.rules) and isinstance(model.label, str)


@pytest.mark.parametrize("name", list(METHODS))
def test_the_same_seed_gives_the_same_state(name, data, fits):
    model, state = fits[name]
    again, state_again = fit(name, data)
    assert torch.equal(torch.as_tensor(state), torch.as_tensor(state_again))
    for pairs, st, st2 in [(data["test"], None, None), (data["test_unseen"], state, state_again)]:
        assert torch.equal(model.margins(pairs, st, "cpu"), again.margins(pairs, st2, "cpu"))


@pytest.mark.parametrize("name", list(METHODS))
def test_test_pairs_reach_no_fit(name, data):
    """Flipping every test label changes nothing the fits see: the training and few-shot accuracies stay
    bit-identical, and every test accuracy with near-ties counted half becomes its complement."""
    run = Run(name, name, name, lambda: build(name, data))
    plain, flipped = (evaluate([run], features(data, flip), "cpu")[0] for flip in (False, True))
    for s in ("seen_train", "unseen_fewshot"):
        for metric, values in plain.users[s].items():
            assert np.array_equal(values, flipped.users[s][metric])
    for s in ("seen_test", "unseen_test"):
        np.testing.assert_allclose(plain.users[s]["ties_half"] + flipped.users[s]["ties_half"], 1, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in METHODS if n != "lore"] + ["lore"])
def test_learns_two_types_beyond_one_shared_reward(name, data, fits):
    """Seen users of two opposite types: one shared reward is at chance; a personalized method is not."""
    if name == "lore":
        model, state = fit("lore", data)  # K = 2 (its quick settings)
    else:
        model, state = fits[name]
    bt_seen, _ = shared_bt_accuracy(data)
    assert abs(bt_seen - 0.5) < 0.1
    assert model.accuracies(data["test"], None, "cpu").mean() > bt_seen + 0.2, name


@pytest.mark.parametrize("name", list(METHODS))
def test_personalizes_a_new_user_from_a_few_shots(name, data, fits):
    """Unseen users of the two types, 12 few-shot pairs each: beyond the shared reward on their test pairs."""
    model, state = fits[name]
    _, bt_unseen = shared_bt_accuracy(data)
    assert model.accuracies(data["test_unseen"], state, "cpu").mean() > bt_unseen + 0.1, name


def bad_value(rule):
    """A value that breaks a check_value rule."""
    rule = rule.removesuffix(" or None").removeprefix("each ")
    if rule.startswith("one of"):
        return "no-such-option"
    if rule == "bool":
        return "yes"
    if rule == "number":
        return float("nan")
    if rule.startswith("in "):
        return 2.0
    bound = float(rule.split()[-1])
    return (int(bound) - 1) if rule.startswith("int") else bound - 1.0


@pytest.mark.parametrize("name", list(METHODS))
def test_a_bad_setting_is_an_input_error(name, data):
    for setting, rule in METHODS[name].rules.items():
        with pytest.raises(utils.InputError, match=setting):
            build(name, data, **{setting: bad_value(rule)})
