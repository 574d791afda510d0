"""Synthetic populations (lorelib/populations.py): the default lowrank data are the data as they were, bit for bit;
each population plants what it claims; hard users are what they claim; the seed decides the data."""
import hashlib
import re

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from lorelib import populations
from lorelib.config import InputError, set_seed
from PersonalLLM import personalllm
from PRISM import prism
from RedditTLDR import tldr

OTHERS = [p for p in populations.POPULATIONS if p != "lowrank"]


def digest(x, h=None):
    """sha256 (16 hex digits) of nested dicts / lists / tuples of tensors, arrays and plain values: dtypes, shapes
    and bytes (dict entries in key order)."""
    top, h = h is None, h or hashlib.sha256()
    if isinstance(x, dict):
        for k in sorted(x):
            h.update(str(k).encode())
            digest(x[k], h)
    elif isinstance(x, (list, tuple)):
        for v in x:
            digest(v, h)
    elif isinstance(x, torch.Tensor):
        h.update(f"{x.dtype}{tuple(x.shape)}".encode())
        h.update(x.contiguous().view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    elif isinstance(x, np.ndarray):
        h.update(str(x.dtype).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    else:
        h.update(repr(x).encode())
    return h.hexdigest()[:16] if top else None


def pairs_of(data):
    return [(p.user, p.table, p.chosen, p.rejected) for p in (data.seen_train, data.seen_test, data.unseen_fewshot,
                                                               data.unseen_test)]


def loads(**kw):
    """The three datasets' load at small sizes (each after set_seed(0))."""
    out = {}
    for name, load, args in [
            ("personalllm", personalllm.load, dict(synthetic_prompts=(300, 40), synthetic_features=16, N=12,
                                                   N_unseen=5, train_density=0.05, fewshot_density=0.02)),
            ("tldr", tldr.load, dict(synthetic_features=8)), ("prism", prism.load, dict(synthetic_users=60))]:
        set_seed(0)
        out[name] = load(synthetic=True, **args, **kw)
    return out


# recorded from the generators before lorelib/populations.py existed (commit 027012c, this machine's torch and NumPy:
# a hash of floating-point results, so another BLAS / LAPACK may differ in the last bit)
BEFORE = {("personalllm", 0): "599d4adf377ae41e", ("personalllm", 1): "e858b17486fa00af",
          ("personalllm bf16", 0): "d525882c081f8223", ("personalllm bf16", 1): "1b3c09396dfb45af",
          ("tldr", 0): "f4e1095e759f1a9a", ("tldr", 1): "f84cf6a2ee1a677d",
          ("prism", 0): "2c50f244cf6a8ac1", ("prism", 1): "59418289ba19e4fd",
          "personalllm load": "06b31bda8d2d41d2", "tldr load": "35f9e8964801de3f", "prism load": "b26b30443f304517"}


def test_default_lowrank_data_are_the_data_as_they_were_bit_for_bit():
    """The same tensors (the same draws, in the same order) as before the populations, for all three datasets:
    the generators' outputs and load's pairs; passing the defaults explicitly changes nothing."""
    for seed in (0, 1):
        assert digest(personalllm.make_synthetic(200, 30, 16, seed=seed)) == BEFORE["personalllm", seed]
        assert digest(personalllm.make_synthetic(70, 10, 8, seed=seed, dtype=torch.bfloat16)) == \
            BEFORE["personalllm bf16", seed]
        assert digest(tldr.make_synthetic(num_workers=12, num_features=8, median_comparisons=20, seed=seed)) == \
            BEFORE["tldr", seed]
        assert digest(prism.make_synthetic(40, 8, seed=seed)) == BEFORE["prism", seed]
    for name, data in loads().items():
        assert digest(pairs_of(data)) == BEFORE[f"{name} load"], name
        assert data.info["population"] == "lowrank" and data.info["hard_users"] == {"seen": [], "unseen": []}
    for name, data in loads(population="lowrank", hard_users=0.0, hard_kind="opposite").items():
        assert digest(pairs_of(data)) == BEFORE[f"{name} load"], name


def residual(R, e, rank=None):
    """The share of the variance of rewards R [n, C] that the best affine fit in e [n, F] leaves (rank: with the
    users' linear parts of rank at most `rank`, reduced-rank regression)."""
    X = torch.cat([e, torch.ones(len(e), 1, dtype=e.dtype)], 1)
    fit = X @ torch.linalg.lstsq(X, R).solution
    if rank is not None:
        centred = fit - fit.mean(0)
        Vh = torch.linalg.svd(centred, full_matrices=False)[2][:rank]
        fit = fit.mean(0) + centred @ Vh.T @ Vh
    return float((R - fit).pow(2).sum() / (R - R.mean(0)).pow(2).sum())


def made(dataset, population, F=16, seed=0, **kw):
    """(the generator's data, its Population) at a small size: Reddit TLDR's 12 workers, PRISM's 40 users,
    PersonalLLM's 10 reward-model columns."""
    if dataset == "tldr":
        return tldr.make_synthetic(num_workers=12, num_features=F, median_comparisons=20, seed=seed,
                                   population=population, return_population=True, **kw)
    if dataset == "prism":
        return prism.make_synthetic(40, F, seed=seed, population=population, return_population=True, **kw)
    *data, pop = personalllm.make_synthetic(100, 10, F, seed=seed, population=population, return_population=True)
    return data, pop


# (full-rank, rank-4) residual shares measured with F = 16 on 4,000 embeddings (seed 0): ideal_points 0.52 / 0.52
# (TLDR), 0.41 / 0.41 (PRISM), 0.51 / 0.52 (PersonalLLM columns); latent 0.22 / 0.23, 0.21 / 0.22, 0.21 / 0.22;
# nonlinear_mixture 0.20 / 0.20, 0.19 / 0.19, 0.21 / 0.49 (ten independent MLPs: ten linear parts); lowrank < 1e-14
@pytest.mark.parametrize("dataset", ["tldr", "prism", "personalllm"])
def test_each_population_plants_what_it_claims(dataset):
    """lowrank's per-user rewards (PersonalLLM: reward-model columns) are fit exactly by a rank-4 linear model of e;
    every other population's are not, not even by a full-rank affine one."""
    F = 16
    g = torch.Generator().manual_seed(123)  # embeddings as the generators make them: context + noise
    e = (torch.randn(2000, 1, F, generator=g, dtype=torch.float64)
         + torch.randn(2000, 2, F, generator=g, dtype=torch.float64)).reshape(-1, F)
    with torch.no_grad():
        R = made(dataset, "lowrank", F)[1].rewards(e)
        assert residual(R, e, rank=4) < 1e-10
        for name in OTHERS:
            pop = made(dataset, name, F)[1]
            assert pop.name == name
            R = pop.rewards(e)
            assert residual(R, e) > 0.12 and residual(R, e, rank=4) > 0.12, name
            user = torch.arange(len(e)) % pop.num_users  # the generators' per-row rewards are the same functions
            assert torch.allclose(pop.reward(e, user), R[torch.arange(len(e)), user]), name
            # each user's margin between two responses to one prompt is scaled to root mean square sqrt(2)
            m = pop.rewards(e[0::2]) - pop.rewards(e[1::2])
            assert torch.allclose(m.pow(2).mean(0).sqrt(), torch.full((m.shape[1],), 2 ** 0.5, dtype=m.dtype),
                                  rtol=0.1), name


def test_the_generating_reward_gets_most_pairs_right():
    """Every population meets the choice noise with margins of one size: on Reddit TLDR and PRISM the generating
    reward gets 85-95% of the pairs right (lowrank 88% / 94%; measured at the default sizes in the README)."""
    for name in populations.POPULATIONS:
        (train, _), pop = made("tldr", name, F=64)
        worker = torch.tensor([int(w[-2:]) for w in train["worker"]])
        with torch.no_grad():
            acc = float((pop.margin(train["chosen"], train["rejected"], worker) > 0).float().mean())
        assert 0.85 < acc < 0.95, (name, acc)
        t, pop = made("prism", name, F=64)
        E = t["embeddings"].double()
        with torch.no_grad():
            acc = float((pop.margin(E[t["chosen"]], E[t["rejected"]], t["user"]) > 0).float().mean())
        assert 0.85 < acc < 0.97, (name, acc)


def test_hard_users_are_the_requested_fraction_and_recorded():
    data = loads(population="latent", hard_users=0.2, hard_kind="opposite")
    pl, tl, pr = data["personalllm"], data["tldr"], data["prism"]
    assert [len(pl.info["hard_users"][g]) for g in ("seen", "unseen")] == [round(0.2 * 12), round(0.2 * 5)]
    assert [len(pr.info["hard_users"][g]) for g in ("seen", "unseen")] == [round(0.2 * pr.N), round(0.2 * pr.N_unseen)]
    (train, _), _ = tldr.make_synthetic(num_features=8, population="latent", hard_users=0.2, return_population=True)
    assert len(train["hard_workers"]) == round(0.2 * 60)  # drawn among all 60 workers, before the split
    names = set(train["hard_workers"].tolist())
    for g, users in (("seen", tl.info["users"]), ("unseen", tl.info["unseen_users"])):
        assert tl.info["hard_users"][g] == [i for i, w in enumerate(users) if w in names]
    for d in data.values():
        assert d.info["population"] == "latent"
        for g, n in (("seen", d.N), ("unseen", d.N_unseen)):
            assert all(0 <= i < n for i in d.info["hard_users"][g]) and d.info["hard_users"][g] == sorted(
                set(d.info["hard_users"][g]))
    assert populations.choose_hard(10, 0.0, populations.generator(0)).tolist() == []


@pytest.mark.parametrize("population", ["lowrank", "ideal_points"])
def test_opposite_users_rewards_are_the_negation(population):
    """The same population with opposite hard users: their rewards negated, everyone else's unchanged, and every
    other user's comparisons the same (Reddit TLDR, PRISM); PersonalLLM: their weights negated and their pairs
    exactly the easy users' pairs swapped."""
    e = torch.randn(50, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for dataset in ("tldr", "prism"):
        data, pop = made(dataset, population)
        hard_data, hard_pop = made(dataset, population, hard_users=0.25, hard_kind="opposite")
        hard = torch.as_tensor(hard_pop.sign == -1)
        assert int(hard.sum()) == (3 if dataset == "tldr" else 8 + 2)  # TLDR: 12 workers; PRISM: 32 + 8 users
        with torch.no_grad():
            assert torch.equal(hard_pop.rewards(e)[:, hard], -pop.rewards(e)[:, hard])
            assert torch.equal(hard_pop.rewards(e)[:, ~hard], pop.rewards(e)[:, ~hard])
        if dataset == "tldr":
            easy = ~np.isin(data[0]["worker"], hard_data[0]["hard_workers"])
            assert torch.equal(data[0]["chosen"][easy], hard_data[0]["chosen"][easy])
        else:
            easy = ~hard[data["user"]]
            for side in ("chosen", "rejected"):
                assert torch.equal(data["embeddings"][data[side][easy]], hard_data["embeddings"][hard_data[side][easy]])
    kw = dict(synthetic=True, synthetic_prompts=(200, 60), synthetic_features=16, N=20, N_unseen=8,
              train_density=0.05, fewshot_density=0.05, population=population)
    set_seed(0)
    easy = personalllm.load(**kw)
    set_seed(0)
    opposite = personalllm.load(**kw, hard_users=0.25, hard_kind="opposite")
    for group, a, b in (("seen", easy.seen_test, opposite.seen_test), ("unseen", easy.unseen_test,
                                                                       opposite.unseen_test)):
        hard = opposite.info["hard_users"][group]
        assert len(hard) == round(0.25 * (20 if group == "seen" else 8))
        W, W_opposite = easy.info["true_weights"][group], opposite.info["true_weights"][group]
        assert np.array_equal(W_opposite[hard], -W[hard]) and np.array_equal(np.delete(W_opposite, hard, 0),
                                                                               np.delete(W, hard, 0))
        flipped = torch.isin(a.user, torch.tensor(hard))
        assert torch.equal(b.chosen, torch.where(flipped, a.rejected, a.chosen))
        assert torch.equal(b.rejected, torch.where(flipped, a.chosen, a.rejected))


def agreement(margins, is_hard):
    """(share of the hard users' labels that agree with their reward, the others' share)."""
    right = (margins > 0).double()
    return float(right[is_hard].mean()), float(right[~is_hard].mean())


def test_noise_users_labels_agree_with_their_reward_half_the_time():
    """hard_kind="noise" (hard_noise=1): a hard user's label agrees with its reward 50% of the time (Reddit TLDR:
    12 hard workers, ~5,500 pairs; PRISM: random choices; PersonalLLM: flipped pairs), the others' 88-100%;
    hard_noise=0.4 flips 20% of them."""
    with torch.no_grad():
        (train, _), pop = tldr.make_synthetic(population="nonlinear_mixture", hard_users=0.2, hard_kind="noise",
                                              return_population=True)
        worker = torch.tensor([int(w[-2:]) for w in train["worker"]])
        is_hard = torch.as_tensor(np.isin(train["worker"], train["hard_workers"]))
        hard, easy = agreement(pop.margin(train["chosen"], train["rejected"], worker), is_hard)
        assert abs(hard - 0.5) < 0.03 and easy > 0.88, (hard, easy)
        (train, _), pop = tldr.make_synthetic(population="nonlinear_mixture", hard_users=0.2, hard_kind="noise",
                                              hard_noise=0.4, return_population=True)
        hard, _ = agreement(pop.margin(train["chosen"], train["rejected"], worker), is_hard)
        assert abs(hard - (0.8 * easy + 0.2 * (1 - easy))) < 0.03, hard  # flipped with probability 0.2
        t, pop = prism.make_synthetic(200, 16, population="latent", hard_users=0.2, hard_kind="noise",
                                      return_population=True)
        E = t["embeddings"].double()
        hard, easy = agreement(pop.margin(E[t["chosen"]], E[t["rejected"]], t["user"]),
                               torch.isin(t["user"], t["hard_users"]))
        assert abs(hard - 0.5) < 0.05 and easy > 0.88, (hard, easy)
    set_seed(0)
    data = personalllm.load(synthetic=True, synthetic_prompts=(200, 300), synthetic_features=16, N=20, N_unseen=8,
                            train_density=0.05, fewshot_density=0.05, population="ideal_points", hard_users=0.25)
    *_, pop = personalllm.make_synthetic(200, 300, 16, population="ideal_points", return_population=True)
    p, W = data.seen_test, torch.as_tensor(data.info["true_weights"]["seen"])
    with torch.no_grad():
        r = pop.rewards(p.table.double()) @ W.T  # [rows, N] each user's noiseless reward
    hard, easy = agreement(r[p.chosen, p.user] - r[p.rejected, p.user],
                           torch.isin(p.user, torch.tensor(data.info["hard_users"]["seen"])))
    assert abs(hard - 0.5) < 0.06 and easy > 0.99, (hard, easy)


@pytest.mark.parametrize("dataset", ["tldr", "prism", "personalllm"])
def test_same_seed_same_data_another_seed_other_data(dataset):
    for name in populations.POPULATIONS:
        kw = {} if dataset == "personalllm" else dict(hard_users=0.25)
        a, pop_a = made(dataset, name, **kw)
        b, pop_b = made(dataset, name, **kw)
        c, pop_c = made(dataset, name, seed=1, **kw)
        assert digest(a) == digest(b) != digest(c), name
        e = torch.randn(20, 16, dtype=torch.float64)
        with torch.no_grad():
            assert torch.equal(pop_a.rewards(e), pop_b.rewards(e)) and not torch.allclose(pop_a.rewards(e),
                                                                                           pop_c.rewards(e))
    # the populations' generator shares no draws with a dataset's own generator of the same seed
    assert not torch.equal(torch.randn(8, generator=populations.generator(0)),
                           torch.randn(8, generator=torch.Generator().manual_seed(0)))


def test_settings_keys_and_prepared_data():
    """The rules of the settings, the data keys (hard users only when there are any), an InputError for a
    population or hard users on prepared data, and every script passing the four settings to load."""
    for module in (personalllm, tldr, prism):
        assert module.RULES["population"] == "one of lowrank ideal_points latent nonlinear_mixture"
        assert (module.RULES["hard_users"], module.RULES["hard_kind"]) == ("in [0, 1)", "one of noise opposite")
    config = dict(synthetic=True, synthetic_features=8, synthetic_prompts=[100, 10], N=5, train_density=0.1,
                  dirichlet_alpha=0.1, synthetic_users=50, protocol="published", max_train_pairs=150)
    for module in (personalllm, tldr, prism):
        plain = module.data_key(config)
        assert " lowrank " in plain and "hard" not in plain
        assert module.data_key(dict(config, hard_users=0.0, hard_kind="opposite")) == plain
        assert " latent hard_users=0.2 hard_kind=noise " in module.data_key(dict(config, population="latent",
                                                                                 hard_users=0.2))
    with pytest.raises(InputError, match="population=latent: only synthetic data"):
        tldr.load(data_dir="/nonexistent", population="latent")
    with pytest.raises(InputError, match="hard_users=0.1: only synthetic data"):
        prism.load(data_dir="/nonexistent", hard_users=0.1)
    with pytest.raises(InputError, match="population=ideal_points: only synthetic data"):
        personalllm.load(data_dir="/nonexistent", population="ideal_points")
    with pytest.raises(InputError, match="hard_users=1.0: must be a number in"):
        tldr.make_synthetic(hard_users=1.0)
    for folder in ("PersonalLLM", "RedditTLDR", "PRISM"):
        for script in ("train_basis.py", "vary_fewshot.py"):
            text = open(f"{REPO_ROOT}/{folder}/{script}").read()
            for setting in ("population", "hard_users", "hard_kind", "hard_noise"):
                assert re.search(rf"^{setting} = .+# ", text, re.M) and f"{setting}={setting}" in text, (script,
                                                                                                      setting)
