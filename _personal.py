"""Use a learned LoRe model: score texts for a user, personalize a new user, export a reward model.

A learned model is one safetensors file per (alpha, K) with `V` [F, K], `W` [C, K] (seen users) and
`W_unseen` [C_u, K], plus metadata (every value JSON-encoded): the users' ids, the reward model's name,
F, the logit scale, the dataset and the few-shot settings. PersonalizedReward wraps it with the reward
model: r_w(x, y) = e(x, y)^T V w.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

import utils

MODEL_FORMAT = "lore-model-1"  # metadata["format"] of a learned-model file
_MODEL_TENSORS = ("V", "W", "W_unseen")
_MODEL_REQUIRED = ("format", "model_name", "dataset", "n_features", "logit_scale", "users", "unseen_users")


def save_lore_model(path, V, W, W_unseen, *, model_name, dataset, users=None, unseen_users=None,
                    logit_scale=utils.LOGIT_SCALE, metadata=None):
    """Write a learned model atomically: V [F, K], W [C, K] (seen users), W_unseen [C_u, K].

    users / unseen_users: the ids (str or int) of the rows of W / W_unseen (default 0..C-1, C..C+C_u-1).
    metadata: more {name: JSON-able value} (K, alpha, few-shot settings, ...). Every metadata value is stored
    JSON-encoded; load_lore_model decodes it.
    """
    V, W, W_unseen = (torch.as_tensor(t, dtype=torch.float32).cpu() for t in (V, W, W_unseen))
    if V.dim() != 2 or W.dim() != 2 or W_unseen.dim() != 2 or W.shape[1] != V.shape[1] \
            or W_unseen.shape[1] != V.shape[1]:
        raise ValueError(f"expected V [F, K], W [C, K], W_unseen [C_u, K]; got {tuple(V.shape)}, {tuple(W.shape)}, "
                         f"{tuple(W_unseen.shape)}")
    users = list(range(len(W))) if users is None else list(users)
    unseen_users = list(range(len(W), len(W) + len(W_unseen))) if unseen_users is None else list(unseen_users)
    if len(users) != len(W) or len(unseen_users) != len(W_unseen):
        raise ValueError(f"{len(users)} user ids for {len(W)} rows of W, {len(unseen_users)} for {len(W_unseen)} "
                         "rows of W_unseen")
    ids = [u.item() if isinstance(u, np.generic) else u for u in users + unseen_users]
    if not all(isinstance(u, (str, int)) and not isinstance(u, bool) for u in ids):
        raise ValueError("user ids must be str or int")
    if len(set(map(str, ids))) != len(ids):
        raise ValueError("user ids must be unique (seen and unseen users together)")
    meta = dict(metadata or {})
    meta.update(format=MODEL_FORMAT, model_name=str(model_name), dataset=str(dataset), n_features=V.shape[0],
                logit_scale=float(logit_scale), users=ids[:len(users)], unseen_users=ids[len(users):])
    return utils.save_tensors(path, {"V": V, "W": W, "W_unseen": W_unseen},
                              metadata={k: json.dumps(utils._jsonable(v)) for k, v in meta.items()})


def load_lore_model(path):
    """-> dict with the tensors V [F, K], W [C, K], W_unseen [C_u, K] and the decoded metadata
    (model_name, dataset, n_features, logit_scale, users, unseen_users, ...). Checks shapes and ids."""
    path = Path(path)
    tensors = utils.load_tensors(path, _MODEL_TENSORS)
    raw = utils.load_metadata(path)
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a learned-model file (metadata is not JSON: {e})") from None
    missing = [k for k in _MODEL_REQUIRED if k not in meta]
    if missing or meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a learned-model file ({MODEL_FORMAT}): metadata lacks {missing or 'format'}; "
                         "train_basis.py writes these under results/models/")
    V, W, W_u = tensors["V"], tensors["W"], tensors["W_unseen"]
    if V.shape[0] != meta["n_features"] or W.shape != (len(meta["users"]), V.shape[1]) \
            or W_u.shape != (len(meta["unseen_users"]), V.shape[1]):
        raise ValueError(f"{path}: V {tuple(V.shape)}, W {tuple(W.shape)}, W_unseen {tuple(W_u.shape)} do not match "
                         f"F = {meta['n_features']}, {len(meta['users'])} users, {len(meta['unseen_users'])} unseen")
    return {**meta, **tensors, "path": str(path)}


def as_conversation(prompt, response):
    """(prompt, response) -> a message list. prompt: a string (one user turn) or a list of {'role', 'content'}
    messages; response: a string (the assistant's reply) or a list of messages appended to the prompt."""
    def messages(x, role):
        if isinstance(x, str):
            return [{"role": role, "content": x}]
        if isinstance(x, (list, tuple)) and x and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in x):
            return [{"role": m["role"], "content": m["content"]} for m in x]
        raise ValueError(f"expected a string or a non-empty list of {{'role': str, 'content': str}} messages, "
                         f"got {x!r:.100}")
    return messages(prompt, "user") + messages(response, "assistant")


def read_comparisons(path):
    """Read a jsonl of {"prompt", "chosen", "rejected"} -> (chosen, rejected, bad).

    chosen / rejected: lists of conversations (message lists) of the good lines; bad: list of (line number,
    reason) of the lines that are not such an object (blank lines are skipped). A prompt is a string or a list
    of chat messages; a reply is a string or a list of messages."""
    chosen, rejected, bad = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append((n, f"not valid JSON ({e.msg})"))
                continue
            if not isinstance(row, dict):
                bad.append((n, f"expected an object with prompt, chosen, rejected, got {type(row).__name__}"))
                continue
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
            if missing:
                bad.append((n, f"missing {', '.join(missing)}"))
                continue
            try:
                c, r = as_conversation(row["prompt"], row["chosen"]), as_conversation(row["prompt"], row["rejected"])
            except ValueError as e:
                bad.append((n, str(e)))
                continue
            chosen.append(c)
            rejected.append(r)
    return chosen, rejected, bad


class PersonalizedReward:
    """A learned LoRe model and its reward model: the reward of weights w [K] is e(x, y)^T V w.

    V [F, K] shared basis, W [C, K] seen users' weights, W_unseen [C_u, K] unseen users' few-shot weights,
    users / unseen_users their ids. The reward model (`model_name`, a hub id or a local path) loads on the
    first .embed / .reward / .personalize; embeddings go through the extractor of prepare.py.
    A user is a seen or unseen user's id, a weight vector [K], or "uniform" (w = 1/K).
    """

    def __init__(self, V, W=None, W_unseen=None, users=None, unseen_users=None, *, model_name, dataset=None,
                 logit_scale=utils.LOGIT_SCALE, fewshot_iterations=500, fewshot_learning_rate=0.1, fewshot_pairs=1,
                 max_length=4096, truncation_side="left", max_tokens_per_batch=16384, max_batch_size=64,
                 device=None, dtype=None, path=None):
        self.V = torch.as_tensor(V, dtype=torch.float32).cpu()
        if self.V.dim() != 2:
            raise ValueError(f"V must be [F, K], got shape {tuple(self.V.shape)}")
        K = self.V.shape[1]
        self.W = torch.zeros(0, K) if W is None else torch.as_tensor(W, dtype=torch.float32).cpu()
        self.W_unseen = torch.zeros(0, K) if W_unseen is None else torch.as_tensor(W_unseen, dtype=torch.float32)
        self.users = list(range(len(self.W))) if users is None else list(users)
        self.unseen_users = [] if unseen_users is None else list(unseen_users)
        self.model_name, self.dataset, self.logit_scale, self.path = model_name, dataset, float(logit_scale), path
        self.fewshot_iterations, self.fewshot_learning_rate = int(fewshot_iterations), float(fewshot_learning_rate)
        self.fewshot_pairs = int(fewshot_pairs)
        self.max_length, self.truncation_side = max_length, truncation_side
        self.max_tokens_per_batch, self.max_batch_size = max_tokens_per_batch, max_batch_size
        self.device, self.dtype = device, dtype
        self.tokenizer = self.model = None

    @classmethod
    def load(cls, model_file, model_name=None, **kwargs):
        """Load a learned-model file (save_lore_model). model_name: a hub id or local path overriding the reward
        model named in the file (e.g. a local copy). kwargs: device, dtype, batching and few-shot overrides."""
        m = load_lore_model(model_file)
        settings = {k: m[k] for k in ("fewshot_iterations", "fewshot_learning_rate", "fewshot_pairs", "max_length",
                                      "truncation_side") if k in m}
        settings.update(kwargs)
        return cls(m["V"], m["W"], m["W_unseen"], m["users"], m["unseen_users"],
                   model_name=model_name or m["model_name"], dataset=m["dataset"], logit_scale=m["logit_scale"],
                   path=m["path"], **settings)

    @property
    def K(self):
        return self.V.shape[1]

    @property
    def F(self):
        return self.V.shape[0]

    def __repr__(self):
        return (f"PersonalizedReward(F={self.F}, K={self.K}, {len(self.users)} seen + {len(self.unseen_users)} unseen "
                f"users, dataset={self.dataset!r}, model_name={self.model_name!r})")

    def weights(self, user):
        """-> [K] float32 weights of `user`: a seen or unseen user's id, a weight vector [K], or "uniform"."""
        if isinstance(user, str) and user == "uniform":
            return torch.full((self.K,), 1.0 / self.K)
        if isinstance(user, (torch.Tensor, np.ndarray, list, tuple)):
            w = torch.as_tensor(np.asarray(user, dtype=np.float32) if not torch.is_tensor(user) else user,
                                dtype=torch.float32).cpu().reshape(-1)
            if w.numel() != self.K or not torch.isfinite(w).all():
                raise ValueError(f"a weight vector must have K = {self.K} finite entries, got {tuple(w.shape)}")
            return w
        for ids, W in ((self.users, self.W), (self.unseen_users, self.W_unseen)):
            for i, u in enumerate(ids):
                if u == user or str(u) == str(user):
                    return W[i].clone()
        examples = ", ".join(repr(u) for u in self.users[:3])
        raise KeyError(f"user {user!r} is not a seen or unseen user of {self.path or 'this model'} "
                       f"({len(self.users)} seen users, e.g. {examples}); give a user id, a weight vector [{self.K}] "
                       "or 'uniform'")

    def head(self, user):
        """-> [F] the reward head V w of `user` (reward = e(x, y)^T head)."""
        return self.V @ self.weights(user)

    def load_reward_model(self):
        """-> (tokenizer, model), loaded once (utils.load_reward_model)."""
        if self.model is None:
            self.tokenizer, self.model = utils.load_reward_model(self.model_name, self.device, self.dtype)
            hidden = self.model.config.get_text_config().hidden_size
            if hidden != self.F:
                raise ValueError(f"{self.model_name} has hidden size {hidden}, but V has F = {self.F} rows: load the "
                                 "reward model this basis was trained with (model_name=...)")
        return self.tokenizer, self.model

    def embed(self, conversations, progress=None):
        """conversations: list of M message lists -> [M, F] float32 embeddings e(x, y), in input order
        (tokenize_conversations + embed_token_ids with the batching of prepare.py)."""
        conversations = utils._check_conversations(conversations)
        tokenizer, model = self.load_reward_model()
        token_ids, n_truncated = utils.tokenize_conversations(tokenizer, conversations, self.max_length,
                                                              self.truncation_side)
        if n_truncated:
            print(f"embed: {n_truncated}/{len(token_ids)} conversations truncated to {self.max_length} tokens")
        disable = None if progress is None else not progress  # None: a bar on terminals only
        with tqdm(total=len(token_ids), unit="conv", desc="embedding", disable=disable) as pbar:
            return utils.embed_token_ids(model, token_ids, tokenizer.pad_token_id, self.max_tokens_per_batch,
                                         self.max_batch_size, pbar=pbar)

    def reward(self, conversations, user):
        """-> [M] rewards e(x, y)^T V w of M conversations (message lists) for `user` (id, weights [K] or
        "uniform"). Equals the logit of the model written by .export(out_dir, user)."""
        return self.embed(conversations) @ self.head(user)

    def fit_weights(self, diffs, num_iterations=None, learning_rate=None):
        """diffs [m, F] (chosen minus rejected embeddings) -> [K] simplex weights fit on the frozen V
        (PersonalizeBatch, the few-shot step of train_basis.py and its settings). K <= 1: w = [1]."""
        diffs = torch.as_tensor(diffs, dtype=torch.float32).cpu()
        if diffs.dim() != 2 or diffs.shape[1] != self.F or len(diffs) == 0:
            raise ValueError(f"diffs must be [m >= 1, F = {self.F}], got {tuple(diffs.shape)}")
        if self.K <= 1:
            return torch.ones(self.K)
        model = utils.PersonalizeBatch(1, self.F, self.K, num_iterations or self.fewshot_iterations,
                                       learning_rate or self.fewshot_learning_rate)
        return model.train([diffs], self.V, device="cpu")[0].cpu()

    def personalize(self, chosen_conversations, rejected_conversations, num_iterations=None, learning_rate=None):
        """A new person's m >= 1 comparisons (chosen[i] preferred to rejected[i], message lists) -> their
        weights w [K] on the frozen basis. Fewer comparisons than the few-shot protocol's count print a notice."""
        chosen = utils._check_conversations(chosen_conversations)
        rejected = utils._check_conversations(rejected_conversations)
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected conversations")
        m = len(chosen)
        if m < self.fewshot_pairs:
            print(f"personalize: {m} comparison(s), fewer than the {self.fewshot_pairs} of an unseen user in the "
                  f"{self.dataset} few-shot protocol; w may follow these few closely")
        E = self.embed(chosen + rejected)
        return self.fit_weights(E[:m] - E[m:], num_iterations, learning_rate)

    def export(self, out_dir, user):
        """Write a Hugging Face AutoModelForSequenceClassification checkpoint of `user`'s reward to out_dir -> Path.
        score.weight is (V w)^T [1, F]; every other tensor is the reward model's own, linked
        (see export_reward_model)."""
        w = self.weights(user)
        info = {"lore_model": self.path, "dataset": self.dataset,
                "user": user if isinstance(user, (str, int)) else "weights", "w": w.tolist()}
        return export_reward_model(self.model_name, (self.V @ w).reshape(1, -1), out_dir, info)


# ---------------------------------------------------------------------------------------------
# Export: a sharded checkpoint whose index points at the base model's own files

HEAD_FILE = "personalized-head.safetensors"  # sorts after every base-* link: loaders that read all files win with it
BASE_PREFIX = "base-"  # linked base files; never a name save_pretrained writes, so saving into out_dir cannot clobber
INDEX_FILE = "model.safetensors.index.json"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                "chat_template.jinja", "chat_template.json")
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def _base_file(model_name, filename):
    """Path of `filename` in a local model folder or the hub cache (downloaded if needed), or None."""
    from transformers.utils import cached_file
    try:
        return cached_file(model_name, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None


def base_weight_files(model_name):
    """-> (weight_map {tensor: file name}, files {file name: resolved path}) of a safetensors reward model:
    a single model.safetensors or a sharded model.safetensors.index.json (the order transformers tries them)."""
    single = _base_file(model_name, "model.safetensors")
    if single is not None:
        with safe_open(single, "pt") as f:
            return {k: "model.safetensors" for k in f.keys()}, {"model.safetensors": single}
    index = _base_file(model_name, INDEX_FILE)
    if index is None:
        raise FileNotFoundError(f"{model_name} has neither model.safetensors nor {INDEX_FILE}: export needs a "
                                "reward model saved as safetensors (save_pretrained writes them)")
    with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    files = {}
    for name in sorted(set(weight_map.values())):
        files[name] = _base_file(model_name, name)
        if files[name] is None:
            raise FileNotFoundError(f"{model_name}: shard {name} listed in {INDEX_FILE} is missing")
    return weight_map, files


def _link(src, dst):
    """Hard link dst -> the real file behind src (a hub-cache snapshot entry is a symlink to a blob); a symlink to
    its absolute path where a hard link is impossible (another filesystem, no permission). -> 'hardlink'/'symlink'."""
    real = os.path.realpath(src)
    try:
        os.link(real, dst)
        return "hardlink"
    except OSError:
        os.symlink(real, dst)
        return "symlink"


def export_reward_model(model_name, score_weight, out_dir, info=None):
    """Write an AutoModelForSequenceClassification checkpoint of `model_name` with a new score.weight [1, F].

    out_dir gets: base-<file> links to each of the base model's safetensors files (hard links, or symlinks across
    filesystems; nothing is copied), HEAD_FILE with the new score.weight (in the base head's dtype), an index
    model.safetensors.index.json mapping score.weight to HEAD_FILE and every other tensor to its base file, and
    copies of the config and tokenizer files. out_dir is written beside itself and renamed into place; an
    earlier export there is replaced, any other non-empty folder is refused. -> Path(out_dir)."""
    out_dir = Path(out_dir)
    weight_map, files = base_weight_files(model_name)
    score_file = weight_map.get("score.weight")
    if score_file is None or "score.bias" in weight_map:
        raise ValueError(f"{model_name} has no bias-free `score` head (score.weight); export needs a reward model "
                         "loadable with AutoModelForSequenceClassification")
    with safe_open(files[score_file], "pt") as f:
        base_score = f.get_slice("score.weight")
        shape, dtype = base_score.get_shape(), base_score.get_dtype()
    score_weight = torch.as_tensor(score_weight).detach().float().cpu().reshape(1, -1)
    if list(score_weight.shape) != list(shape):
        raise ValueError(f"the new head has shape {tuple(score_weight.shape)}, {model_name}'s score.weight {shape}")
    torch_dtype = {v: k for k, v in utils._ST_DTYPES.items()}[dtype]
    config = _base_file(model_name, "config.json")
    if config is None:
        raise FileNotFoundError(f"{model_name} has no config.json")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / HEAD_FILE).exists():
        raise FileExistsError(f"{out_dir} exists and is not an earlier export: give an empty or new folder")
    for path in files.values():
        if out_dir.exists() and Path(path).resolve().parent == out_dir.resolve():
            raise ValueError(f"out_dir {out_dir} is the base model's own folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        links, sizes = {}, {}
        for name, path in files.items():
            links[name] = _link(path, tmp / (BASE_PREFIX + name))
            with safe_open(path, "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    sizes[k] = int(np.prod(sl.get_shape(), dtype=np.int64)) * _ST_BYTES[sl.get_dtype()]
        index = {k: BASE_PREFIX + v for k, v in weight_map.items() if k != "score.weight"}
        index["score.weight"] = HEAD_FILE
        meta = {"format": "pt", "base_model": str(model_name)}
        meta.update({k: json.dumps(utils._jsonable(v)) for k, v in (info or {}).items()})
        utils.save_tensors(tmp / HEAD_FILE, {"score.weight": score_weight.to(torch_dtype)}, metadata=meta)
        utils.save_json(tmp / INDEX_FILE, {"metadata": {"total_size": sum(sizes[k] for k in index)},
                                           "weight_map": dict(sorted(index.items()))})
        for name in COPIED_FILES:
            src = config if name == "config.json" else _base_file(model_name, name)
            if src is not None:
                shutil.copyfile(src, tmp / name)
        os.chmod(tmp, 0o777 & ~_umask())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)  # removes the old links only, never the base files they point to
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    kinds = sorted(set(links.values()))
    print(f"export: wrote {out_dir} (score.weight [1, {shape[1]}] in {HEAD_FILE}; "
          f"{len(links)} base file(s) of {model_name} {' and '.join(kinds)}ed, not copied)")
    return out_dir


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask
