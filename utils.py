"""LoRe: personalized low-rank reward modeling (Bose et al. 2025, arXiv 2504.14439).

One shared module for every dataset folder. A user's reward is r_i(x, y) = e(x, y)^T V w_i,
with e(x, y) [F] a frozen reward-model embedding, V [F, K] K shared basis rewards and w_i [K]
on the simplex. A comparison is stored as d = e(x, chosen) - e(x, rejected) and trained
with the Bradley-Terry likelihood sigmoid(d^T V w_i / 100).

Sections:
  1. Device, seeds and script configuration
  2. Files: atomic writes, checked loads, results JSON and plots
  3. Preference pairs of many users (Pairs)
  4. Population simulation (PersonalLLM protocol)
  5. Models: LoRe, LoRe_regularized, PersonalizeBatch
  6. Evaluation
  7. Pipelines: run, run_regularized, run_few_shot_vary_shots
  8. Synthetic data
  9. Dataset loading
 10. Embedding extraction
"""

import ast
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F_nn
from tqdm.auto import tqdm

LOGIT_SCALE = 100.0  # P(chosen > rejected) = sigmoid(d^T V w / LOGIT_SCALE), as in the published code


# ----------------------------------------------------------------------------------------
# 1. Device, seeds and script configuration
# ----------------------------------------------------------------------------------------

def get_device(device=None):
    """The torch.device to compute on: `device` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_seed(seed):
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_CONFIG_TYPES = (bool, int, float, str, list, tuple, dict, type(None))


def configure(config, argv=None):
    """Apply `key=value` command-line overrides to a script's module-level config, in place.

    config: the script's globals(); every public name bound to a bool/int/float/str/list/
    tuple/dict/None is a config key. Values are parsed as Python literals (a bare word is a
    string) and must keep the type of the default (an int is accepted for a float; anything
    for a None default). Returns {key: value} of the config, for the results JSON.
    """
    keys = {k: v for k, v in config.items()
            if not k.startswith("_") and isinstance(v, _CONFIG_TYPES)}
    for arg in sys.argv[1:] if argv is None else argv:
        if "=" not in arg:
            raise SystemExit(f"error: expected key=value, got {arg!r}. Config keys: {', '.join(keys)}")
        key, text = arg.split("=", 1)
        if key not in keys:
            raise SystemExit(f"error: unknown config key {key!r}. Config keys: {', '.join(keys)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word such as out_dir=/tmp/x
        default = keys[key]
        ok = (default is None
              or (isinstance(default, bool) and isinstance(value, bool))
              or (isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool))
              or (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)))
              or (not isinstance(default, (bool, float, list, tuple)) and type(value) is type(default)))
        if not ok:
            raise SystemExit(f"error: {key}={text!r} must be of type {type(default).__name__} "
                             f"(default {default!r})")
        if isinstance(default, float) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, list) and isinstance(value, tuple):
            value = list(value)
        print(f"config: {key} = {value!r}")
        config[key] = keys[key] = value
    return dict(keys)


# ----------------------------------------------------------------------------------------
# 2. Files: atomic writes, checked loads, results JSON and plots
# ----------------------------------------------------------------------------------------

def _atomic_target(path):
    """A temp file name in the directory of `path` (so os.replace is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return path, tmp


def atomic_write_bytes(path, data):
    """Write bytes to `path` through a temp file and a rename: never a half-written file."""
    path, tmp = _atomic_target(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _jsonable(obj):
    """NumPy / torch / Path values -> plain Python; NaN and inf -> None (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_json(path, obj):
    """Write `obj` as indented JSON atomically (NumPy/torch values converted, NaN -> null)."""
    return atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n").encode())


def save_tensors(path, tensors, metadata=None):
    """Save a dict of tensors as safetensors atomically (temp file, then rename)."""
    from safetensors.torch import save_file
    path, tmp = _atomic_target(path)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_tensors(path, keys=(), make_cmd=None):
    """Load a safetensors file -> dict of tensors, checking that it exists and holds `keys`.

    make_cmd: the command that creates the file, named in the error when it is missing.
    """
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        hint = f" Create it with:\n    {make_cmd}" if make_cmd else ""
        raise FileNotFoundError(f"{path} not found.{hint}")
    tensors = load_file(str(path))
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{path} lacks tensor(s) {missing}; it holds {sorted(tensors)}. "
                         + (f"Recreate it with: {make_cmd}" if make_cmd else ""))
    for k, v in tensors.items():
        if v.is_floating_point() and k != "scores" and not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {k!r} contains NaN or inf values")
    return tensors


def load_metadata(path):
    """The `__metadata__` dict of a safetensors file (str -> str)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def script_out_dir(script_file, out_dir=None):
    """Resolve a script's output folder: `out_dir` if given, else `results/` beside the script."""
    path = Path(out_dir) if out_dir else Path(script_file).resolve().parent / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def print_table(header, rows, fmt="{:.4f}"):
    """Print a plain-text table: header [str], rows [[value, ...]]."""
    cells = [[str(h) for h in header]] + [
        [fmt.format(v) if isinstance(v, (float, np.floating)) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))


def save_plot(path, x, series, xlabel, ylabel, title, xticks=None):
    """Line plot with error bars, saved atomically as PNG.

    x: [n] values; series: {label: (mean [n], std [n])}.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (mean, std) in series.items():
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if xticks is not None:
        ax.set_xticks(list(x))
        ax.set_xticklabels([str(t) for t in xticks])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path, tmp = _atomic_target(path)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def report_run(res, K_list, alpha_list, config, out_dir, name, title, extra=None):
    """Print the accuracy table of a run()/run_regularized() result and write `name`.json / .png.

    res: the 8 arrays returned by run (4 means, 4 stds, each [len(alpha_list), len(K_list)]).
    """
    means, stds = res[:4], res[4:8]
    rows, results = [], []
    for a, al in enumerate(alpha_list):
        for k, K in enumerate(K_list):
            rows.append([al, K] + [f"{means[r][a, k]:.4f} ± {stds[r][a, k]:.4f}" for r in range(4)])
            results.append({"alpha": al, "K": K, **{n: {"mean": means[r][a, k], "std": stds[r][a, k]}
                                                    for r, n in enumerate(RESULT_NAMES)}})
    print(f"\n{title}: accuracy, mean ± std over users (K = 0: reference head, K = 1: Bradley-Terry)")
    print_table(["alpha", "K"] + RESULT_NAMES, rows)
    out_dir = Path(out_dir)
    save_json(out_dir / f"{name}.json", {"config": config, "results": results, **(extra or {})})
    series = {f"{label} (alpha={al:g})": (means[r][a], stds[r][a]) for a, al in enumerate(alpha_list)
              for r, label in [(1, "seen users"), (3, "unseen users")]}
    save_plot(out_dir / f"{name}.png", list(range(len(K_list))), series, "K (0 = reference head, 1 = BT)",
              "test accuracy", f"{title}: accuracy vs rank", xticks=K_list)
    print(f"wrote {out_dir / name}.json and {name}.png")
    return results


def report_shots(res, num_shots, config, out_dir, name, title, K, alpha=None, skipped=None, extra=None):
    """Print and save (JSON, PNG) a run_few_shot_vary_shots result for one K (and alpha).

    res: its 4 arrays [1, 1, len(num_shots)] (or [len(num_shots)]).
    """
    fs_m, fs_s, ts_m, ts_s = (np.asarray(r).reshape(-1) for r in res[:4])
    skipped = skipped or [0] * len(num_shots)
    rows = [[s, f"{fs_m[j]:.4f} ± {fs_s[j]:.4f}", f"{ts_m[j]:.4f} ± {ts_s[j]:.4f}", skipped[j]]
            for j, s in enumerate(num_shots)]
    print(f"\n{title}: K = {K}, accuracy mean ± std over trials")
    print_table(["shots", "few-shot train", "unseen test", "users skipped"], rows)
    results = [{"shots": s, "fewshot_train": {"mean": fs_m[j], "std": fs_s[j]},
                "unseen_test": {"mean": ts_m[j], "std": ts_s[j]}, "users_skipped": skipped[j]}
               for j, s in enumerate(num_shots)]
    out_dir = Path(out_dir)
    save_json(out_dir / f"{name}.json", {"config": config, "K": K, "alpha": alpha, "results": results,
                                         **(extra or {})})
    save_plot(out_dir / f"{name}.png", list(num_shots), {"unseen users, test": (ts_m, ts_s),
                                                          "unseen users, few-shot train": (fs_m, fs_s)},
              "few-shot pairs per user", "accuracy", f"{title}: accuracy vs shots (K = {K})")
    print(f"wrote {out_dir / name}.json and {name}.png")
    return results


# ----------------------------------------------------------------------------------------
# 3. Preference pairs of many users
# ----------------------------------------------------------------------------------------

class Pairs:
    """The comparisons of C users, packed: pair j belongs to user `user[j]`.

    Either dense differences `diffs` [M, F] (d = e_chosen - e_rejected), or indices into an
    embedding table `table` [R, F] (`chosen`, `rejected` [M]) so that many users sharing the
    same responses never materialise [M, F]. `user` [M] long; pairs of a user are contiguous.
    Behaves like the published list of per-user tensors: len(pairs) = C, pairs[i] -> [m_i, F].
    """

    def __init__(self, user, num_users, diffs=None, table=None, chosen=None, rejected=None):
        self.user = torch.as_tensor(user, dtype=torch.long)
        self.num_users = int(num_users)
        self.diffs, self.table = diffs, table
        self.chosen = None if chosen is None else torch.as_tensor(chosen, dtype=torch.long)
        self.rejected = None if rejected is None else torch.as_tensor(rejected, dtype=torch.long)
        if (diffs is None) == (table is None):
            raise ValueError("Pairs needs either diffs [M, F] or table [R, F] with chosen/rejected")
        m = len(self.user)
        if diffs is not None and diffs.shape[0] != m:
            raise ValueError(f"diffs has {diffs.shape[0]} rows but user has {m}")
        if table is not None and not (len(self.chosen) == len(self.rejected) == m):
            raise ValueError("chosen, rejected and user must have the same length")
        if m and (self.user.min() < 0 or self.user.max() >= self.num_users):
            raise ValueError(f"user ids must lie in [0, {self.num_users})")

    @classmethod
    def from_list(cls, tensors):
        """From the published format: a list of C tensors [m_i, F] of differences."""
        tensors = list(tensors)
        if not tensors:
            raise ValueError("no users given")
        counts = [len(t) for t in tensors]
        user = torch.repeat_interleave(torch.arange(len(tensors)), torch.tensor(counts))
        diffs = torch.cat([torch.as_tensor(t, dtype=torch.float32) for t in tensors])
        return cls(user, len(tensors), diffs=diffs)

    @classmethod
    def from_indices(cls, table, chosen_list, rejected_list):
        """From per-user index arrays into `table` [R, F]: lists of C arrays [m_i]."""
        counts = [len(c) for c in chosen_list]
        user = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        chosen = torch.cat([torch.as_tensor(np.asarray(c), dtype=torch.long) for c in chosen_list])
        rejected = torch.cat([torch.as_tensor(np.asarray(r), dtype=torch.long) for r in rejected_list])
        return cls(user, len(counts), table=table, chosen=chosen, rejected=rejected)

    @property
    def num_features(self):
        return (self.diffs if self.diffs is not None else self.table).shape[1]

    def counts(self):
        """[C] number of pairs of each user."""
        return torch.bincount(self.user, minlength=self.num_users)

    def dense(self):
        """[M, F] differences (materialised from the table if needed)."""
        if self.diffs is not None:
            return self.diffs
        return self.table[self.chosen] - self.table[self.rejected]

    def project(self, V):
        """[M, K] = d^T V for every pair, without materialising [M, F] for table pairs."""
        if self.diffs is not None:
            return self.diffs @ V.to(self.diffs.device, self.diffs.dtype)
        S = self.table @ V.to(self.table.device, self.table.dtype)  # [R, K]
        return S[self.chosen] - S[self.rejected]

    def select(self, idx):
        """A Pairs of the pair rows `idx` [m] (same users)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self.diffs is not None:
            return Pairs(self.user[idx], self.num_users, diffs=self.diffs[idx])
        return Pairs(self.user[idx], self.num_users, table=self.table,
                     chosen=self.chosen[idx], rejected=self.rejected[idx])

    def _rows_of(self, users):
        """Indices of the pair rows of `users` [c], user by user in that order."""
        order = torch.argsort(self.user, stable=True)
        counts = self.counts()
        starts = torch.cumsum(counts, 0) - counts
        return [order[starts[u]:starts[u] + counts[u]] for u in torch.as_tensor(users).tolist()]

    def select_users(self, users):
        """A Pairs of the users `users` [c] only, renumbered 0..c-1 in that order."""
        rows = self._rows_of(users)
        out = self.select(torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long))
        out.user = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(r) for r in rows]))
        out.num_users = len(rows)
        return out

    def __len__(self):
        return self.num_users

    def __getitem__(self, i):
        if not 0 <= i < self.num_users:
            raise IndexError(f"user {i} out of range [0, {self.num_users})")
        return self.select(self._rows_of([i])[0]).dense()

    def to_list(self):
        """The published format: list of C tensors [m_i, F]."""
        return [self.select(r).dense() for r in self._rows_of(range(self.num_users))]


def as_pairs(features):
    """Pairs from a Pairs or from a list of per-user tensors [m_i, F]."""
    return features if isinstance(features, Pairs) else Pairs.from_list(features)


# ----------------------------------------------------------------------------------------
# 4. Population simulation (PersonalLLM protocol)
# ----------------------------------------------------------------------------------------

def generate_population(alpha, N):
    """N users' weights over the reward models: Dirichlet(alpha) samples, [N, len(alpha)]."""
    return np.random.dirichlet(alpha, N)


generate_popupulation = generate_population  # the published name


def simulate_user(reward_tensor, features, w):
    """One user's pair per prompt, highest- minus lowest-scored response: [P, F].

    reward_tensor: [P, R, M] scores of R responses by M reward models; features: [P, R, F]
    embeddings; w: [M] the user's weights over the reward models.
    """
    scores = np.asarray(reward_tensor, dtype=np.float64) @ np.asarray(w, dtype=np.float64)  # [P, R]
    best, worst = scores.argmax(1), scores.argmin(1)
    feats = torch.as_tensor(features, dtype=torch.float32)
    rows = torch.arange(len(best))
    return feats[rows, torch.as_tensor(best)] - feats[rows, torch.as_tensor(worst)]


def simulate_population(reward_tensor, features, W):
    """[N, P, F] differences for N users (small inputs only: see sample_population_pairs)."""
    return torch.stack([simulate_user(reward_tensor, features, w) for w in W])


def create_sparse_tensor(dense_tensor, sample_percentage):
    """Keep int(sample_percentage * P) random prompts of each user: list of N tensors [m, F]."""
    N, P = dense_tensor.shape[:2]
    m = int(sample_percentage * P)
    return [torch.as_tensor(dense_tensor[i][np.random.choice(P, m, replace=False)], dtype=torch.float32)
            for i in range(N)]


def sample_population_pairs(reward_tensor, embeddings, W, sample_percentage, rng=None):
    """Memory-lean simulate_population + create_sparse_tensor: a table Pairs.

    Each user first draws int(sample_percentage * P) prompts without replacement (all of them,
    in order, when sample_percentage == 1), then takes its highest- vs lowest-scored response
    on those prompts only. Nothing of size [N, P, F] is built.
    reward_tensor [P, R, M]; embeddings [P * R, F] prompt-major; W [N, M]. Returns Pairs
    indexing `embeddings`.
    """
    rng = np.random if rng is None else rng
    reward_tensor = np.asarray(reward_tensor, dtype=np.float64)
    P, R, _ = reward_tensor.shape
    if embeddings.shape[0] != P * R:
        raise ValueError(f"embeddings has {embeddings.shape[0]} rows, expected P*R = {P}*{R} = {P * R}")
    m = int(sample_percentage * P)
    chosen, rejected = [], []
    for w in np.asarray(W, dtype=np.float64):
        prompts = np.arange(P) if m == P else rng.choice(P, m, replace=False)
        scores = reward_tensor[prompts] @ w  # [m, R]
        chosen.append(prompts * R + scores.argmax(1))
        rejected.append(prompts * R + scores.argmin(1))
    return Pairs.from_indices(embeddings, chosen, rejected)


def load_personalllm_split(path, make_cmd):
    """(embeddings [P * R, F], scores [P, R, M] float64 NumPy, head [F, 1]) of a split written by
    PersonalLLM/prepare.py; prompts with a None/NaN score are dropped (count printed)."""
    t = load_tensors(path, ["embeddings", "scores", "head"], make_cmd=make_cmd)
    E, scores = t["embeddings"], t["scores"].double()
    if scores.dim() != 3 or E.shape[0] != scores.shape[0] * scores.shape[1]:
        raise ValueError(f"{path}: {E.shape[0]} embeddings do not match scores of shape {tuple(scores.shape)} "
                         f"(expected P*R rows); re-run: {make_cmd}")
    P, R, _ = scores.shape
    keep = torch.isfinite(scores).all(dim=(1, 2))
    if not keep.all():
        print(f"{Path(path).name}: skipping {int((~keep).sum())} of {P} prompts with a missing (None/NaN) score")
        E = E.reshape(P, R, -1)[keep].reshape(-1, E.shape[1])
        scores = scores[keep]
    return E, scores.numpy(), t["head"]


def load_personalllm(data_dir, prepare_script, synthetic=False, synthetic_prompts=(9402, 1000),
                     synthetic_features=256, seed=0):
    """(E_train [P*R, F], S_train [P, R, M], E_test, S_test, head [F, 1]) from data_dir/{train,test}.safetensors
    (written by `prepare_script`), or generated by make_synthetic_personalllm when synthetic."""
    if synthetic:
        tr, te, head = make_synthetic_personalllm(*synthetic_prompts, synthetic_features, seed=seed)
        E_tr, S_tr, E_te, S_te = tr["embeddings"], tr["scores"].double().numpy(), te["embeddings"], te["scores"].double().numpy()
    else:
        make_cmd = f"python {prepare_script}"
        E_tr, S_tr, head = load_personalllm_split(Path(data_dir) / "train.safetensors", make_cmd)
        E_te, S_te, _ = load_personalllm_split(Path(data_dir) / "test.safetensors", make_cmd)
    print(f"data: {S_tr.shape[0]} train / {S_te.shape[0]} test prompts, {S_tr.shape[1]} responses, "
          f"{S_tr.shape[2]} reward models, F = {E_tr.shape[1]}{' (synthetic)' if synthetic else ''}")
    return E_tr, S_tr, E_te, S_te, head


def personalllm_population(E_train, S_train, E_test, S_test, N, N_unseen, train_density, fewshot_density,
                           dirichlet_alpha, fewshot_pool_density=None):
    """The PersonalLLM protocol (seed with set_seed first) -> (train, test, train_unseen, test_unseen) Pairs.

    N seen users w ~ Dirichlet(dirichlet_alpha * ones(M)) with int(train_density * P) train pairs
    each; N_unseen new users with int(fewshot_density * P) few-shot pairs (or
    fewshot_pool_density, for a larger pool to draw shots from); everyone on all test prompts.
    """
    alpha = dirichlet_alpha * np.ones(S_train.shape[2])
    W = generate_population(alpha, N)
    train = sample_population_pairs(S_train, E_train, W, train_density)
    test = sample_population_pairs(S_test, E_test, W, 1.0)
    W_unseen = generate_population(alpha, N_unseen)
    train_unseen = sample_population_pairs(S_train, E_train, W_unseen, fewshot_pool_density or fewshot_density)
    test_unseen = sample_population_pairs(S_test, E_test, W_unseen, 1.0)
    print(f"{N} seen users x {int(train_density * len(S_train))} pairs, {N_unseen} unseen users x "
          f"{train_unseen.counts()[0].item()} few-shot pairs, {len(S_test)} test prompts each")
    return train, test, train_unseen, test_unseen


def sample_shots(features, shots, rng=None):
    """`shots` random pairs of each user (without replacement).

    features: list of tensors [m_i, F] (returns a list of [shots, F]) or Pairs (returns Pairs).
    A user with fewer than `shots` pairs is an error.
    """
    rng = np.random if rng is None else rng
    pairs = as_pairs(features)
    counts = pairs.counts().tolist()
    short = [i for i, c in enumerate(counts) if c < shots]
    if short:
        raise ValueError(f"sample_shots: {len(short)} user(s) have fewer than shots={shots} pairs "
                         f"(user {short[0]} has {counts[short[0]]}); drop them or ask for fewer shots")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = np.concatenate([s + rng.choice(c, shots, replace=False) for s, c in zip(starts, counts)])
    out = pairs.select(idx)
    return out if isinstance(features, Pairs) else out.to_list()


# ----------------------------------------------------------------------------------------
# 5. Models
# ----------------------------------------------------------------------------------------

class _ThinMatmul(torch.autograd.Function):
    """X [M, F] @ V [F, K] for a tall X and a thin V; X gets no gradient.

    On CPU (MKL) both products are memory-bound, and the layout matters: the forward reads V
    column-major (2-3x faster than row-major), and dV = (G^T X)^T is accumulated over blocks
    of rows (autograd's X^T G is ~12x slower)."""

    @staticmethod
    def forward(ctx, X, V):
        ctx.save_for_backward(X)
        if X.is_cuda:
            return X @ V
        return X @ V.t().contiguous().t()

    @staticmethod
    def backward(ctx, G):
        (X,) = ctx.saved_tensors
        if X.is_cuda:
            return None, (G.t() @ X).t()
        Gt = G.t().contiguous()  # [K, M]
        dV = torch.zeros(G.shape[1], X.shape[1], dtype=X.dtype)
        block = max(256, 2**20 // X.shape[1])  # rows per block: about 1M floats of X
        for i in range(0, X.shape[0], block):
            dV.addmm_(Gt[:, i:i + block], X[i:i + block])
        return None, dV.t()


def _pack(X, device):
    """(diffs [M, F], user [M], counts [C]) on `device` from a list of tensors or a Pairs."""
    pairs = as_pairs(X)
    return (pairs.dense().to(device, torch.float32), pairs.user.to(device),
            pairs.counts().to(device))


def _user_logits(XV, W, user):
    """[M] logits d^T V w_user / 100 from XV [M, K] and simplex weights W [C, K]."""
    return (XV * W[user]).sum(1) / LOGIT_SCALE


def _train_mode_call(X):
    """Keep nn.Module.train(mode) working: .train(), .train(True/False) -> PyTorch semantics."""
    return X is None or isinstance(X, bool)


class LoRe(nn.Module):
    """Joint fit of the basis V [F, K] and user weights W [C, K] (published `run` variant).

    Loss: sum over users of that user's mean -log sigmoid(d^T V w_i / 100), plus
    alpha * sum_j ||V_j - V_sft||^2. Init V ~ randn(F, K), W logits ~ randn(C, K); one Adam
    over both. `.train(X)` fits and returns (W [C, K] on the simplex, V [F, K]).
    """

    def __init__(self, V_sft, alpha, num_classes, num_features, num_basis_vectors,
                 num_iterations=1000, learning_rate=0.5):
        super().__init__()
        self.V_sft = None if V_sft is None else torch.as_tensor(V_sft, dtype=torch.float32).reshape(num_features, -1)
        self.alpha, self.num_classes = float(alpha), num_classes
        self.num_features, self.K = num_features, num_basis_vectors
        self.num_iterations, self.learning_rate = num_iterations, learning_rate
        self.V = nn.Parameter(torch.randn(num_features, num_basis_vectors))
        self.W = nn.Parameter(self._init_logits(num_classes, num_basis_vectors))
        self.losses = []

    @staticmethod
    def _init_logits(C, K):
        return torch.randn(C, K)

    def weights(self):
        """[C, K] user weights on the simplex."""
        return torch.softmax(self.W, dim=1)

    def forward(self, diffs, user):
        """[M] logits for diffs [M, F] of users `user` [M]."""
        return _user_logits(_ThinMatmul.apply(diffs, self.V), self.weights(), user)

    def loss(self, diffs, user, counts):
        """Scalar training loss (packed, no loop over users)."""
        z = self.forward(diffs, user)
        loss = (F_nn.softplus(-z) / counts[user]).sum()
        if self.alpha and self.V_sft is not None:
            loss = loss + self.alpha * ((self.V - self.V_sft.to(self.V.device)) ** 2).sum()
        return loss

    def train(self, X=None, device=None):
        """Fit on X (list of C tensors [m_i, F] or Pairs) -> (W [C, K], V [F, K]).
        With no data (or a bool) this is nn.Module.train(mode)."""
        if _train_mode_call(X):
            return super().train(True if X is None else X)
        device = get_device(device)
        diffs, user, counts = _pack(X, device)
        self._check(diffs, counts)
        self.to(device)
        opt = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        bar = tqdm(range(self.num_iterations), desc=f"LoRe K={self.K}", leave=False, disable=None)
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            loss = self.loss(diffs, user, counts)
            loss.backward()
            opt.step()
            self.losses.append(loss.item())
        return self.weights().detach(), self.V.detach()

    def _check(self, diffs, counts):
        if diffs.shape[1] != self.num_features:
            raise ValueError(f"pairs have {diffs.shape[1]} features, the model expects {self.num_features}")
        if len(counts) != self.num_classes:
            raise ValueError(f"got {len(counts)} users, the model was built for num_classes={self.num_classes}")
        if (counts == 0).any():
            raise ValueError(f"{int((counts == 0).sum())} user(s) have no pairs")
        if not torch.isfinite(diffs).all():
            raise ValueError("pairs contain NaN or inf")


class LoRe_regularized(LoRe):
    """Joint fit with a cosine pull towards the reference head (published `run_regularized`).

    Loss: mean -log sigmoid over all pairs pooled. Init V ~ randn, W logits ~ U[0, 1).
    Each iteration: an Adam step on W with V frozen (no regulariser), then an Adam step on V
    with alpha_t * mean_j (1 - cos(V_j, V_sft)); alpha_t is 0 for the first 20% of steps,
    ramps linearly to alpha by 80%, then stays. Afterwards basis j is kept only if some user
    puts weight >= 1e-2 on it; `.train(X)` returns (W [C, K'] renormalised, V [F, K']).
    """
    keep_threshold = 1e-2

    @staticmethod
    def _init_logits(C, K):
        return torch.rand(C, K)

    def alpha_at(self, t):
        """Regulariser weight at iteration t."""
        frac = t / max(self.num_iterations, 1)
        return self.alpha * min(max((frac - 0.2) / 0.6, 0.0), 1.0)

    def regulariser(self):
        v = self.V_sft.to(self.V.device).expand_as(self.V)
        return (1 - F_nn.cosine_similarity(self.V, v, dim=0)).mean()

    def train(self, X=None, device=None):
        if _train_mode_call(X):
            return nn.Module.train(self, True if X is None else X)
        device = get_device(device)
        diffs, user, counts = _pack(X, device)
        self._check(diffs, counts)
        self.to(device)
        opt_W = torch.optim.Adam([self.W], lr=self.learning_rate)
        opt_V = torch.optim.Adam([self.V], lr=self.learning_rate)
        use_reg = self.alpha > 0 and self.V_sft is not None
        bar = tqdm(range(self.num_iterations), desc=f"LoRe_regularized K={self.K}", leave=False, disable=None)
        for t in bar:
            XV = _ThinMatmul.apply(diffs, self.V)  # [M, K]; V is the same for both steps
            opt_W.zero_grad(set_to_none=True)
            F_nn.softplus(-_user_logits(XV.detach(), self.weights(), user)).mean().backward()
            opt_W.step()
            opt_V.zero_grad(set_to_none=True)
            loss = F_nn.softplus(-_user_logits(XV, self.weights().detach(), user)).mean()
            if use_reg:
                loss = loss + self.alpha_at(t) * self.regulariser()
            loss.backward()
            opt_V.step()
            self.losses.append(loss.item())
        W = self.weights().detach()
        keep = W.max(0).values >= self.keep_threshold
        self.kept = keep.cpu()
        W = W[:, keep]
        return W / W.sum(1, keepdim=True), self.V.detach()[:, keep]


class PersonalizeBatch(nn.Module):
    """Few-shot weights of C new users on a frozen basis V [F, K].

    Logits start at 0 (uniform w); loss is the sum over users of their mean -log sigmoid,
    so every user's weights follow their own Adam trajectory. `.train(X, V)` returns a list
    of C simplex weight vectors [K].
    """

    def __init__(self, num_classes, num_features, num_basis_vectors, num_iterations=500, learning_rate=0.1):
        super().__init__()
        self.num_classes, self.num_features, self.K = num_classes, num_features, num_basis_vectors
        self.num_iterations, self.learning_rate = num_iterations, learning_rate
        self.W = nn.Parameter(torch.zeros(num_classes, num_basis_vectors))
        self.losses = []

    def weights(self):
        """[C, K] weights on the simplex."""
        return torch.softmax(self.W, dim=1)

    def train(self, X=None, V=None, device=None):
        if _train_mode_call(X):
            return super().train(True if X is None else X)
        if V is None:
            raise ValueError("PersonalizeBatch.train(X, V) needs the basis V [F, K]")
        device = get_device(device)
        pairs = as_pairs(X)
        if len(pairs) != self.num_classes:
            raise ValueError(f"got {len(pairs)} users, expected num_classes={self.num_classes}")
        V = torch.as_tensor(V, dtype=torch.float32)
        if V.shape != (self.num_features, self.K):
            raise ValueError(f"V has shape {tuple(V.shape)}, expected ({self.num_features}, {self.K})")
        XV = pairs.project(V).to(device, torch.float32)  # [M, K]: V is frozen, project once
        user, counts = pairs.user.to(device), pairs.counts().to(device)
        if (counts == 0).any():
            raise ValueError(f"{int((counts == 0).sum())} user(s) have no pairs")
        self.to(device)
        opt = torch.optim.Adam([self.W], lr=self.learning_rate)
        for _ in range(self.num_iterations):
            opt.zero_grad(set_to_none=True)
            loss = (F_nn.softplus(-_user_logits(XV, self.weights(), user)) / counts[user]).sum()
            loss.backward()
            opt.step()
            self.losses.append(loss.item())
        return list(self.weights().detach())


def solve_regularized(V_sft, alpha, X, K, num_iterations=1000, learning_rate=0.5, device=None):
    """Fit LoRe on X (list of C tensors [m_i, F] or Pairs) -> (W [C, K], V [F, K])."""
    pairs = as_pairs(X)
    model = LoRe(V_sft, alpha, len(pairs), pairs.num_features, K, num_iterations, learning_rate)
    return model.train(pairs, device=device)


def solve_regularized_simplex(V_sft, alpha, X, K, num_iterations=20000, learning_rate=0.5, device=None):
    """Fit LoRe_regularized on X -> (W [C, K'], V [F, K']) with unused bases dropped."""
    pairs = as_pairs(X)
    model = LoRe_regularized(V_sft, alpha, len(pairs), pairs.num_features, K, num_iterations, learning_rate)
    return model.train(pairs, device=device)


def learn_multiple_few_shot(X, V, num_iterations=500, learning_rate=0.1, device=None):
    """Few-shot weights of new users on a frozen V [F, K] -> list of C simplex vectors [K]."""
    pairs = as_pairs(X)
    V = torch.as_tensor(V)
    model = PersonalizeBatch(len(pairs), V.shape[0], V.shape[1], num_iterations, learning_rate)
    return model.train(pairs, V, device=device)


# ----------------------------------------------------------------------------------------
# 6. Evaluation
# ----------------------------------------------------------------------------------------

def evaluate_model(X, V, w):
    """Fraction of rows of X [m, F] with X @ V @ w > 0 (a tie counts as wrong)."""
    V = torch.as_tensor(V, dtype=torch.float32)
    w = torch.as_tensor(w, dtype=torch.float32).to(V.device).reshape(-1)
    X = torch.as_tensor(X, dtype=torch.float32).to(V.device)
    return ((X @ V @ w) > 0).float().mean().item()


def user_accuracies(pairs, V, W):
    """[C] accuracy of each user on its pairs: W [C, K] (or [K], shared) and V [F, K]."""
    pairs = as_pairs(pairs)
    V = torch.as_tensor(V, dtype=torch.float32)
    XV = pairs.project(V).float()
    W = torch.as_tensor(W, dtype=torch.float32).to(XV.device)
    W = W.expand(pairs.num_users, -1) if W.dim() == 1 else W
    user = pairs.user.to(XV.device)
    correct = ((XV * W[user]).sum(1) > 0).float()
    counts = pairs.counts().to(XV.device).float()
    return (torch.zeros(pairs.num_users, device=XV.device).index_add_(0, user, correct) / counts).cpu().numpy()


def eval_multiple(W_list, V_list, test_features, verbose=True):
    """Per-user accuracies [C] (list of floats); prints the mean and std over users.

    W_list: C weight vectors [K] (or a [C, K] tensor); V_list: one V [F, K] shared by all
    users, or a list of C of them; test_features: list of C tensors [m_i, F] or Pairs.
    """
    pairs = as_pairs(test_features)
    W = torch.stack([torch.as_tensor(w, dtype=torch.float32).cpu().reshape(-1) for w in W_list])
    if isinstance(V_list, (list, tuple)):
        accs = [user_accuracies(pairs.select_users([i]), V_list[i], W[i:i + 1])[0] for i in range(len(pairs))]
    else:
        accs = user_accuracies(pairs, V_list, W).tolist()
    if verbose:
        print(f"accuracy: mean {np.mean(accs):.4f}, std {np.std(accs):.4f} over {len(accs)} users")
    return list(accs)


# ----------------------------------------------------------------------------------------
# 7. Pipelines
# ----------------------------------------------------------------------------------------

RESULT_NAMES = ["seen_train", "seen_test", "unseen_fewshot", "unseen_test"]


def _fit_basis(model_cls, K, V_final, alpha, pairs, num_iterations, learning_rate, device):
    """(W [C, K'], V [F, K']) for rank K: K = 0 is the reference head V_final with w = [1]."""
    if K == 0:
        V = torch.as_tensor(V_final, dtype=torch.float32).reshape(-1, 1)
        return torch.ones(len(pairs), 1), V
    model = model_cls(V_final, alpha, len(pairs), pairs.num_features, K, num_iterations, learning_rate)
    return model.train(pairs, device=device)


def _run(model_cls, K_list, alpha_list, V_final, train_features, test_features_sparse,
         train_features_unseen, test_features_sparse_unseen, N, N_unseen, device,
         num_iterations, learning_rate, fewshot_iterations, fewshot_learning_rate, seed, return_models):
    train, test = as_pairs(train_features), as_pairs(test_features_sparse)
    train_u, test_u = as_pairs(train_features_unseen), as_pairs(test_features_sparse_unseen)
    for name, pairs, n in [("train_features", train, N), ("test_features_sparse", test, N),
                           ("train_features_unseen", train_u, N_unseen),
                           ("test_features_sparse_unseen", test_u, N_unseen)]:
        if len(pairs) != n:
            raise ValueError(f"{name} has {len(pairs)} users, expected {n}")
    shape = (len(alpha_list), len(K_list))
    means, stds = np.zeros((4,) + shape), np.zeros((4,) + shape)
    models = {}
    for a, alpha in enumerate(alpha_list):
        for k, K in enumerate(K_list):
            set_seed(seed)
            t0 = time.time()
            W, V = _fit_basis(model_cls, K, V_final, alpha, train, num_iterations, learning_rate, device)
            if K <= 1:  # reference head or a single BT reward: everyone gets w = [1]
                W_u = torch.ones(N_unseen, V.shape[1])
            else:
                W_u = torch.stack(learn_multiple_few_shot(train_u, V, fewshot_iterations,
                                                          fewshot_learning_rate, device))
            V, W, W_u = V.cpu(), W.cpu(), W_u.cpu()
            accs = [user_accuracies(train, V, W), user_accuracies(test, V, W),
                    user_accuracies(train_u, V, W_u), user_accuracies(test_u, V, W_u)]
            for r, acc in enumerate(accs):
                means[r, a, k], stds[r, a, k] = acc.mean(), acc.std()
            print(f"alpha={alpha:g} K={K} (kept {V.shape[1]}): " + ", ".join(
                f"{n} {m:.4f}" for n, m in zip(RESULT_NAMES, means[:, a, k])) + f"  [{time.time() - t0:.1f}s]")
            models[(alpha, K)] = {"V": V, "W": W, "W_unseen": W_u}
    out = (*means, *stds)
    return out + (models,) if return_models else out


def run(K_list, alpha_list, V_final, train_features, test_features_sparse, train_features_unseen,
        test_features_sparse_unseen, N, N_unseen, device, *, num_iterations=1000, learning_rate=0.5,
        fewshot_iterations=500, fewshot_learning_rate=0.1, seed=0, return_models=False):
    """The LoRe pipeline for every alpha and K: fit the basis on seen users, evaluate them on
    their train pairs and on unseen prompts, fit few-shot weights of unseen users, evaluate them.

    K = 0: reference head V_final [F, 1], w = [1]; K = 1: one Bradley-Terry reward, w = [1],
    no few-shot step; K >= 2: LoRe. Features: lists of per-user tensors [m_i, F] or Pairs.
    Returns 8 arrays [len(alpha_list), len(K_list)]: mean accuracy over users for
    (seen train, seen test, unseen few-shot train, unseen test), then their std over users;
    with return_models=True also {(alpha, K): {"V", "W", "W_unseen"}}.
    """
    return _run(LoRe, K_list, alpha_list, V_final, train_features, test_features_sparse,
                train_features_unseen, test_features_sparse_unseen, N, N_unseen, device,
                num_iterations, learning_rate, fewshot_iterations, fewshot_learning_rate, seed, return_models)


def run_regularized(K_list, alpha_list, V_final, train_features, test_features_sparse, train_features_unseen,
                    test_features_sparse_unseen, N, N_unseen, device, *, num_iterations=20000, learning_rate=0.5,
                    fewshot_iterations=500, fewshot_learning_rate=0.5, seed=0, return_models=False):
    """`run` with LoRe_regularized (pooled loss, cosine pull to V_final, alternating steps)."""
    return _run(LoRe_regularized, K_list, alpha_list, V_final, train_features, test_features_sparse,
                train_features_unseen, test_features_sparse_unseen, N, N_unseen, device,
                num_iterations, learning_rate, fewshot_iterations, fewshot_learning_rate, seed, return_models)


def run_few_shot_vary_shots(trials, alpha_list, K_list, num_shots, train_features, train_features_unseen,
                            test_features_sparse_unseen, V_final, N, N_unseen, device, *, regularized=False,
                            num_iterations=None, learning_rate=0.5, fewshot_iterations=500,
                            fewshot_learning_rate=None, seed=0, return_skipped=False):
    """Unseen-user accuracy against the number of few-shot pairs.

    The basis is fit once per (alpha, K) on the seen users; then for each shot count and each
    of `trials` draws, every unseen user gets `shots` random pairs of its few-shot pool,
    few-shot weights are fit and the users are evaluated on their test pairs. Users with fewer
    than `shots` pairs are skipped for that count (the number is printed).
    Returns 4 arrays [len(alpha_list), len(K_list), len(num_shots)]: few-shot train accuracy
    mean and std over trials, unseen-user test accuracy mean and std over trials (each trial's
    value is the mean over users); with return_skipped=True also skipped counts [len(num_shots)].
    """
    model_cls = LoRe_regularized if regularized else LoRe
    num_iterations = num_iterations or (20000 if regularized else 1000)
    fewshot_learning_rate = fewshot_learning_rate or (0.5 if regularized else 0.1)
    train, train_u, test_u = (as_pairs(x) for x in (train_features, train_features_unseen,
                                                    test_features_sparse_unseen))
    if len(train) != N or len(train_u) != N_unseen or len(test_u) != N_unseen:
        raise ValueError(f"expected {N} seen and {N_unseen} unseen users, got {len(train)}, "
                         f"{len(train_u)} and {len(test_u)}")
    shape = (len(alpha_list), len(K_list), len(num_shots))
    res = np.zeros((4,) + shape)
    counts = train_u.counts()
    skipped = [int((counts < s).sum()) for s in num_shots]
    for s, n in zip(num_shots, skipped):
        if n:
            print(f"shots={s}: skipping {n} of {N_unseen} unseen users with fewer than {s} pairs")
    for a, alpha in enumerate(alpha_list):
        for k, K in enumerate(K_list):
            set_seed(seed)
            _, V = _fit_basis(model_cls, K, V_final, alpha, train, num_iterations, learning_rate, device)
            V = V.cpu()
            for j, shots in enumerate(num_shots):
                users = torch.nonzero(counts >= shots).flatten()
                if len(users) == 0:
                    res[:, a, k, j] = np.nan
                    continue
                pool, test = train_u.select_users(users), test_u.select_users(users)
                fs, ts = [], []
                for trial in range(trials):
                    rng = np.random.RandomState(seed * 100003 + trial)
                    shot_pairs = sample_shots(pool, shots, rng)
                    if V.shape[1] <= 1:
                        W_u = torch.ones(len(users), V.shape[1])
                    else:
                        W_u = torch.stack(learn_multiple_few_shot(shot_pairs, V, fewshot_iterations,
                                                                  fewshot_learning_rate, device)).cpu()
                    fs.append(user_accuracies(shot_pairs, V, W_u).mean())
                    ts.append(user_accuracies(test, V, W_u).mean())
                res[:, a, k, j] = np.mean(fs), np.std(fs), np.mean(ts), np.std(ts)
                print(f"alpha={alpha:g} K={K} shots={shots}: few-shot train {res[0, a, k, j]:.4f}, "
                      f"unseen test {res[2, a, k, j]:.4f} +- {res[3, a, k, j]:.4f} ({trials} trials)")
    out = tuple(res)
    return out + (skipped,) if return_skipped else out


# ----------------------------------------------------------------------------------------
# 8. Synthetic data
# ----------------------------------------------------------------------------------------

def make_synthetic_personalllm(num_train=9402, num_test=1000, num_features=256, num_responses=8,
                               num_models=10, rank=4, score_noise=0.05, head_noise=1.0, seed=0):
    """A PersonalLLM-shaped dataset whose reward models share a low-rank subspace.

    Reward model m scores a response as e^T h_m + noise, with heads H = U A ([F, M], U [F, rank]
    orthonormal), so every Dirichlet user's reward lies in a rank-`rank` space; the reference
    head is the mean of the model heads plus noise (`head_noise` x its norm).
    Returns (train, test, head [F, 1]) with train/test = {"embeddings": [P * R, F] prompt-major,
    "scores": [P, R, M]}.
    """
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(num_features, rank, generator=g))
    H = U @ torch.randn(rank, num_models, generator=g)  # [F, M]
    H = H / H.norm(dim=0, keepdim=True)
    mean = H.mean(1, keepdim=True)
    noise = torch.randn(num_features, 1, generator=g)
    head = mean + head_noise * mean.norm() * noise / noise.norm()

    def split(P):
        prompt = torch.randn(P, 1, num_features, generator=g)
        E = (prompt + torch.randn(P, num_responses, num_features, generator=g)).reshape(P * num_responses, -1)
        scores = (E @ H).reshape(P, num_responses, num_models)
        scores = scores + score_noise * scores.std() * torch.randn(scores.shape, generator=g)
        return {"embeddings": E.contiguous(), "scores": scores}

    return split(num_train), split(num_test), head


# ----------------------------------------------------------------------------------------
# 9. Dataset loading
# ----------------------------------------------------------------------------------------

def load_split(name, split, path=None, config=None):
    """One split of a dataset as a pandas DataFrame.

    path None: the Hugging Face hub dataset `name` (config `config`). Otherwise a local copy:
    a dataset saved with save_to_disk (DatasetDict or Dataset), a folder of parquet / jsonl /
    json files whose names start with the split (also under data/, the hub layout), or one
    such file.
    """
    import datasets
    import pandas as pd
    if path is None:
        return datasets.load_dataset(name, config, split=split).to_pandas()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset_path {path} does not exist")
    if path.is_dir() and (path / "dataset_dict.json").exists():
        dd = datasets.load_from_disk(str(path))
        if split not in dd:
            raise ValueError(f"{path} has splits {list(dd)}, not {split!r}")
        return dd[split].to_pandas()
    if path.is_dir() and (path / "state.json").exists():
        return datasets.load_from_disk(str(path)).to_pandas()
    files = [path] if path.is_file() else sorted(
        f for d in (path, path / "data") if d.is_dir() for f in d.iterdir()
        if f.name.startswith(split) and f.suffix in (".parquet", ".jsonl", ".json"))
    if not files:
        raise FileNotFoundError(f"no {split!r} split in {path}: expected a save_to_disk folder or "
                                f"{split}*.parquet / {split}*.jsonl files")
    frames = [pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_json(f, lines=f.suffix == ".jsonl")
              for f in files]
    return pd.concat(frames, ignore_index=True)


def require_columns(df, columns, where):
    """Raise a clear error when the DataFrame `df` lacks any of `columns`."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; found {list(df.columns)}")


# ----------------------------------------------------------------------------------------
# DEVELOPMENT HOOK (removed before release): sections under development live in
# _section_*.py files and are merged into this module's namespace here.
for _f in sorted(Path(__file__).resolve().parent.glob("_section_*.py")):
    exec(compile(_f.read_text(), str(_f), "exec"))
