"""Reddit TLDR (openai/summarize_from_feedback, 'comparisons'): prepared files, worker split protocols,
synthetic data.

    from RedditTLDR import tldr              # with the repository root on sys.path
    data = tldr.load(synthetic=True)         # a PreferenceData

Each comparison is one worker's choice between two summaries of a post. prepare.py writes
data/{train,validation}.safetensors with `chosen`, `rejected` [n, F], `worker` [n] (index into the
metadata's 'workers' list), `row` [n] and `head` [F, 1].
"""
import json
import random
from pathlib import Path

import numpy as np
import torch

from lorelib import populations
from lorelib.config import InputError, check_value, check_values
from lorelib.data import RESULT_NAMES, Pairs, PreferenceData
from lorelib.files import (
    PUBLISHED_REFERENCE,
    choose_reference,
    fingerprint,
    load_metadata,
    load_pickle,
    load_tensors,
    stand_in_reference,
)
from lorelib.learned import reward_model_info

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "validation")  # train: training and few-shot pairs; validation: test pairs
# the range of this dataset's own settings (config.check_value rules; the scripts pass them to configure)
RULES = {"max_train_pairs": "int >= 1 or None", "max_fewshot_pairs": "int >= 1 or None", "min_comparisons": "int >= 2",
         "protocol": "one of published paper", **populations.RULES}  # population, hard_users, hard_kind, hard_noise


def read_split(path, make_cmd=None):
    """One split written by RedditTLDR/prepare.py -> dict with
    "chosen", "rejected" [n, F] float32 embeddings, "worker" [n] str array (worker of each comparison),
    "row" [n] long (its row in the dataset split), "head" [F, 1] (the reward model's score head) and, when the
    file has it, "published_reference" [F, 1] (read_published_reference).
    """
    t = load_tensors(path, ["chosen", "rejected", "worker", "row", "head"], make_cmd=make_cmd)
    names = json.loads(load_metadata(path).get("workers", "null"))
    hint = f" Re-create it with: {make_cmd}" if make_cmd else ""
    if not isinstance(names, list):
        raise InputError(f"{path}: metadata lacks the 'workers' list (JSON).{hint}")
    chosen, rejected, worker, row, head = (t[k] for k in ("chosen", "rejected", "worker", "row", "head"))
    n, F = chosen.shape
    if rejected.shape != chosen.shape or worker.shape != (n,) or row.shape != (n,) or head.shape != (F, 1):
        raise InputError(f"{path}: inconsistent shapes chosen {tuple(chosen.shape)}, rejected "
                         f"{tuple(rejected.shape)}, worker {tuple(worker.shape)}, row {tuple(row.shape)}, "
                         f"head {tuple(head.shape)} (expected [n, F], [n, F], [n], [n], [F, 1]).{hint}")
    if n and (worker.min() < 0 or worker.max() >= len(names)):
        raise InputError(f"{path}: worker ids must lie in [0, {len(names)}).{hint}")
    return {"chosen": chosen, "rejected": rejected, "worker": np.asarray(names, dtype=str)[worker.numpy()],
            "row": row, "head": head, **{k: v for k, v in t.items() if k == PUBLISHED_REFERENCE}}


PUBLISHED_FILES = {"train": "tldr_embeddings_train.pkl", "validation": "tldr_embeddings_val.pkl"}


def _flat(x):
    """[F] in its own floating dtype from a tensor, an array or a list of them ([tensor F] in the published
    pickles)."""
    if isinstance(x, (list, tuple)):
        x = torch.stack([torch.as_tensor(v) for v in x])
    x = torch.as_tensor(x)
    return (x if x.is_floating_point() else x.float()).reshape(-1)


def convert_published(pkl_path, head, published_reference=None):
    """One published pickle {worker_id: [{"text", "winning_summary", "losing_summary", "embeddings": {"winning":
    [tensor F], "losing": [tensor F]}}, ...]} (read with load_pickle: untrusted) -> (tensors, worker names)
    in the prepared layout: chosen, rejected [n, F], worker [n] (index into the sorted names), row [n] (order in
    the file), head [F, 1]."""
    data = load_pickle(pkl_path)
    if not isinstance(data, dict):
        raise InputError(f"{pkl_path}: expected a dict {{worker_id: [comparison, ...]}}, got {type(data).__name__}")
    names = sorted(str(w) for w in data)
    chosen, rejected, worker = [], [], []
    for w, items in data.items():
        for i, item in enumerate(items):
            try:
                e = item["embeddings"]
                chosen.append(_flat(e["winning"]))
                rejected.append(_flat(e["losing"]))
            except (KeyError, TypeError) as err:
                raise InputError(f"{pkl_path}: worker {w!r} comparison {i} lacks embeddings/winning/losing") from err
            worker.append(names.index(str(w)))
    if not chosen:
        raise InputError(f"{pkl_path}: no comparisons")
    t = {"chosen": torch.stack(chosen), "rejected": torch.stack(rejected), "worker": torch.tensor(worker),
         "row": torch.arange(len(worker)), "head": head,
         **({PUBLISHED_REFERENCE: published_reference} if published_reference is not None else {})}
    if t["chosen"].shape != t["rejected"].shape or head.shape != (t["chosen"].shape[1], 1):
        raise InputError(f"{pkl_path}: embeddings {tuple(t['chosen'].shape)} / {tuple(t['rejected'].shape)} do not "
                         f"match each other or the head {tuple(head.shape)}")
    return t, names


def make_synthetic(num_workers=60, num_features=64, rank=4, dirichlet_alpha=0.3, median_comparisons=200,
                   choice_temperature=4.0, head_noise=1.0, seed=0, population="lowrank", hard_users=0.0,
                   hard_kind="noise", hard_noise=1.0, return_population=False):
    """A Reddit-TLDR-shaped dataset with planted per-worker rewards -> (train, validation) in the layout of
    read_split, with hard workers also "hard_workers" (their names); return_population: ((train, validation),
    the workers' lorelib.populations.Population, users in worker order).

    population "lowrank": worker i prefers by r_i(e) = e^T H w_i with H [F, rank] orthonormal basis rewards and
    w_i ~ Dirichlet(dirichlet_alpha); "ideal_points", "latent", "nonlinear_mixture": the family of
    lorelib.populations (rank prototypes, latent size or reward models; Dirichlet(dirichlet_alpha) users), drawn
    from populations.generator(seed), so that every population sees the same posts, summaries and workers (the
    lowrank draws are made, and for the others left unused, in the same order). A comparison's two summaries are
    post + noise, and the worker picks the first with probability sigmoid(choice_temperature * (r_i(e_1) -
    r_i(e_2))). The reference head is the population's mean linear direction (Population.linear_direction; lowrank:
    the mean reward) plus noise (`head_noise` x its norm). Comparison counts are skewed: a log-normal activity per
    worker, 10 to 4000 comparisons per split (some workers fall below the paper's 50). The last 3 workers appear in
    train only, the 2 before them in validation only. Rows are shuffled across workers, as in the dataset.
    Hard workers (populations.choose_hard over all num_workers): "opposite" ones prefer by -r_i, "noise" ones have
    each choice flipped with probability hard_noise / 2 (populations.flip_labels).
    """
    check_values(dict(population=population, hard_users=hard_users, hard_kind=hard_kind, hard_noise=hard_noise),
                 populations.RULES)
    g = torch.Generator().manual_seed(seed)
    rs = np.random.RandomState(seed)
    gp = populations.generator(seed)  # the other populations and the hard workers: lowrank's draws stay put
    H, _ = torch.linalg.qr(torch.randn(num_features, rank, generator=g))  # [F, rank]
    W = torch.as_tensor(rs.dirichlet(dirichlet_alpha * np.ones(rank), num_workers), dtype=torch.float32)
    pop = populations.Linear(W @ H.T) if population == "lowrank" else populations.make_population(
        population, num_workers, num_features, gp, rank, dirichlet_alpha)  # lowrank: [C, F] reward directions
    mean = pop.linear_direction(num_features, gp)
    noise = torch.randn(num_features, generator=g)
    head = (mean + head_noise * mean.norm() * noise / noise.norm()).reshape(-1, 1)
    names = np.array([f"synthetic_worker_{i:02d}" for i in range(num_workers)])
    activity = np.exp(rs.normal(np.log(median_comparisons), 1.5, num_workers))  # busy workers are busy in both
    hard = populations.choose_hard(num_workers, hard_users, gp)
    if hard_kind == "opposite":
        pop.negate(hard)
    noisy = torch.zeros(num_workers, dtype=torch.bool)
    noisy[hard] = hard_kind == "noise"

    def split(only_absent):
        counts = np.clip(np.round(activity * np.exp(rs.normal(0, 0.3, num_workers))), 10, 4000)
        counts[only_absent] = 0
        worker = rs.permutation(np.repeat(np.arange(num_workers), counts.astype(int)))
        n = len(worker)
        post = torch.randn(n, 1, num_features, generator=g)
        summaries = post + torch.randn(n, 2, num_features, generator=g)  # [n, 2, F]
        margin = pop.margin(summaries[:, 0], summaries[:, 1], worker)
        first = torch.rand(n, generator=g) < torch.sigmoid(choice_temperature * margin)
        if noisy.any():
            first ^= populations.flip_labels(noisy[worker], hard_noise, gp)
        chosen = torch.where(first[:, None], summaries[:, 0], summaries[:, 1])
        rejected = torch.where(first[:, None], summaries[:, 1], summaries[:, 0])
        return {"chosen": chosen.contiguous(), "rejected": rejected.contiguous(), "worker": names[worker],
                "row": torch.arange(n), "head": head, PUBLISHED_REFERENCE: stand_in_reference(head, seed),
                **({"hard_workers": names[hard.numpy()]} if len(hard) else {})}

    train = split(np.arange(num_workers - 5, num_workers - 3))  # workers absent from train
    test = split(np.arange(num_workers - 3, num_workers))       # workers absent from validation
    return ((train, test), pop) if return_population else (train, test)


def read_splits(data_dir=None, synthetic=False, synthetic_features=64, seed=0, population="lowrank", hard_users=0.0,
                hard_kind="noise", hard_noise=1.0):
    """(train, validation) splits in the layout of read_split: data_dir/{train,validation}.safetensors
    written by prepare.py (default data_dir: RedditTLDR/data), or generated by make_synthetic when synthetic
    (of that population, with those hard workers; InputError for prepared data unless lowrank without)."""
    populations.check_population(dict(synthetic=synthetic, population=population, hard_users=hard_users))
    if synthetic:
        train, test = make_synthetic(num_features=synthetic_features, seed=seed, population=population,
                                     hard_users=hard_users, hard_kind=hard_kind, hard_noise=hard_noise)
    else:
        make_cmd = f"python {HERE / 'prepare.py'}" + (f" data_dir={data_dir}" if data_dir else "")
        data_dir = Path(data_dir or HERE / "data")
        train, test = (read_split(Path(data_dir) / f"{s}.safetensors", make_cmd) for s in SPLITS)
        if train["head"].shape != test["head"].shape or not torch.equal(train["head"], test["head"]):
            raise InputError(f"{data_dir}: train.safetensors (F = {train['head'].shape[0]}) and validation"
                             f".safetensors (F = {test['head'].shape[0]}) were embedded with different reward "
                             f"models; recreate both with: {make_cmd}")
    print(f"data: {len(train['row'])} train / {len(test['row'])} validation comparisons, "
          f"{len(np.unique(train['worker']))} / {len(np.unique(test['worker']))} workers, "
          f"F = {train['chosen'].shape[1]}, {str(train['chosen'].dtype).removeprefix('torch.')}"
          f"{' (synthetic)' if synthetic else ''}")
    return train, test


def select_workers(train_worker, test_worker, protocol="published", min_comparisons=50, drop_fewest=2,
                   split_seed=0):
    """Seen and unseen workers of a protocol -> {"seen": [...], "unseen": [...], "dropped": [...]} (names).

    train_worker, test_worker: [n] worker name of every comparison of the train / validation split.
    published: the `drop_fewest` workers with the fewest train-split comparisons are dropped (ties by name);
      the workers present in both splits are sorted, shuffled with random.Random(split_seed) and halved
      (seen: the first len // 2).
    paper: workers with fewer than `min_comparisons` comparisons (both splits together) are dropped; the
      rest are sorted, shuffled and halved the same way.
    """
    train_names, train_counts = np.unique(np.asarray(train_worker, dtype=str), return_counts=True)
    test_names, test_counts = np.unique(np.asarray(test_worker, dtype=str), return_counts=True)
    if protocol == "published":
        fewest = sorted(zip(train_counts.tolist(), train_names.tolist()))[:drop_fewest]
        dropped = sorted(name for _, name in fewest)
        workers = sorted(set(train_names.tolist()) & set(test_names.tolist()) - set(dropped))
    elif protocol == "paper":
        check_value("min_comparisons", min_comparisons, RULES["min_comparisons"])  # half train, half test
        counts = dict(zip(train_names.tolist(), train_counts.tolist()))
        for name, c in zip(test_names.tolist(), test_counts.tolist()):
            counts[name] = counts.get(name, 0) + c
        dropped = sorted(w for w, c in counts.items() if c < min_comparisons)
        workers = sorted(w for w, c in counts.items() if c >= min_comparisons)
    else:
        check_value("protocol", protocol, RULES["protocol"])
    if len(workers) < 2:
        raise InputError(f"protocol {protocol!r} leaves {len(workers)} worker(s); need at least 2")
    random.Random(split_seed).shuffle(workers)
    half = len(workers) // 2
    return {"seen": workers[:half], "unseen": workers[half:], "dropped": dropped}


def _rows_by_worker(worker, offset=0):
    """{name: row indices (ascending, + offset)} of a worker array [n]."""
    worker = np.asarray(worker, dtype=str)
    return {w: np.flatnonzero(worker == w) + offset for w in np.unique(worker).tolist()}


def _cap(rows, m, rng):
    """At most m of `rows`: a seeded random subset, kept in dataset order (all rows when m is None)."""
    if m is None or len(rows) <= m:
        return rows
    return np.sort(rng.choice(rows, m, replace=False))


def _pairs(splits, roles):
    """Table Pairs of the workers of each role, all over one embedding table -> list of Pairs.

    roles: per role, per worker an int array of rows into the concatenated `splits`. The table [2U, F]
    holds the chosen then the rejected embedding of each of the U rows used (once), so that methods
    which score both sides (the baselines) can read them; LoRe's differences are taken from it."""
    used = np.unique(np.concatenate([idx for rows in roles for idx in rows] + [np.zeros(0, dtype=np.int64)]))
    starts = np.cumsum([0] + [len(s["row"]) for s in splits])
    F = splits[0]["chosen"].shape[1]
    table = torch.empty(2 * len(used), F, dtype=splits[0]["chosen"].dtype)
    for s, a, b in zip(splits, starts[:-1], starts[1:]):
        here = np.flatnonzero((used >= a) & (used < b))
        i = torch.as_tensor(used[here] - a, dtype=torch.long)
        table[here] = s["chosen"][i]
        table[len(used) + here] = s["rejected"][i]
    out = []
    for rows in roles:
        pos = [np.searchsorted(used, idx) for idx in rows]
        out.append(Pairs.from_indices(table, pos, [p + len(used) for p in pos]))
    return out


def data_key(config):
    """The key of the seen users' training data a run of `config` fits on, under which a method stores its tuned
    settings (Method.tuned): the synthetic shape, or a fingerprint of the prepared train file; and the protocol."""
    protocol = f"protocol={config['protocol']} max_train_pairs={config['max_train_pairs']}" + (
        f" min_comparisons={config['min_comparisons']}" if config["protocol"] == "paper" else "")
    if config.get("synthetic"):
        return f"RedditTLDR synthetic {populations.key(config)} F={config['synthetic_features']} {protocol}"
    path = Path(config.get("data_dir") or HERE / "data") / f"{SPLITS[0]}.safetensors"
    return f"RedditTLDR prepared {fingerprint(path)} {protocol}"


def split_pairs(train, test, protocol="published", max_train_pairs=150, max_fewshot_pairs=50, min_comparisons=50,
                drop_fewest=2, split_seed=0):
    """The features of a Reddit TLDR protocol -> ((train, test, train_unseen, test_unseen) Pairs, info).

    train, test: the train and validation splits (read_split layout).
    published: seen workers train on at most `max_train_pairs` of their train-split comparisons, unseen
      workers get at most `max_fewshot_pairs` few-shot pairs from theirs; everyone is tested on all their
      validation-split comparisons.
    paper: each worker's comparisons (both splits pooled) are shuffled and split half train (or few-shot),
      half test; the same caps apply to the train half.
    Capped subsets are seeded random subsets (np.random.RandomState(split_seed)), kept in dataset order;
    None keeps all. info: {"protocol", "seen", "unseen", "dropped", "pairs": {role: count}}.
    """
    check_values(dict(max_train_pairs=max_train_pairs, max_fewshot_pairs=max_fewshot_pairs), RULES)
    info = {"protocol": protocol, **select_workers(train["worker"], test["worker"], protocol,
                                                   min_comparisons, drop_fewest, split_seed)}
    rng = np.random.RandomState(split_seed)
    rows_tr = _rows_by_worker(train["worker"])
    rows_te = _rows_by_worker(test["worker"], offset=len(train["row"]))  # pooled index space
    roles = {}
    for group, cap in (("seen", max_train_pairs), ("unseen", max_fewshot_pairs)):
        fit, evaluate = [], []
        for w in info[group]:
            if protocol == "published":
                own_train, own_test = rows_tr[w], rows_te[w]
            else:
                none = np.zeros(0, dtype=np.int64)
                pooled = rng.permutation(np.concatenate([rows_tr.get(w, none), rows_te.get(w, none)]))
                own_train, own_test = np.sort(pooled[:len(pooled) // 2]), np.sort(pooled[len(pooled) // 2:])
            fit.append(_cap(own_train, cap, rng))
            evaluate.append(own_test)
        roles[group] = (fit, evaluate)
    features = tuple(_pairs([train, test], [roles["seen"][0], roles["seen"][1], roles["unseen"][0],
                                            roles["unseen"][1]]))
    info["pairs"] = {name: int(len(p.user)) for name, p in zip(RESULT_NAMES, features)}
    print(f"protocol {protocol}: {len(info['seen'])} seen / {len(info['unseen'])} unseen workers "
          f"({len(info['dropped'])} dropped); pairs: " + ", ".join(f"{k} {v}" for k, v in info["pairs"].items()))
    return features, info


def load(data_dir=None, synthetic=False, synthetic_features=64, protocol="published", max_train_pairs=150,
         max_fewshot_pairs=50, min_comparisons=50, split_seed=0, seed=0, reference="head", pairs_dtype="auto",
         population="lowrank", hard_users=0.0, hard_kind="noise", hard_noise=1.0):
    """A Reddit TLDR protocol (see split_pairs) on the prepared (or synthetic) data -> PreferenceData.

    head: the reward model's own, or with reference="published" the published scripts' direction
    (choose_reference; synthetic data: stand_in_reference). pairs_dtype: the dtype of the pairs'
    table, "auto" (the prepared files'), "float32" or "bfloat16". info: N, N_unseen, "workers":
    {"protocol", "seen", "unseen", "dropped" (worker names), "pairs": {role: count}}, "users" / "unseen_users"
    (the seen / unseen worker names, in user order) and (prepared data) "reward_model" (reward_model_info).
    population, hard_users, hard_kind, hard_noise: the synthetic workers (make_synthetic; lorelib.populations);
    synthetic data's info also has "population" (its name) and "hard_users": {"seen", "unseen": the hard workers'
    user indices}.
    """
    check_value("synthetic_features", synthetic_features)
    train, test = read_splits(data_dir, synthetic, synthetic_features, seed, population, hard_users, hard_kind,
                              hard_noise)
    pairs, workers = split_pairs(train, test, protocol, max_train_pairs, max_fewshot_pairs, min_comparisons,
                                 split_seed=split_seed)
    info = {"workers": workers, "users": workers["seen"], "unseen_users": workers["unseen"], "reference": reference}
    path = Path(data_dir or HERE / "data") / f"{SPLITS[0]}.safetensors"
    if synthetic:
        hard = set(train.get("hard_workers", np.zeros(0, dtype=str)).tolist())
        info.update(population=population, hard_users={group: [i for i, w in enumerate(workers[group]) if w in hard]
                                                       for group in ("seen", "unseen")})
    else:
        info["reward_model"] = reward_model_info(path)
    head = choose_reference(reference, train, path, f"python {HERE / 'prepare.py'}" +
                                  (f" data_dir={data_dir}" if data_dir else ""))
    return PreferenceData(*pairs, head=head, info=info).with_dtype(pairs_dtype)
