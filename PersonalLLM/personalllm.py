"""PersonalLLM (namkoong-lab/PersonalLLM): prepared files, the simulated population, synthetic data.

    from PersonalLLM import personalllm       # with the repository root on sys.path
    data = personalllm.load(synthetic=True)  # a PreferenceData

A user is a Dirichlet mixture w of the 10 reward models; its pair on a prompt is its highest-
minus lowest-scored response. prepare.py writes data/{train,test}.safetensors with
`embeddings` [P * R, F] (prompt-major), `scores` [P, R, M], `head` [F, 1] and `published_reference` [F, 1].
"""
from pathlib import Path

import numpy as np
import torch

from lorelib import populations
from lorelib.choice import Candidates
from lorelib.config import InputError, check_value, check_values
from lorelib.data import PreferenceData, generate_population, sample_population_pairs
from lorelib.files import (
    PUBLISHED_REFERENCE,
    check_shapes,
    choose_reference,
    fingerprint,
    load_tensors,
    require_columns,
    save_tensors,
    stand_in_reference,
    tensor_shapes,
)
from lorelib.learned import reward_model_info

HERE = Path(__file__).resolve().parent
NUM_RESPONSES = 8
# the range of this dataset's own settings (config.check_value rules; the scripts pass them to configure)
RULES = {"train_density": "in (0, 1]", "fewshot_density": "in (0, 1]", "fewshot_pool_density": "in (0, 1] or None",
         "dirichlet_alpha": "> 0", "synthetic_prompts": "each int >= 1",
         **populations.RULES}  # population, hard_users, hard_kind, hard_noise
MODEL_NAMES = ["gemma_2b", "gemma_7b", "mistral_raft", "llama3_sfairx", "oasst_deberta_v3",
               "beaver_7b", "oasst_pythia_7b", "oasst_pythia_1b", "mistral_ray", "mistral_weqweasdas"]


def reward_tensor(df):
    """[P, 8, 10] float32 scores of each response by each reward model (NaN where None)."""
    import pandas as pd
    cols = [f"response_{i}_{m}" for i in range(1, NUM_RESPONSES + 1) for m in MODEL_NAMES]
    require_columns(df, cols, "PersonalLLM scores")
    values = df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
    return torch.tensor(values.reshape(len(df), NUM_RESPONSES, len(MODEL_NAMES)))  # copies: the view may be read-only


def convert_published(embeddings_path, df, head, out_path, published_reference=None):
    """The published prepare.py output (safetensors with one key `embeddings` [P * 8, F], prompt-major, the train
    split) + that split's rows `df` (for the scores) + the reward head [F, 1] (and the published reference
    direction [F, 1]) -> out_path in the prepared format."""
    E = load_tensors(embeddings_path, ["embeddings"])["embeddings"]  # its own dtype, as published
    if E.dim() != 2 or E.shape[0] != NUM_RESPONSES * len(df):
        raise InputError(f"{embeddings_path}: `embeddings` has shape {tuple(E.shape)}, expected "
                         f"[{NUM_RESPONSES} * {len(df)}, F] for the {len(df)} prompts of the split")
    if head.shape != (E.shape[1], 1):
        raise InputError(f"head has shape {tuple(head.shape)}, the embeddings have F = {E.shape[1]}")
    tensors = {"embeddings": E, "scores": reward_tensor(df), "prompt_index": torch.arange(len(df)), "head": head}
    if published_reference is not None:
        tensors[PUBLISHED_REFERENCE] = published_reference
    return save_tensors(out_path, tensors, metadata={"converted_from": str(embeddings_path),
                                                            "reward_models": ",".join(MODEL_NAMES)})


def read_split(path, make_cmd, reference="head"):
    """(embeddings [P * R, F], scores [P, R, M] float64 NumPy, reference direction [F, 1]: choose_reference)
    of a split written by PersonalLLM/prepare.py; prompts with a None/NaN score are dropped (count printed)."""
    t = load_tensors(path, ["embeddings", "scores", "head"], make_cmd=make_cmd, allow_nan=("scores",))
    E, scores = t["embeddings"], t["scores"].double()
    check_shapes(path, {"embeddings": (E.shape, ("rows", "F")), "scores": (scores.shape, ("P", "R", "M")),
                              "head": (t["head"].shape, ("F", 1))}, make_cmd)
    if E.shape[0] != scores.shape[0] * scores.shape[1]:
        raise InputError(f"{path}: {E.shape[0]} embeddings do not match scores of shape {tuple(scores.shape)} "
                         f"(expected P*R rows); re-run: {make_cmd}")
    P, R, _ = scores.shape
    keep = torch.isfinite(scores).all(dim=(1, 2))
    if not keep.all():
        print(f"{Path(path).name}: skipping {int((~keep).sum())} of {P} prompts with a missing (None/NaN) score")
        E = E.reshape(P, R, -1)[keep].reshape(-1, E.shape[1])
        scores = scores[keep]
    return E, scores.numpy(), choose_reference(reference, t, path, make_cmd)


def make_synthetic(num_train=9402, num_test=1000, num_features=256, num_responses=8, num_models=10, rank=4,
                   score_noise=0.05, head_noise=1.0, seed=0, dtype=torch.float32, population="lowrank",
                   return_population=False):
    """A PersonalLLM-shaped dataset: M reward models' scores of every response, which the users (draw_users)
    mix with their Dirichlet weights, as in PersonalLLM.

    Reward model m scores a response as s_m(e) + noise (`score_noise` x the scores' std). population "lowrank":
    s_m(e) = e^T h_m, with heads H = U A ([F, M], U [F, rank] orthonormal), so every Dirichlet user's reward lies in
    a rank-`rank` space. The others make the M columns the M prototypes of a lorelib.populations family
    (make_population(..., prototypes=True), drawn from populations.generator(seed)), so that a user, a Dirichlet
    mixture of the columns, is a mixture of them: "nonlinear_mixture": M random two-layer MLPs (PersonalLLM's own
    structure); "ideal_points": s_m(e) = -||P e - c_m||, M prototype ideal points c_m [rank] (PAL's prototypes;
    PAL mixes the ideal points, a user here the prototypes' rewards); "latent": s_m(e) = MLP([e, z_m]), M latent
    draws z_m [rank] (VPL's decoder). Users are kept as mixtures of the columns, so that the memory-lean sampler,
    info["true_weights"] and the choice sets hold for every population. The lowrank draws are made for every
    population, in the same order, so that every population sees the same embeddings.
    The reference head is the mean of the model heads (the others: Population.linear_direction, the linear
    direction of the mean column) plus noise (`head_noise` x its norm).
    Returns (train, test, head [F, 1]) with train/test = {"embeddings": [P * R, F] prompt-major, in `dtype`
    (rounded from the float32 values the scores were computed on), "scores": [P, R, M]}; return_population:
    (train, test, head, the M columns' lorelib.populations.Population, noiseless).
    """
    check_value("population", population, populations.RULES["population"])
    g = torch.Generator().manual_seed(seed)
    gp = populations.generator(seed)  # the other populations: lowrank's draws stay put
    U, _ = torch.linalg.qr(torch.randn(num_features, rank, generator=g))
    H = U @ torch.randn(rank, num_models, generator=g)  # [F, M]
    H = H / H.norm(dim=0, keepdim=True)
    if population == "lowrank":
        pop = populations.Linear(H.T)
        mean = H.mean(1, keepdim=True)
    else:
        pop = populations.make_population(population, num_models, num_features, gp, rank, prototypes=True)
        mean = pop.linear_direction(num_features, gp)[:, None]
    noise = torch.randn(num_features, 1, generator=g)
    head = mean + head_noise * mean.norm() * noise / noise.norm()

    def split(P):
        prompt = torch.randn(P, 1, num_features, generator=g)
        E = torch.empty(P * num_responses, num_features, dtype=dtype)
        scores = torch.empty(P * num_responses, num_models)
        # 64 prompts at a time, so that no [P * R, F] float32 temporary exists beside E: torch draws a tensor's
        # normals in order, 16 at a time, so blocks of a multiple of 16 numbers give the numbers of one draw
        for p0 in range(0, P, 64):
            e = torch.randn(min(64, P - p0), num_responses, num_features, generator=g)
            e += prompt[p0:p0 + 64]
            e = e.reshape(-1, num_features)
            scores[p0 * num_responses:p0 * num_responses + len(e)] = e @ H if population == "lowrank" else \
                pop.rewards(e)
            E[p0 * num_responses:p0 * num_responses + len(e)] = e
        scores = scores.reshape(P, num_responses, num_models)
        scores = scores + score_noise * scores.std() * torch.randn(scores.shape, generator=g)
        return {"embeddings": E, "scores": scores}

    train, test = split(num_train), split(num_test)
    return (train, test, head, pop) if return_population else (train, test, head)


def read_splits(data_dir=None, synthetic=False, synthetic_prompts=(9402, 1000), synthetic_features=128, seed=0,
                reference="head", synthetic_dtype=torch.float32, population="lowrank"):
    """(E_train [P*R, F], S_train [P, R, M], E_test, S_test, reference direction [F, 1]) from
    data_dir/{train,test}.safetensors (written by prepare.py; default data_dir: PersonalLLM/data), or generated by
    make_synthetic when synthetic (of that population; reference="published": stand_in_reference), its embeddings
    in synthetic_dtype."""
    populations.check_population(dict(synthetic=synthetic, population=population))
    if synthetic:
        _check_synthetic_prompts(synthetic_prompts)
        tr, te, head = make_synthetic(*synthetic_prompts, synthetic_features, seed=seed, dtype=synthetic_dtype,
                                      population=population)
        head = choose_reference(reference, {"head": head, PUBLISHED_REFERENCE:
                                                  stand_in_reference(head, seed)})
        E_tr, S_tr = tr["embeddings"], tr["scores"].double().numpy()
        E_te, S_te = te["embeddings"], te["scores"].double().numpy()
    else:
        make_cmd = _make_cmd(data_dir)
        data_dir = Path(data_dir or HERE / "data")
        E_tr, S_tr, head = read_split(data_dir / "train.safetensors", make_cmd, reference)
        E_te, S_te, head_te = read_split(data_dir / "test.safetensors", make_cmd, reference)
        if E_te.shape[1] != E_tr.shape[1] or S_te.shape[1:] != S_tr.shape[1:] or not head_te.equal(head):
            raise InputError(f"{data_dir}: train.safetensors (F = {E_tr.shape[1]}, scores [P, {S_tr.shape[1]}, "
                             f"{S_tr.shape[2]}]) and test.safetensors (F = {E_te.shape[1]}, scores [P, "
                             f"{S_te.shape[1]}, {S_te.shape[2]}]) were not prepared with the same reward model; "
                             f"recreate both with: {make_cmd}")
    print(f"data: {S_tr.shape[0]} train / {S_te.shape[0]} test prompts, {S_tr.shape[1]} responses, "
          f"{S_tr.shape[2]} reward models, F = {E_tr.shape[1]}, {str(E_tr.dtype).removeprefix('torch.')}"
          f"{' (synthetic)' if synthetic else ''}")
    return E_tr, S_tr, E_te, S_te, head


def _make_cmd(data_dir=None):
    """The command that writes the prepared files into data_dir (None: the default folder)."""
    return f"python {HERE / 'prepare.py'}" + (f" data_dir={data_dir}" if data_dir else "")


def _check_synthetic_prompts(synthetic_prompts):
    check_value("synthetic_prompts", synthetic_prompts, RULES["synthetic_prompts"])
    if len(synthetic_prompts) != 2:
        raise InputError(f"synthetic_prompts={list(synthetic_prompts)!r}: must be [train prompts, test prompts]; "
                         "pass two numbers, e.g. synthetic_prompts=[9402,1000]")


def num_train_prompts(data_dir=None, synthetic=False, synthetic_prompts=(9402, 1000)):
    """P, the number of train prompts, without loading the data: synthetic_prompts[0], or read from the header
    of data_dir/train.safetensors (prompts with a missing score, dropped later, are counted)."""
    if synthetic:
        _check_synthetic_prompts(synthetic_prompts)
        return synthetic_prompts[0]
    path = Path(data_dir or HERE / "data") / "train.safetensors"
    shapes = tensor_shapes(path, _make_cmd(data_dir))
    if len(shapes.get("scores", [])) != 3:
        raise InputError(f"{path}: no `scores` [P, R, M] tensor (it has {sorted(shapes)}); "
                         f"recreate it with: {_make_cmd(data_dir)}")
    return shapes["scores"][0]


def data_key(config):
    """The key of the seen users' training data a run of `config` fits on, under which a method stores its tuned
    settings (Method.tuned): the synthetic shape, or a fingerprint of the prepared train file."""
    if config.get("synthetic"):
        return (f"PersonalLLM synthetic {populations.key(config)} F={config['synthetic_features']} "
                f"P={config['synthetic_prompts'][0]} N={config['N']} train_density={config['train_density']:g} "
                f"dirichlet_alpha={config['dirichlet_alpha']:g}")
    data_dir = config.get("data_dir")
    path = Path(data_dir or HERE / "data") / "train.safetensors"
    return f"PersonalLLM prepared {fingerprint(path, _make_cmd(data_dir))}"


def check_pairs_per_user(P, **densities):
    """InputError when a density (given as name=value) gives int(density * P) = 0 pairs per user."""
    for name, density in densities.items():
        if density is None:
            continue
        check_value(name, density, RULES[name])
        if int(density * P) < 1:
            raise InputError(f"{name}={density}: int({density} x {P} train prompts) = 0 pairs per user; "
                             f"raise {name} to at least {1 / P:.3g} (1 / {P}) or use more prompts")


def check_config(config):
    """The scripts' check before any work (configure(..., checks=[check_config])): each density of the
    config gives every user at least one of the P train prompts (P read from the prepared file's header)."""
    P = num_train_prompts(config.get("data_dir"), config.get("synthetic", False),
                          config.get("synthetic_prompts", (9402, 1000)))
    check_pairs_per_user(P, **{k: config[k] for k in ("train_density", "fewshot_density", "fewshot_pool_density")
                               if k in config})


def draw_users(E_train, S_train, E_test, S_test, N, N_unseen, train_density, fewshot_density, dirichlet_alpha,
               fewshot_pool_density=None, hard_users=0.0, hard_kind="noise", hard_noise=1.0, seed=0):
    """The PersonalLLM protocol (seed with set_seed first) -> ((train, test, train_unseen, test_unseen) Pairs,
    (W [N, M], W_unseen [N_unseen, M]) the users' true weights over the reward models, {"seen", "unseen": the hard
    users' indices}).

    N seen users w ~ Dirichlet(dirichlet_alpha * ones(M)) with int(train_density * P) train pairs
    each; N_unseen new users with int(fewshot_density * P) few-shot pairs (or
    fewshot_pool_density, for a larger pool to draw shots from); everyone on all test prompts.
    Hard users (lorelib.populations, drawn from populations.generator(seed), so that the users and their prompts
    stay those of the global generator): round(hard_users * N) seen and round(hard_users * N_unseen) unseen users,
    "opposite" (their weights negated, so their reward is -S w: their pairs are worst vs best; W holds the signed
    weights) or "noise" (each of their pairs flipped with probability hard_noise / 2).
    """
    check_values(dict(N=N, N_unseen=N_unseen))
    check_value("dirichlet_alpha", dirichlet_alpha, RULES["dirichlet_alpha"])
    check_pairs_per_user(len(S_train), train_density=train_density,
                         **({"fewshot_pool_density": fewshot_pool_density} if fewshot_pool_density
                            else {"fewshot_density": fewshot_density}))
    check_values(dict(hard_users=hard_users, hard_kind=hard_kind, hard_noise=hard_noise), populations.RULES)
    gp = populations.generator(seed)
    hard = {"seen": populations.choose_hard(N, hard_users, gp),
            "unseen": populations.choose_hard(N_unseen, hard_users, gp)}
    sign = {"seen": np.ones((N, 1)), "unseen": np.ones((N_unseen, 1))}  # -1 for opposite users
    if hard_kind == "opposite":
        for group, users in hard.items():
            sign[group][users.numpy()] = -1.0
    alpha = dirichlet_alpha * np.ones(S_train.shape[2])
    W = generate_population(alpha, N) * sign["seen"]
    train = sample_population_pairs(S_train, E_train, W, train_density)
    test = sample_population_pairs(S_test, E_test, W, 1.0)
    W_unseen = generate_population(alpha, N_unseen) * sign["unseen"]
    train_unseen = sample_population_pairs(S_train, E_train, W_unseen, fewshot_pool_density or fewshot_density)
    test_unseen = sample_population_pairs(S_test, E_test, W_unseen, 1.0)
    if hard_kind == "noise":
        for pairs, group in ((train, "seen"), (test, "seen"), (train_unseen, "unseen"), (test_unseen, "unseen")):
            noisy = torch.zeros(pairs.num_users, dtype=torch.bool)
            noisy[hard[group]] = True
            flip = populations.flip_labels(noisy[pairs.user], hard_noise, gp)
            pairs.chosen, pairs.rejected = (torch.where(flip, pairs.rejected, pairs.chosen),
                                            torch.where(flip, pairs.chosen, pairs.rejected))
    print(f"{N} seen users x {int(train_density * len(S_train))} pairs, {N_unseen} unseen users x "
          f"{train_unseen.counts()[0].item()} few-shot pairs, {len(S_test)} test prompts each"
          + (f"; hard users ({hard_kind}): {len(hard['seen'])} seen, {len(hard['unseen'])} unseen"
             if hard_users else ""))
    return (train, test, train_unseen, test_unseen), (W, W_unseen), {k: h.tolist() for k, h in hard.items()}


def choice_sets(E_test, S_test, W, W_unseen, num_prompts=None, seed=0):
    """{"seen", "unseen": lorelib.choice.Candidates}: every user on every test prompt (or on the same num_prompts
    of them, drawn with np.random.RandomState(seed)), choosing among its R responses (rows of E_test [P * R, F],
    prompt-major), with the user's true reward: S_test [P, R, M] mixed by its weights W [N, M] (W_unseen
    [N_unseen, M]), the reward its pairs come from."""
    P, R, _ = S_test.shape
    keep = np.arange(P) if num_prompts is None or num_prompts >= P else \
        np.sort(np.random.RandomState(seed).choice(P, num_prompts, replace=False))
    rows = torch.arange(P * R).reshape(P, R)[torch.from_numpy(keep)]
    n = len(keep)

    def group(W):
        C = len(W)
        truth = torch.from_numpy(np.einsum("prm,cm->cpr", S_test[keep], np.asarray(W, dtype=np.float64)))
        return Candidates(E_test, rows, torch.arange(n).repeat(C), torch.arange(C).repeat_interleave(n),
                          truth.reshape(C * n, R), C, "reward")
    print(f"choice quality: every user on {n} of the {P} test prompts, best of {R} responses")
    return {"seen": group(W), "unseen": group(W_unseen)}


def load(data_dir=None, synthetic=False, synthetic_prompts=(9402, 1000), synthetic_features=128, N=1000,
         N_unseen=500, train_density=0.005, fewshot_density=0.001, fewshot_pool_density=None, dirichlet_alpha=0.1,
         seed=0, reference="head", pairs_dtype="auto", choice=False, choice_prompts=None, population="lowrank",
         hard_users=0.0, hard_kind="noise", hard_noise=1.0):
    """The PersonalLLM protocol on the prepared (or synthetic) data -> PreferenceData.

    Draws the population with the global NumPy generator: call set_seed(seed) first.
    Unseen users get int(fewshot_pool_density * P) few-shot pairs when it is given (a pool to draw
    shots from), else int(fewshot_density * P). info: N, N_unseen, the densities, dirichlet_alpha and
    (prepared data) "reward_model": {"model_name", "max_length", "truncation_side"} of the embeddings.
    head: the reward model's own head, or with reference="published" the published scripts' direction.
    pairs_dtype: the dtype of the pairs' tables, "auto" (the prepared file's), "float32" or "bfloat16".
    info["true_weights"]: {"seen": W [N, M], "unseen": W_unseen [N_unseen, M]}, the users' Dirichlet weights over
    the M reward models (negated for "opposite" hard users: a user's reward is S w); with choice, info["choice"]:
    the candidate sets of choice quality (choice_sets) on choice_prompts of the test prompts (None: all of them),
    drawn with the seed.
    population: the reward models of the synthetic data (make_synthetic); hard_users, hard_kind, hard_noise: hard
    users among them (draw_users); synthetic data's info also has "population" (its name) and "hard_users":
    {"seen", "unseen": the hard users' indices}.
    """
    check_value("pairs_dtype", pairs_dtype)
    populations.check_population(dict(synthetic=synthetic, population=population, hard_users=hard_users))
    E_tr, S_tr, E_te, S_te, head = read_splits(  # synthetic data are made in the pairs' dtype (float32 for "auto")
        data_dir, synthetic, synthetic_prompts, synthetic_features, seed, reference,
        getattr(torch, "float32" if pairs_dtype == "auto" else pairs_dtype), population)
    pairs, (W, W_unseen), hard = draw_users(E_tr, S_tr, E_te, S_te, N, N_unseen, train_density, fewshot_density,
                                            dirichlet_alpha, fewshot_pool_density, hard_users, hard_kind,
                                            hard_noise, seed)
    info = {"train_density": train_density, "fewshot_density": fewshot_pool_density or fewshot_density,
            "dirichlet_alpha": dirichlet_alpha, "reference": reference,
            "true_weights": {"seen": W, "unseen": W_unseen}}
    if synthetic:
        info.update(population=population, hard_users=hard)
    else:
        info["reward_model"] = reward_model_info(Path(data_dir or HERE / "data") / "train.safetensors")
    data = PreferenceData(*pairs, head=head, info=info).with_dtype(pairs_dtype)
    if choice:  # on the test pairs' table: the embeddings in the dtype the pairs have
        data.info["choice"] = choice_sets(data.seen_test.table, S_te, W, W_unseen, choice_prompts, seed)
    return data
