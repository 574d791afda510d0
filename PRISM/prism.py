"""PRISM (HannahRoseKirk/prism-alignment): multi-turn dialogs -> users, pairs, split; synthetic data.

    from PRISM import prism                  # with the repository root on sys.path
    data = prism.load(synthetic=True)        # a PreferenceData

Every turn of a dialog shows the user several rated replies; the chosen one continues the dialog.
A turn's prompt is the history so far (earlier user messages and chosen replies) and every
rejected reply is its own pair against the chosen reply. PRISM/prepare.py writes one safetensors
file (TENSORS) holding an embedding table and, per pair, row indices into it plus user / dialog /
turn / seen / split.
"""
import json
import random
from pathlib import Path

import numpy as np
import torch

from lorelib import populations
from lorelib.choice import Candidates
from lorelib.config import InputError, check_value, check_values, print0
from lorelib.data import Pairs, PreferenceData
from lorelib.files import (
    PUBLISHED_REFERENCE,
    check_shapes,
    choose_reference,
    fingerprint,
    load_metadata,
    load_pickle,
    load_tensors,
    stand_in_reference,
    tensor_shapes,
)
from lorelib.learned import reward_model_info

HERE = Path(__file__).resolve().parent

REPO = "HannahRoseKirk/prism-alignment"


FILES = ["survey.jsonl", "conversations.jsonl", "utterances.jsonl"]


TENSORS = ["embeddings", "head", "chosen", "rejected", "user", "dialog", "turn", "seen", "split"]


SCORES = ["chosen_score", "rejected_score"]  # per pair: the user's 1-100 rating of each reply (NaN where missing)


SPLITS = ["train", "test"]  # split code 0: training (seen users) / few-shot (unseen users); 1: test
# the range of this dataset's own settings (config.check_value rules; the scripts pass them to configure)
RULES = {"user_split": "one of published filter_first", "seen_fraction": "in (0, 1)", "min_dialogs": "int >= 1",
         "synthetic_users": "int >= 2", **populations.RULES}  # population, hard_users, hard_kind, hard_noise


# required fields of a jsonl line: name -> accepted types
_SCHEMAS = {
    "survey.jsonl": {"user_id": (str,), "num_completed_conversations": (int,)},
    "conversations.jsonl": {"conversation_id": (str,), "user_id": (str,), "conversation_history": (list,)},
    "utterances.jsonl": {"conversation_id": (str,), "turn": (int,), "within_turn_id": (int,),
                         "model_response": (str,), "if_chosen": (bool,)},
}


_HISTORY_SCHEMA = {"turn": (int,), "role": (str,)}  # and `content` (str) for role 'user'


def _schema_error(row, schema):
    """Why the dict `row` does not fit `schema` ({field: types}), or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key, types in schema.items():
        if key not in row or row[key] is None:
            return f"missing field {key!r}"
        value = row[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            return f"field {key!r} has type {type(value).__name__}, expected {types[0].__name__}"
    return None


def read_jsonl(path):
    """Rows (dicts) of a PRISM jsonl file whose required fields are present and well typed.

    The schema is picked by the file name (survey / conversations / utterances.jsonl).
    Malformed lines (bad JSON, missing or mistyped fields) are reported with their line
    number and skipped; blank lines are ignored.
    """
    path = Path(path)
    schema = _SCHEMAS[path.name]
    rows, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                error = _schema_error(row, schema)
            except json.JSONDecodeError as e:
                error = f"invalid JSON ({e.msg})"
            if error is None and path.name == "conversations.jsonl":
                for i, message in enumerate(row["conversation_history"]):
                    error = _schema_error(message, _HISTORY_SCHEMA)
                    if error is None and message["role"] == "user":
                        error = _schema_error(message, {"content": (str,)})
                    if error:
                        error = f"conversation_history[{i}]: {error}"
                        break
            if error:
                bad += 1
                print0(f"{path.name}:{lineno}: {error}; line skipped")
                continue
            rows.append(row)
    print0(f"{path.name}: {len(rows)} rows" + (f", {bad} malformed line(s) skipped" if bad else ""))
    return rows


def _reply(u):
    return {"content": u["model_response"], "score": u.get("score"), "model_name": u.get("model_name")}


def build_dialogs(survey, conversations, utterances):
    """Dialogs of PRISM as published: rows of the three jsonl files -> list of dialog dicts.

    Users: those with at least one completed conversation in the survey. A dialog's user
    messages come from its conversation_history (role 'user'), its rated replies from
    utterances.jsonl (one row per reply; if_chosen marks the chosen one). Turns are read in
    order from the first (0 in PRISM); a turn continues the dialog when it has one user
    message and exactly one chosen reply, and it gives pairs when it also has a rejected
    reply. The dialog stops at the first turn that cannot continue it; dialogs with no
    complete turn are dropped.
    Returns [{"conversation_id", "user_id", "conversation_type",
              "turns": [{"turn", "user", "chosen": reply, "rejected": [reply, ...]}]}]
    with reply = {"content", "score", "model_name"}, in conversations.jsonl order.
    """
    users = {r["user_id"] for r in survey if r["num_completed_conversations"] >= 1}
    replies = {}  # (conversation_id, turn) -> {within_turn_id: utterance}
    for u in utterances:
        replies.setdefault((u["conversation_id"], u["turn"]), {}).setdefault(u["within_turn_id"], u)
    dialogs, seen_ids, counts = [], set(), {"no survey user": 0, "duplicate": 0, "no complete turn": 0}
    for conv in conversations:
        cid = conv["conversation_id"]
        if conv["user_id"] not in users:
            counts["no survey user"] += 1
            continue
        if cid in seen_ids:
            counts["duplicate"] += 1
            continue
        seen_ids.add(cid)
        user_messages = {}
        for m in conv["conversation_history"]:
            if m["role"] == "user":
                user_messages.setdefault(m["turn"], []).append(m["content"])
        turns, first = [], min(user_messages, default=0)
        for t in range(first, first + len(user_messages)):
            candidates = [replies[(cid, t)][k] for k in sorted(replies.get((cid, t), {}))]
            chosen = [u for u in candidates if u["if_chosen"]]
            if len(user_messages.get(t, [])) != 1 or len(chosen) != 1:
                break
            rejected = [_reply(u) for u in candidates if not u["if_chosen"]]
            turns.append({"turn": t, "user": user_messages[t][0], "chosen": _reply(chosen[0]), "rejected": rejected})
        while turns and not turns[-1]["rejected"]:  # a last turn without rejected replies gives no pairs
            turns.pop()
        if not any(turn["rejected"] for turn in turns):
            counts["no complete turn"] += 1
            continue
        dialogs.append({"conversation_id": cid, "user_id": conv["user_id"],
                        "conversation_type": conv.get("conversation_type"), "turns": turns})
    dropped = ", ".join(f"{n} {why}" for why, n in counts.items() if n)
    print0(f"{len(dialogs)} dialogs of {len({d['user_id'] for d in dialogs})} users"
                 + (f" (dropped: {dropped})" if dropped else ""))
    return dialogs


USER_SPLITS = ("published", "filter_first")


def split_users(dialog_users, seed=123, seen_fraction=0.8, min_dialogs=6, user_split="published"):
    """Seen / unseen users and train / test dialogs.

    dialog_users: the user id of every dialog, in file order.
    user_split "published": all users (sorted) are shuffled with NumPy's generator seeded `seed`
      (np.random.RandomState(seed).shuffle), the first int(seen_fraction * n) are seen, the rest
      unseen; then users with fewer than `min_dialogs` dialogs are dropped from both groups.
    user_split "filter_first": users with fewer than `min_dialogs` dialogs are dropped first; the
      rest (sorted) are shuffled with random.Random(seed) and the first int(seen_fraction * n) are seen
      (exactly seen_fraction of the kept users).
    Each kept user's dialogs are then shuffled with random.Random(seed) (the generator that shuffled the
    users, for filter_first); the first half (rounded down) is for training (seen users) or few-shot
    (unseen users), the rest for test.
    Returns (users: kept user ids, seen ones first, in shuffled order; num_seen;
    dialog_split: per dialog 0 (train / few-shot), 1 (test) or -1 (user dropped)).
    """
    by_user = {}
    for d, u in enumerate(dialog_users):
        by_user.setdefault(u, []).append(d)
    rng = random.Random(seed)
    if user_split == "published":
        users = sorted(by_user)
        np.random.RandomState(seed).shuffle(users)
        seen = users[:int(seen_fraction * len(users))]
        seen, unseen = ([u for u in group if len(by_user[u]) >= min_dialogs] for group in (seen, users[len(seen):]))
        users, num_seen = seen + unseen, len(seen)
    elif user_split == "filter_first":
        users = sorted(u for u, ds in by_user.items() if len(ds) >= min_dialogs)
        rng.shuffle(users)
        num_seen = int(seen_fraction * len(users))
    else:
        check_value("user_split", user_split, RULES["user_split"])
    dialog_split = [-1] * len(dialog_users)
    for u in users:
        ds = list(by_user[u])
        rng.shuffle(ds)
        for i, d in enumerate(ds):
            dialog_split[d] = int(i >= len(ds) // 2)
    return users, num_seen, dialog_split


def build_pairs(dialogs, seed=123, seen_fraction=0.8, min_dialogs=6, user_split="published"):
    """Split the dialogs (split_users) and list every pair and every conversation to embed.

    Returns (pairs, users, conversations):
      pairs: pandas DataFrame, one row per (turn, rejected reply), ordered by user index
        (seen users first), split, dialog, turn: user, user_id, seen, split ('train'/'test'),
        dialog, conversation_id, conversation_type, turn, prompt (messages so far, ending
        with the user message), chosen, rejected, chosen_score, rejected_score, chosen_model,
        rejected_model, chosen_row, rejected_row (rows of `conversations`);
      users: DataFrame user, user_id, seen, dialogs, train_dialogs, test_dialogs, pairs;
      conversations: list of message lists, the chosen conversation of every turn
        (chosen_row), then the rejected conversation of every pair (rejected_row).
    """
    import pandas as pd
    users, num_seen, dialog_split = split_users([d["user_id"] for d in dialogs], seed, seen_fraction, min_dialogs,
                                                user_split)
    if not users:
        raise InputError(f"no user has at least {min_dialogs} dialogs")
    index = {u: i for i, u in enumerate(users)}
    order = sorted((index[d["user_id"]], dialog_split[i], i) for i, d in enumerate(dialogs) if dialog_split[i] >= 0)
    rows, chosen_convs, rejected_convs = [], [], []
    for user, split, i in order:
        d = dialogs[i]
        history = []
        for turn in d["turns"]:
            prompt = history + [{"role": "user", "content": turn["user"]}]
            chosen = turn["chosen"]
            chosen_row = len(chosen_convs)
            if turn["rejected"]:
                chosen_convs.append(prompt + [{"role": "assistant", "content": chosen["content"]}])
            for r in turn["rejected"]:
                rows.append({"user": user, "user_id": d["user_id"], "seen": user < num_seen,
                             "split": SPLITS[split], "dialog": i, "conversation_id": d["conversation_id"],
                             "conversation_type": d["conversation_type"], "turn": turn["turn"], "prompt": prompt,
                             "chosen": chosen["content"], "rejected": r["content"],
                             "chosen_score": chosen["score"], "rejected_score": r["score"],
                             "chosen_model": chosen["model_name"], "rejected_model": r["model_name"],
                             "chosen_row": chosen_row, "rejected_row": len(rejected_convs)})
                rejected_convs.append(prompt + [{"role": "assistant", "content": r["content"]}])
            history = prompt + [{"role": "assistant", "content": chosen["content"]}]
    pairs = pd.DataFrame(rows)
    pairs["rejected_row"] += len(chosen_convs)
    for col in ["chosen_score", "rejected_score"]:
        pairs[col] = pd.to_numeric(pairs[col], errors="coerce").astype("float64")
    stats = pd.DataFrame({"user": range(len(users)), "user_id": users,
                          "seen": [i < num_seen for i in range(len(users))]})
    def per_user(counts):
        return counts.reindex(stats["user"], fill_value=0).to_numpy()
    stats["dialogs"] = per_user(pairs.groupby("user")["dialog"].nunique())
    for split in SPLITS:
        stats[f"{split}_dialogs"] = per_user(pairs[pairs["split"] == split].groupby("user")["dialog"].nunique())
    stats["pairs"] = per_user(pairs.groupby("user").size())
    print0(f"{len(users)} users with >= {min_dialogs} dialogs: {num_seen} seen, {len(users) - num_seen} unseen; "
                 f"{len(pairs)} pairs, {len(chosen_convs) + len(rejected_convs)} conversations to embed")
    return pairs, stats, chosen_convs + rejected_convs


def pair_tensors(pairs):
    """Per-pair int64 tensors of a build_pairs DataFrame (the extra tensors of the embedding file)."""
    def col(name):
        return torch.as_tensor(pairs[name].to_numpy().astype(np.int64))
    return {"chosen": col("chosen_row"), "rejected": col("rejected_row"), "user": col("user"),
            "dialog": col("dialog"), "turn": col("turn"), "seen": col("seen"),
            "split": torch.as_tensor((pairs["split"] == "test").to_numpy().astype(np.int64)),
            **{k: torch.as_tensor(pairs[k].to_numpy(dtype=np.float32)) for k in SCORES}}


def make_synthetic(num_users=1000, num_features=64, rank=4, dirichlet_alpha=0.1, label_noise=0.2,
                   head_noise=1.0, seed=0, population="lowrank", hard_users=0.0, hard_kind="noise", hard_noise=1.0,
                   return_population=False):
    """A PRISM-shaped dataset with a planted per-user reward, in the prepare.py format.

    Users have 6 + Geometric(0.3) - 1 dialogs (at most 20); a dialog has 1-4 turns; the first
    turn shows 4 replies, later turns 2 (as in PRISM). A reply's embedding is its dialog's
    context plus N(0, I) [F]; user i's utility of it is its reward r_i(e) plus Gumbel noise of scale `label_noise`;
    it chooses the reply of highest utility and rates each on PRISM's 1-100 scale: 50 + 15 x (utility - the
    turn's mean utility), rounded and clipped to [1, 100] (so the chosen reply has the top rating, possibly tied).
    population "lowrank": r_i(e) = e^T h_i (h_i = U w_i normalised, U [F, rank] orthonormal, w_i ~
    Dirichlet(dirichlet_alpha)); "ideal_points", "latent", "nonlinear_mixture": the family of lorelib.populations
    (rank prototypes, latent size or reward models; Dirichlet(dirichlet_alpha) users), drawn from
    populations.generator(seed), so that every population sees the same dialogs, contexts and replies (the lowrank
    draws are made, and for the others left unused, in the same order).
    The reference head is the population's mean linear direction (lowrank: the mean user direction;
    Population.linear_direction) plus noise (`head_noise` x its norm).
    Hard users (populations.choose_hard in each of the seen and the unseen users): "opposite" ones have their
    reward negated; "noise" ones choose, at each turn with probability hard_noise, a reply at random (the pairs'
    labels then agree with the reward half the time; their ratings still follow their utility).
    Returns the dict of tensors of TENSORS and SCORES (see load), plus for lowrank the planted user reward
    directions `true_directions` [C, F] and with hard users `hard_users` [h] (their user indices), rows and
    indices in user-index order; return_population: (that dict, the users' lorelib.populations.Population in
    user-index order).
    """
    check_values(dict(population=population, hard_users=hard_users, hard_kind=hard_kind, hard_noise=hard_noise),
                 populations.RULES)
    rng = np.random.default_rng(seed)
    gp = populations.generator(seed)  # the other populations and the hard users: lowrank's draws stay put
    U, _ = np.linalg.qr(rng.standard_normal((num_features, rank)))
    W = rng.dirichlet(dirichlet_alpha * np.ones(rank), num_users)
    H = W @ U.T  # [N, F] user reward directions
    H /= np.linalg.norm(H, axis=1, keepdims=True)
    if population == "lowrank":
        mean = H.mean(0)
    else:  # users in user-index order (their draws are exchangeable)
        pop = populations.make_population(population, num_users, num_features, gp, rank, dirichlet_alpha)
        mean = pop.linear_direction(num_features, gp).double().numpy()
    noise = rng.standard_normal(num_features)
    head = mean + head_noise * np.linalg.norm(mean) * noise / np.linalg.norm(noise)
    n_dialogs = np.minimum(5 + rng.geometric(0.3, num_users), 20)
    users, num_seen, dialog_split = split_users(np.repeat(np.arange(num_users), n_dialogs).tolist(), seed)
    index = {u: i for i, u in enumerate(users)}
    hard = torch.cat([populations.choose_hard(num_seen, hard_users, gp),
                      num_seen + populations.choose_hard(len(users) - num_seen, hard_users, gp)])
    if population == "lowrank":
        pop = populations.Linear(torch.as_tensor(H[users]))  # [C, F] by user index
    pop.negate(hard if hard_kind == "opposite" else [])
    if population == "lowrank":  # signed: the directions of the users' rewards
        directions = pop.directions.numpy() * pop.sign.numpy()[:, None]
    noisy = set(hard.tolist()) if hard_kind == "noise" else set()
    starts = np.concatenate([[0], np.cumsum(n_dialogs)])
    rows, cols = [], {k: [] for k in ["chosen", "rejected", "user", "dialog", "turn", "split"] + SCORES}
    for u in users:
        i = index[u]
        for split in (0, 1):
            for d in [d for d in range(starts[u], starts[u + 1]) if dialog_split[d] == split]:
                context = rng.standard_normal(num_features)
                for t in range(rng.integers(1, 5)):
                    E = context + rng.standard_normal((4 if t == 0 else 2, num_features))
                    reward = E @ directions[i] if population == "lowrank" else \
                        pop.reward(torch.from_numpy(E), torch.full((len(E),), i)).numpy()
                    utility = reward + label_noise * rng.gumbel(size=len(E))
                    best = np.argmax(utility)
                    if i in noisy and float(torch.rand(1, generator=gp)) < hard_noise:
                        best = int(torch.randint(len(E), (1,), generator=gp))
                    rating = np.clip(np.round(50 + 15 * (utility - utility.mean())), 1, 100)
                    c = len(rows)
                    rows.append(E[best])
                    for j in range(len(E)):
                        if j != best:
                            for k, v in [("chosen", c), ("rejected", len(rows)), ("user", i),
                                         ("dialog", d), ("turn", t), ("split", split),
                                         ("chosen_score", rating[best]), ("rejected_score", rating[j])]:
                                cols[k].append(v)
                            rows.append(E[j])
    t = {k: torch.as_tensor(v, dtype=torch.float32 if k in SCORES else torch.long) for k, v in cols.items()}
    t["seen"] = (t["user"] < num_seen).long()
    t["embeddings"] = torch.as_tensor(np.stack(rows), dtype=torch.float32)
    t["head"] = torch.as_tensor(head, dtype=torch.float32).reshape(-1, 1)
    t[PUBLISHED_REFERENCE] = stand_in_reference(t["head"], seed)
    if population == "lowrank":
        t["true_directions"] = torch.as_tensor(directions, dtype=torch.float32)  # [C, F] by user index
    if len(hard):
        t["hard_users"] = hard
    return (t, pop) if return_population else t


PUBLISHED_FILES = {"train": "train_embeddings.pkl", "test": "test_embeddings.pkl"}


def convert_published(train_path, test_path, head, published_reference=None):
    """The published train_embeddings.pkl / test_embeddings.pkl (torch.save'd lists of {"prompt", "extra_info":
    {"user_id", "dialog_id", "chosen_utterance", "rejected_utterance", "chosen_conv_embedding",
    "rejected_conv_embedding", "seen", "split"}}; read with load_pickle: untrusted) + the head [F, 1] -> the
    dict of TENSORS that load() reads: one pair per record, the records of train_path with split 0 (train /
    few-shot) and of test_path with split 1; seen users first (in order of appearance), then unseen ones."""
    records = []
    for code, path in enumerate([train_path, test_path]):
        data = load_pickle(path)
        if not isinstance(data, (list, tuple)):
            raise InputError(f"{path}: expected a list of records, got {type(data).__name__}")
        for i, r in enumerate(data):
            try:
                x = r["extra_info"]
                records.append((code, str(x["user_id"]), str(x["dialog_id"]), bool(x["seen"]),
                                torch.as_tensor(x["chosen_conv_embedding"]).reshape(-1),  # their own dtype
                                torch.as_tensor(x["rejected_conv_embedding"]).reshape(-1)))
            except (KeyError, TypeError) as err:
                raise InputError(f"{path}: record {i} lacks extra_info fields ({err})") from err
    if not records:
        raise InputError(f"{train_path}, {test_path}: no records")
    seen_users = list(dict.fromkeys(r[1] for r in records if r[3]))
    unseen_users = list(dict.fromkeys(r[1] for r in records if not r[3] and r[1] not in set(seen_users)))
    index = {u: i for i, u in enumerate(seen_users + unseen_users)}
    dialogs = {d: i for i, d in enumerate(dict.fromkeys(r[2] for r in records))}
    records.sort(key=lambda r: (index[r[1]], r[0]))
    turn, count = [], {}
    for r in records:  # the position of the pair within its dialog
        turn.append(count.get(r[2], 0))
        count[r[2]] = turn[-1] + 1
    n = len(records)
    t = {"embeddings": torch.stack([r[4] for r in records] + [r[5] for r in records]), "head": head,
         "chosen": torch.arange(n), "rejected": torch.arange(n, 2 * n),
         "user": torch.tensor([index[r[1]] for r in records]), "dialog": torch.tensor([dialogs[r[2]] for r in records]),
         "turn": torch.tensor(turn), "seen": torch.tensor([int(index[r[1]] < len(seen_users)) for r in records]),
         "split": torch.tensor([r[0] for r in records])}
    if head.shape != (t["embeddings"].shape[1], 1):
        raise InputError(f"head {tuple(head.shape)} does not match the embeddings' F = {t['embeddings'].shape[1]}")
    if published_reference is not None:
        t[PUBLISHED_REFERENCE] = published_reference
    return t


def _make_cmd(data_dir=None):
    """The command that writes the prepared files into data_dir (None: the default folder)."""
    return f"python {HERE / 'prepare.py'}" + (f" data_dir={data_dir}" if data_dir else "")


def check_scores(path, make_cmd):
    """InputError unless the prepared file at `path` holds the ratings (SCORES) that choice quality needs: read
    from its header only."""
    missing = [k for k in SCORES if k not in tensor_shapes(path, make_cmd)]
    if missing:
        how = (f"the published pkl files hold no ratings: prepare from the jsonl files with {make_cmd} (embeds "
               f"every reply again)" if "converted_from" in load_metadata(path) else
               f"add it with: {make_cmd} (rewrites the file with the ratings, without embedding again)")
        raise InputError(f"{path} has no `{missing[0]}` tensor (each reply's 1-100 rating by its user, which choice "
                         f"quality needs; files prepared before it was stored lack it); {how}, or pass "
                         f"choice_quality=False for accuracy only")


def check_config(config):
    """The scripts' check before any work (configure(..., checks=[check_config])): with choice_quality, the
    prepared file holds the users' ratings."""
    if config.get("choice_quality") and not config.get("synthetic"):
        check_scores(Path(config.get("data_dir") or HERE / "data") / "embeddings.safetensors",
                     _make_cmd(config.get("data_dir")))


def data_key(config):
    """The key of the seen users' training data a run of `config` fits on, under which a method stores its tuned
    settings (Method.tuned): the synthetic shape, or a fingerprint of the prepared embeddings file."""
    if config.get("synthetic"):
        return (f"PRISM synthetic {populations.key(config)} F={config['synthetic_features']} "
                f"users={config['synthetic_users']}")
    data_dir = config.get("data_dir")
    path = Path(data_dir or HERE / "data") / "embeddings.safetensors"
    return f"PRISM prepared {fingerprint(path, _make_cmd(data_dir))}"


def first_turns(t, table, N, source, make_cmd):
    """{"seen", "unseen": lorelib.choice.Candidates} of choice quality: the first turn of every test dialog (its
    smallest turn with pairs), where its user chooses among the chosen reply and each rejected one, with the user's
    ratings (t: the tensors of TENSORS and SCORES; table: the embeddings [R, F]; users 0..N-1 are seen, the rest
    unseen and renumbered from 0). A turn with a missing rating is left out (counted)."""
    pairs = np.flatnonzero(t["split"].numpy() == 1)
    dialog, turn, chosen, rejected, user = (t[k].numpy() for k in ("dialog", "turn", "chosen", "rejected", "user"))
    score_c, score_r = (t[k].double().numpy() for k in SCORES)
    first = {}
    for i in pairs:
        first[dialog[i]] = min(first.get(dialog[i], turn[i]), turn[i])
    turns = {}
    for i in pairs:
        if turn[i] == first[dialog[i]]:
            turns.setdefault(dialog[i], []).append(i)
    J = 1 + max((len(v) for v in turns.values()), default=1)
    out, skipped = {g: ([], [], []) for g in ("seen", "unseen")}, 0
    for d, idx in sorted(turns.items()):
        if len(set(chosen[idx])) != 1:
            raise InputError(f"{source}: dialog {d}'s first turn has pairs with different chosen rows; re-run: "
                             f"{make_cmd}")
        rows = [int(chosen[idx[0]])] + rejected[idx].tolist()
        truth = [float(score_c[idx[0]])] + score_r[idx].tolist()
        if not np.isfinite(truth).all():
            skipped += 1
            continue
        u = int(user[idx[0]])
        group = out["seen" if u < N else "unseen"]
        group[0].append(rows + [-1] * (J - len(rows)))
        group[1].append(truth + [float("nan")] * (J - len(rows)))
        group[2].append(u if u < N else u - N)
    num_users = {"seen": N, "unseen": int(t["user"].max()) + 1 - N}
    sets = {g: Candidates(table, torch.tensor(rows, dtype=torch.long).reshape(-1, J), torch.arange(len(rows)),
                          torch.tensor(users, dtype=torch.long),
                          torch.tensor(truth, dtype=torch.float64).reshape(-1, J), num_users[g], "rating")
            for g, (rows, truth, users) in out.items()}
    print(f"choice quality: the first turns of the test dialogs, {J} replies at most: "
          + ", ".join(f"{len(c.prompt)} of {g} users ({len(torch.unique(c.user))} users)" for g, c in sets.items())
          + (f"; {skipped} with a missing rating left out" if skipped else ""))
    return sets


def load(data_dir=None, synthetic=False, synthetic_users=1000, synthetic_features=64, seed=0, reference="head",
         pairs_dtype="auto", choice=False, population="lowrank", hard_users=0.0, hard_kind="noise", hard_noise=1.0):
    """PRISM as published (see split_users) -> PreferenceData.

    Reads data_dir/embeddings.safetensors (written by prepare.py; default data_dir: PRISM/data), or
    generates make_synthetic when synthetic. seen_train / seen_test: Pairs of the seen users
    (0..N-1), unseen_fewshot / unseen_test: Pairs of the unseen users (renumbered 0..N_unseen-1),
    all indexing the embedding table [R, F]. info["fewshot_dialogs"] (also "shot_groups") [m]: the dialog of each
    unseen_fewshot pair (to draw whole dialogs as few-shot examples); info["train_groups"] [m]: the dialog of each
    seen_train pair (held-out pairs are whole dialogs: evaluate.holdout_pairs); for prepared data also
    "reward_model" (reward_model_info) and "users" / "unseen_users" (PRISM user ids, from users.parquet).
    head: the reward model's own, or with reference="published" the published scripts' direction
    (choose_reference; synthetic data: stand_in_reference), the K = 0 column and V_sft.
    pairs_dtype: the dtype of the embedding table, "auto" (the prepared file's), "float32" or "bfloat16".
    choice: also info["choice"], the candidate sets of choice quality (first_turns); the file must hold SCORES.
    population, hard_users, hard_kind, hard_noise: the synthetic users (make_synthetic; lorelib.populations);
    synthetic data's info also has "population" (its name) and "hard_users": {"seen", "unseen": the hard users'
    indices}.
    """
    make_cmd = _make_cmd(data_dir)
    populations.check_population(dict(synthetic=synthetic, population=population, hard_users=hard_users))
    if synthetic:
        check_value("synthetic_users", synthetic_users, RULES["synthetic_users"])
        check_value("synthetic_features", synthetic_features)
        t = make_synthetic(synthetic_users, synthetic_features, seed=seed, population=population,
                           hard_users=hard_users, hard_kind=hard_kind, hard_noise=hard_noise)
    else:
        path = Path(data_dir or HERE / "data") / "embeddings.safetensors"
        if choice:
            check_scores(path, make_cmd)
        t = load_tensors(path, TENSORS, make_cmd=make_cmd, allow_nan=SCORES)
        check_shapes(path, {"embeddings": (t["embeddings"].shape, ("R", "F")),
                                  "head": (t["head"].shape, ("F", 1)),
                                  **{k: (t[k].shape, ("P",)) for k in TENSORS[2:]}}, make_cmd)
        R = len(t["embeddings"])
        for k in ("chosen", "rejected"):
            if len(t[k]) and not (0 <= int(t[k].min()) and int(t[k].max()) < R):
                raise InputError(f"{path}: `{k}` indexes rows outside the {R} embeddings; recreate it with: {make_cmd}")
    E, user, seen, split = t["embeddings"], t["user"], t["seen"].bool(), t["split"]
    N = int(user[seen].max()) + 1 if seen.any() else 0
    N_unseen = int(user.max()) + 1 - N
    if N == 0 or N_unseen <= 0 or bool((seen != (user < N)).any()):
        raise InputError(f"{'synthetic data' if synthetic else path}: expected seen users 0..N-1 then unseen users; "
                         f"re-run: {make_cmd}")

    def part(is_seen, code):
        m = (seen == is_seen) & (split == code)
        return Pairs(user[m] - (0 if is_seen else N), N if is_seen else N_unseen, table=E,
                           chosen=t["chosen"][m], rejected=t["rejected"][m])

    out = part(True, 0), part(True, 1), part(False, 0), part(False, 1)
    counts = [p.counts() for p in out]
    for name, c in zip(["seen train", "seen test", "unseen few-shot", "unseen test"], counts):
        if (c == 0).any():
            raise InputError(f"{int((c == 0).sum())} users have no {name} pairs")
    print(f"PRISM{' (synthetic)' if synthetic else ''}: {N} seen / {N_unseen} unseen users, F = {E.shape[1]}, "
          f"{str(E.dtype).removeprefix('torch.')}; "
          f"pairs: {len(out[0].user)} seen train, {len(out[1].user)} seen test, {len(out[2].user)} unseen few-shot, "
          f"{len(out[3].user)} unseen test")
    dialogs = t["dialog"][(~seen) & (split == 0)]
    info = {"fewshot_dialogs": dialogs, "shot_groups": dialogs, "train_groups": t["dialog"][seen & (split == 0)],
            "reference": reference}
    if synthetic:
        hard = t.get("hard_users", torch.zeros(0, dtype=torch.long)).tolist()
        info.update(population=population, hard_users={"seen": [i for i in hard if i < N],
                                                       "unseen": [i - N for i in hard if i >= N]})
    else:
        info["reward_model"] = reward_model_info(path)
        info.update(_user_ids(path.parent / "users.parquet", N, N_unseen))
    head = choose_reference(reference, t, None if synthetic else path, make_cmd)
    data = PreferenceData(*out, head=head, info=info).with_dtype(pairs_dtype)
    if choice:  # on the pairs' table: the embeddings in the dtype the pairs have
        data.info["choice"] = first_turns(t, data.seen_train.table, N, "synthetic data" if synthetic else path,
                                         make_cmd)
    return data


def _user_ids(path, N, N_unseen):
    """{"users": seen user ids, "unseen_users": unseen ones} from users.parquet (prepare.py), {} when absent."""
    if not path.is_file():
        return {}
    import pandas as pd
    users = pd.read_parquet(path).sort_values("user")
    if list(users["user"]) != list(range(N + N_unseen)):
        raise InputError(f"{path} does not list users 0..{N + N_unseen - 1} of the embeddings; re-run: "
                         f"python {HERE / 'prepare.py'}")
    ids = [str(u) for u in users["user_id"]]
    return {"users": ids[:N], "unseen_users": ids[N:]}
