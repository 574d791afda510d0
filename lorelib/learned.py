"""Using a learned model. Every train_basis.py writes what it learned for each (alpha, K) to one safetensors file
(save_lore_model): V [F, K], W [C, K] (seen users), W_unseen [C_u, K], and metadata (each value JSON-encoded)
with the users' ids, the reward model's name, F, the logit scale, the dataset and the few-shot settings.
PersonalizedReward scores texts with it, fits a new person's w from their comparisons, suggests which
comparisons to ask them, and exports a Hugging Face reward model of e^T V w (export.py).

Imports: config, files, model, selection, extract, export.
"""
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import InputError, note_written
from .export import export_reward_model
from .extract import check_conversations, embed_token_ids, load_reward_model, tokenize_conversations
from .files import jsonable, load_metadata, load_tensors, save_or_fallback, save_tensors
from .model import LOGIT_SCALE, PersonalizeBatch
from .selection import select_comparisons


class UnknownUserError(InputError, KeyError):
    """A user id that a learned model does not hold (an InputError: one line in a script; also a KeyError)."""
    __str__ = Exception.__str__  # the message as it is (KeyError's own str() would quote it)


MODEL_FORMAT = "lore-model-1"  # metadata["format"] of a learned-model file
_MODEL_REQUIRED = ("format", "model_name", "dataset", "n_features", "logit_scale", "users", "unseen_users")


def reward_model_info(path):
    """-> {"model_name", "max_length", "truncation_side"} of the reward model that embedded the file at `path`
    (the metadata extract_embeddings writes)."""
    meta = load_metadata(path)
    max_length = meta.get("max_length", "None")
    return {"model_name": meta.get("model_name"), "max_length": None if max_length == "None" else int(max_length),
            "truncation_side": meta.get("truncation_side", "left")}


def save_lore_model(path, V, W, W_unseen, *, model_name, dataset, users=None, unseen_users=None,
                    logit_scale=LOGIT_SCALE, metadata=None):
    """Write a learned model atomically: V [F, K], W [C, K] (seen users), W_unseen [C_u, K].

    model_name: the reward model whose embeddings V was fit on (None for synthetic embeddings).
    logit_scale: the fit's likelihood is sigmoid(d^T V w / logit_scale) (1 for the reward model's own head, K = 0);
    PersonalizedReward divides by it for calibrated rewards.
    users / unseen_users: the ids (str or int) of the rows of W / W_unseen (default 0..C-1, C..C+C_u-1).
    metadata: more {name: JSON-able value} (K, alpha, few-shot settings, ...). Every metadata value is
    stored JSON-encoded; load_lore_model decodes it.
    """
    V, W, W_unseen = (torch.as_tensor(t, dtype=torch.float32).cpu() for t in (V, W, W_unseen))
    if V.dim() != 2 or W.dim() != 2 or W_unseen.dim() != 2 or W.shape[1] != V.shape[1] \
            or W_unseen.shape[1] != V.shape[1]:
        raise InputError(f"expected V [F, K], W [C, K], W_unseen [C_u, K]; got {tuple(V.shape)}, {tuple(W.shape)}, "
                         f"{tuple(W_unseen.shape)}")
    users = list(range(len(W))) if users is None else list(users)
    unseen_users = list(range(len(W), len(W) + len(W_unseen))) if unseen_users is None else list(unseen_users)
    if len(users) != len(W) or len(unseen_users) != len(W_unseen):
        raise InputError(f"{len(users)} user ids for {len(W)} rows of W, {len(unseen_users)} for {len(W_unseen)} "
                         "rows of W_unseen")
    ids = [u.item() if isinstance(u, np.generic) else u for u in users + unseen_users]
    if not all(isinstance(u, (str, int)) and not isinstance(u, bool) for u in ids):
        raise InputError("user ids must be str or int")
    if len(set(map(str, ids))) != len(ids):
        raise InputError("user ids must be unique (seen and unseen users together)")
    meta = dict(metadata or {})
    meta.update(format=MODEL_FORMAT, model_name=None if model_name is None else str(model_name), dataset=str(dataset),
                n_features=V.shape[0], logit_scale=float(logit_scale), users=ids[:len(users)],
                unseen_users=ids[len(users):])
    return save_tensors(path, {"V": V, "W": W, "W_unseen": W_unseen},
                        metadata={k: json.dumps(jsonable(v)) for k, v in meta.items()})


def load_lore_model(path):
    """-> dict with the tensors V [F, K], W [C, K], W_unseen [C_u, K], the decoded metadata (model_name,
    dataset, n_features, logit_scale, users, unseen_users, ...) and "path". Checks shapes and ids."""
    path = Path(path)
    tensors = load_tensors(path, ("V", "W", "W_unseen"))
    try:
        meta = {k: json.loads(v) for k, v in load_metadata(path).items()}
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not a learned-model file (its metadata is not JSON: {e})") from None
    missing = [k for k in _MODEL_REQUIRED if k not in meta]
    if missing or meta.get("format") != MODEL_FORMAT:
        raise InputError(f"{path} is not a learned-model file ({MODEL_FORMAT}): its metadata lacks "
                         f"{missing or 'format'}; train_basis.py writes these under results/models/")
    V, W, W_u = tensors["V"], tensors["W"], tensors["W_unseen"]
    if V.shape[0] != meta["n_features"] or W.shape != (len(meta["users"]), V.shape[1]) \
            or W_u.shape != (len(meta["unseen_users"]), V.shape[1]):
        raise InputError(f"{path}: V {tuple(V.shape)}, W {tuple(W.shape)}, W_unseen {tuple(W_u.shape)} do not match "
                         f"F = {meta['n_features']}, {len(meta['users'])} users, {len(meta['unseen_users'])} unseen")
    return {**meta, **tensors, "path": str(path)}


def save_models(out_dir, models, data, *, dataset, fewshot_iterations, fewshot_learning_rate, record=None):
    """Write every model of a fit ({(alpha, K): {"V", "W", "W_unseen"}}: RankResult.models, or run(...,
    return_models=True)'s) trained on `data` (a PreferenceData; info "reward_model", "users", "unseen_users" when
    known) to out_dir/K{K}_alpha{alpha:g}.safetensors (save_lore_model; save_or_fallback when that folder cannot
    be written) -> {"K=.. alpha=..": path written}. record: the script's RunRecord (the files written)."""
    rm = data.info.get("reward_model") or {"model_name": None}
    fewshot_pairs = int(data.unseen_fewshot.counts().float().median().item())  # an unseen user's, typically
    paths = {}
    for (alpha, K), m in models.items():
        metadata = {"K": K, "alpha": alpha, "kept": m["V"].shape[1], "reference": data.info.get("reference", "head"),
                    "fewshot_iterations": fewshot_iterations,
                    "fewshot_learning_rate": fewshot_learning_rate, "fewshot_pairs": fewshot_pairs,
                    **{k: v for k, v in rm.items() if k != "model_name"}}
        path = save_or_fallback(Path(out_dir) / f"K{K}_alpha{alpha:g}.safetensors", lambda p: save_lore_model(
            p, m["V"], m["W"], m["W_unseen"], model_name=rm["model_name"], dataset=dataset,
            users=data.info.get("users"), unseen_users=data.info.get("unseen_users"), metadata=metadata,
            logit_scale=1.0 if K == 0 else LOGIT_SCALE))  # K = 0: the reward model's own head, its logits log-odds
        paths[f"K={K} alpha={alpha:g}"] = None if path is None else str(path)
        note_written(record, path)
    print(f"wrote the learned models (V, W, W_unseen, user ids) to {Path(out_dir)}/")
    return paths


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
        raise InputError(f"expected a string or a non-empty list of {{'role': str, 'content': str}} messages, "
                         f"got {x!r:.100}")
    return messages(prompt, "user") + messages(response, "assistant")


def read_comparisons(path, sides=("chosen", "rejected")):
    """Read a jsonl of {"prompt", "chosen", "rejected"} -> (chosen, rejected, bad).

    chosen / rejected: the conversations (message lists) of the good lines; bad: (line number, reason) of
    every other non-blank line. A prompt is a string or a list of chat messages; a reply is a string or
    a list of messages. sides: the keys of the two replies, e.g. ("a", "b") for unanswered candidates."""
    keys = ("prompt",) + tuple(sides)
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
                bad.append((n, f"expected an object with {', '.join(keys)}, got {type(row).__name__}"))
                continue
            missing = [k for k in keys if k not in row]
            if missing:
                bad.append((n, f"missing {', '.join(missing)}"))
                continue
            try:
                c, r = (as_conversation(row["prompt"], row[k]) for k in sides)
            except InputError as e:
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
                 logit_scale=LOGIT_SCALE, fewshot_iterations=500, fewshot_learning_rate=0.1, fewshot_pairs=1,
                 max_length=4096, truncation_side="left", max_tokens_per_batch=16384, max_batch_size=64,
                 device=None, dtype=None, path=None):
        self.V = torch.as_tensor(V, dtype=torch.float32).cpu()
        if self.V.dim() != 2:
            raise InputError(f"V must be [F, K], got shape {tuple(self.V.shape)}")
        K = self.V.shape[1]
        self.W = torch.zeros(0, K) if W is None else torch.as_tensor(W, dtype=torch.float32).cpu()
        self.W_unseen = torch.zeros(0, K) if W_unseen is None else torch.as_tensor(W_unseen, dtype=torch.float32).cpu()
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
        """Load a learned-model file (save_lore_model). model_name: a hub id or local path overriding the
        reward model named in the file (e.g. a local copy). kwargs: device, dtype, batching, few-shot settings."""
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
            w = torch.as_tensor(user if torch.is_tensor(user) else np.asarray(user, dtype=np.float32),
                                dtype=torch.float32).cpu().reshape(-1)
            if w.numel() != self.K or not torch.isfinite(w).all():
                raise InputError(f"a weight vector must have K = {self.K} finite entries, got {tuple(w.shape)}")
            return w
        for ids, W in ((self.users, self.W), (self.unseen_users, self.W_unseen)):
            for i, u in enumerate(ids):
                if u == user or str(u) == str(user):
                    return W[i].clone()
        def some(ids):
            return ", ".join(repr(u) for u in ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
        raise UnknownUserError(f"user {user!r} is not a seen or unseen user of {self.path or 'this model'}: give a "
                               f"seen user ({some(self.users) or 'none'}), an unseen user "
                               f"({some(self.unseen_users) or 'none'}), a weight vector of K = {self.K} numbers, "
                               "or 'uniform'")

    def head(self, user, calibrated=True):
        """-> [F] the reward head of `user`: reward = e(x, y)^T head. calibrated (default): V w / logit_scale, so
        that rewards are Bradley-Terry log-odds, sigmoid(r_chosen - r_rejected) = the fit's probability that the
        user prefers chosen, the convention of the base reward model's own head; calibrated=False: the raw V w the
        fit works with (logit_scale = 100 times larger)."""
        head = self.V @ self.weights(user)
        return head / self.logit_scale if calibrated else head

    def load_reward_model(self):
        """-> (tokenizer, model), loaded once (load_reward_model)."""
        if self.model is None:
            if self.model_name is None:
                raise InputError(f"{self.path or 'this model'} was fit on synthetic embeddings and names no reward "
                                 "model: give one with model_name=... (its hidden size must be F)")
            self.tokenizer, self.model = load_reward_model(self.model_name, self.device, self.dtype)
            hidden = self.model.config.get_text_config().hidden_size
            if hidden != self.F:
                raise InputError(f"{self.model_name} has hidden size {hidden}, but V has F = {self.F} rows: load the "
                                 "reward model this basis was trained with (model_name=...)")
        return self.tokenizer, self.model

    def embed(self, conversations, progress=None):
        """conversations: list of M message lists -> [M, F] float32 embeddings e(x, y), in input order
        (tokenize_conversations + embed_token_ids with the batching of prepare.py)."""
        conversations = check_conversations(conversations)
        tokenizer, model = self.load_reward_model()
        token_ids, n_truncated = tokenize_conversations(tokenizer, conversations, self.max_length,
                                                        self.truncation_side)
        if n_truncated:
            print(f"embed: {n_truncated}/{len(token_ids)} conversations truncated to {self.max_length} tokens")
        disable = None if progress is None else not progress  # None: a bar on terminals only
        with tqdm(total=len(token_ids), unit="conv", desc="embedding", disable=disable) as pbar:
            return embed_token_ids(model, token_ids, tokenizer.pad_token_id, self.max_tokens_per_batch,
                                   self.max_batch_size, pbar=pbar)

    def reward(self, conversations, user, calibrated=True):
        """-> [M] rewards of M conversations (message lists) for `user` (id, weights [K] or "uniform"): calibrated
        log-odds e(x, y)^T V w / logit_scale (default; sigmoid(r_c - r_r) is the model's preference probability), or
        calibrated=False the raw e(x, y)^T V w. Equals the logit of the model written by .export(out_dir, user,
        calibrated)."""
        return self.embed(conversations) @ self.head(user, calibrated)

    def fit_weights(self, diffs, num_iterations=None, learning_rate=None):
        """diffs [m, F] (chosen minus rejected embeddings) -> [K] simplex weights fit on the frozen V
        (PersonalizeBatch, the few-shot step of train_basis.py, with its settings). K <= 1: w = [1].
        Fewer comparisons than an unseen user had in the few-shot protocol print a notice."""
        diffs = torch.as_tensor(diffs, dtype=torch.float32).cpu()
        if diffs.dim() != 2 or diffs.shape[1] != self.F or len(diffs) == 0:
            raise InputError(f"diffs must be [m >= 1, F = {self.F}], got {tuple(diffs.shape)}")
        if len(diffs) < self.fewshot_pairs:
            print(f"personalize: {len(diffs)} comparison(s), fewer than the {self.fewshot_pairs} of an unseen user "
                  f"in the {self.dataset} few-shot protocol; w may follow these few closely")
        if self.K <= 1:
            return torch.ones(self.K)
        model = PersonalizeBatch(1, self.F, self.K, num_iterations or self.fewshot_iterations,
                                 learning_rate or self.fewshot_learning_rate)
        return model.train([diffs], self.V, device="cpu")[0].cpu()

    def personalize(self, chosen_conversations, rejected_conversations, num_iterations=None, learning_rate=None):
        """A new person's m >= 1 comparisons (chosen[i] preferred to rejected[i], message lists) -> their
        weights w [K] on the frozen basis. Fewer comparisons than the few-shot protocol's count print a notice."""
        chosen = check_conversations(chosen_conversations)
        rejected = check_conversations(rejected_conversations)
        if len(chosen) != len(rejected):
            raise InputError(f"{len(chosen)} chosen but {len(rejected)} rejected conversations")
        m = len(chosen)
        E = self.embed(chosen + rejected)
        return self.fit_weights(E[:m] - E[m:], num_iterations, learning_rate)

    def suggest(self, candidates, k=1, answered=None, rule="active", stop_below=None, return_information=False):
        """Which of a person's candidate comparisons to ask next -> up to k indices into `candidates`, best first
        (select_comparisons on the candidates projected onto V: "active", the largest expected information about
        the person's weights, "uncertainty", the answer predicted nearest 50/50, or "variance", the largest
        predictive variance).
        candidates: a list of n (a, b) pairs of conversations (message lists), or their differences e(a) - e(b)
        [n, F]. answered: what the person has answered so far: {candidate index: 1 if they preferred a, -1 if b}
        (never suggested again), or the differences [m, F] (chosen minus rejected) of other comparisons, or None.
        stop_below (nats): the stopping rule: fewer than k (maybe none) when the best remaining expected information
        falls below it (stop asking). return_information: (indices, info) as select_comparisons gives them."""
        if not (torch.is_tensor(candidates) or isinstance(candidates, np.ndarray)):
            pairs = list(candidates)
            if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
                raise InputError("candidates must be a non-empty list of (a, b) pairs of conversations, or [n, F]")
            E = self.embed([p[0] for p in pairs] + [p[1] for p in pairs])
            candidates = E[:len(pairs)] - E[len(pairs):]

        def project(D, name):
            D = torch.as_tensor(D, dtype=torch.float64).cpu()
            if D.dim() != 2 or D.shape[1] != self.F:
                raise InputError(f"{name} must be differences [n, F = {self.F}], got {tuple(D.shape)}")
            return (D @ self.V.double()).numpy()
        X = project(candidates, "candidates")
        if isinstance(answered, dict):
            exclude, y = [int(i) for i in answered], np.array(list(answered.values()), dtype=np.float64)
            if any(not 0 <= i < len(X) for i in exclude) or not np.isin(y, (-1, 1)).all():
                raise InputError(f"answered must map candidate indices in [0, {len(X)}) to 1 (a preferred) or -1")
            return select_comparisons(X, k, rule=rule, known=X[exclude] * y[:, None], exclude=exclude,
                                      stop_below=stop_below, return_information=return_information)
        return select_comparisons(X, k, rule=rule, known=None if answered is None else project(answered, "answered"),
                                  stop_below=stop_below, return_information=return_information)

    def export(self, out_dir, user, calibrated=True):
        """Write a Hugging Face AutoModelForSequenceClassification checkpoint of `user`'s reward to out_dir
        -> Path. score.weight is head(user, calibrated)^T [1, F]: by default the logit scale is folded into the head,
        so its logits are calibrated log-odds like the base reward model's (sigmoid(r_c - r_r) = P(c preferred));
        calibrated=False keeps the raw e^T V w (100 times larger). Every other tensor is the reward model's own,
        linked (see export_reward_model); the head file's metadata says which logits it gives."""
        if self.model_name is None:
            self.load_reward_model()  # raises the error that names the missing model_name
        w = self.weights(user)
        info = {"lore_model": self.path, "dataset": self.dataset,
                "user": user if isinstance(user, (str, int)) else "weights", "w": w.tolist(),
                "logits": "calibrated" if calibrated else "raw", "logit_scale": self.logit_scale,
                "logits_are": (f"e^T V w / {self.logit_scale:g}: Bradley-Terry log-odds, sigmoid(r_chosen - "
                               "r_rejected) = P(chosen preferred)") if calibrated else
                              f"e^T V w: {self.logit_scale:g} times the Bradley-Terry log-odds"}
        return export_reward_model(self.model_name, self.head(user, calibrated).reshape(1, -1), out_dir, info)


