"""RewardBench 2 (allenai/reward-bench-2, split 'test'): prompts, conversations to embed, scoring.

A prompt counts as correct when every chosen response outscores every rejected one; Ties prompts
score 0.5 * that + 0.5 * (min(chosen) - max(rejected) > max(chosen) - min(chosen)).
"""
import numpy as np
import torch

from lorelib.config import InputError, MissingFileError, print0
from lorelib.files import load_split, load_tensors, require_columns

SUBSETS = ["Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties"]
# the range of eval_rb2.py's own settings (config.check_value rules, passed to configure)
RULES = {"weights": "one of uniform user basis all", "user": "int >= 0", "limit": "int >= 1", "top_k": "int >= 1"}


def load_prompts(name="allenai/reward-bench-2", path=None, limit=None, split="test"):
    """RewardBench 2 test prompts as a DataFrame (id, prompt, chosen [list], rejected [list],
    subset), checked; `limit`: keep the first `limit` prompts of each subset (smoke runs)."""
    df = load_split(name, split, path)
    require_columns(df, ["id", "prompt", "chosen", "rejected", "subset"], name)
    for col in ["chosen", "rejected"]:
        df[col] = [list(v) if isinstance(v, (list, tuple, np.ndarray)) else v for v in df[col]]
    ok = [isinstance(p, str) and isinstance(c, list) and isinstance(r, list) and len(c) > 0 and len(r) > 0
          and all(isinstance(x, str) for x in c + r) for p, c, r in zip(df["prompt"], df["chosen"], df["rejected"])]
    if not all(ok):
        print0(f"{name}: skipping {len(ok) - sum(ok)} prompts with a missing prompt or empty / non-text "
                     "responses")
        df = df[ok]
    unknown = sorted(set(df["subset"]) - set(SUBSETS))
    if unknown:
        print0(f"{name}: subsets {unknown} are not scored (expected {SUBSETS})")
    df = df[df["subset"].isin(SUBSETS)]
    if limit is not None:
        df = df.groupby("subset", sort=False).head(limit)
    return df.reset_index(drop=True)


def conversations(df):
    """(conversations, prompt_row [M], is_chosen [M]): every (prompt, response) of load_prompts's
    DataFrame as a [user, assistant] conversation, prompt by prompt, chosen before rejected."""
    convs, prompt_row, is_chosen = [], [], []
    for i, (prompt, chosen, rejected) in enumerate(zip(df["prompt"], df["chosen"], df["rejected"])):
        for flag, responses in [(1, chosen), (0, rejected)]:
            for resp in responses:
                convs.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": resp}])
                prompt_row.append(i)
                is_chosen.append(flag)
    return convs, torch.tensor(prompt_row), torch.tensor(is_chosen, dtype=torch.bool)


def prompt_score(chosen, rejected, subset):
    """Score of one prompt from the rewards of its chosen [c] and rejected [r] responses:
    1 when every chosen response outscores every rejected one, else 0; for Ties
    0.5 * that + 0.5 * (margin min(chosen) - max(rejected) > spread max(chosen) - min(chosen))."""
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    margin = chosen.min() - rejected.max()
    strict = float(margin > 0)
    if subset == "Ties":
        return 0.5 * strict + 0.5 * float(margin > chosen.max() - chosen.min())
    return strict


def accuracy(rewards, prompt_row, is_chosen, subsets):
    """{subset: mean prompt score, ..., "overall": mean over the subsets present} for rewards
    [M] of conversations' rows; subsets: the subset of each prompt."""
    rewards, prompt_row = np.asarray(rewards, dtype=np.float64), np.asarray(prompt_row)
    is_chosen = np.asarray(is_chosen, dtype=bool)
    per_subset = {}
    for p, subset in enumerate(subsets):
        m = prompt_row == p
        score = prompt_score(rewards[m & is_chosen], rewards[m & ~is_chosen], subset)
        per_subset.setdefault(subset, []).append(score)
    acc = {s: float(np.mean(per_subset[s])) for s in SUBSETS if s in per_subset}
    acc["overall"] = float(np.mean(list(acc.values())))
    five = [acc[s] for s in SUBSETS[:-1] if s in acc]  # the published overall: mean(mean of the five, Ties)
    acc["overall_published"] = float(np.mean([np.mean(five)] * bool(five) + [acc["Ties"]] * ("Ties" in acc)))
    return acc


def failures(rewards, prompt_row, is_chosen, subsets):
    """Indices of the prompts whose score (prompt_score) is below 1."""
    rewards, prompt_row = np.asarray(rewards, dtype=np.float64), np.asarray(prompt_row)
    is_chosen = np.asarray(is_chosen, dtype=bool)
    scores = [prompt_score(rewards[(prompt_row == p) & is_chosen], rewards[(prompt_row == p) & ~is_chosen], subset)
              for p, subset in enumerate(subsets)]
    return [p for p, score in enumerate(scores) if score < 1]


def load_head(path, head_key=None, make_cmd=None):
    """A reward head V [F, K] (or [K, F], or [F]; oriented by the caller) from .safetensors, .npy, or .pt / .pth /
    .bin (torch.load with weights_only=True: pickles are untrusted). A file holding several tensors: `head_key`,
    else the first of V, head, weight, score.weight. make_cmd: the command that makes such a file, named in errors.
    -> (V float32 tensor, dict of all tensors in the file)."""
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} not found" + (f"; create it with: {make_cmd}" if make_cmd else ""))
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors = load_tensors(path, make_cmd=make_cmd)
    elif suffix == ".npy":
        try:
            tensors = {"head": torch.from_numpy(np.load(path, allow_pickle=False))}
        except ValueError as e:
            raise InputError(f"{path}: cannot read as a plain .npy array ({e})") from e
    elif suffix in (".pt", ".pth", ".bin"):
        import pickle
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError) as e:
            raise InputError(f"{path}: refused to load: it holds more than tensors and plain containers (only "
                             f"torch.load(weights_only=True) is used on untrusted pickles): {e}") from e
        tensors = {"head": obj} if isinstance(obj, torch.Tensor) else {
            str(k): v for k, v in (obj.items() if isinstance(obj, dict) else []) if isinstance(v, torch.Tensor)}
    else:
        raise InputError(f"{path}: unknown head format {suffix!r} (.safetensors, .npy, .pt, .pth, .bin)")
    keys = [head_key] if head_key else [k for k in ("V", "head", "weight", "score.weight") if k in tensors]
    if not keys and len(tensors) == 1:
        keys = list(tensors)
    if not keys or keys[0] not in tensors:
        raise InputError(f"{path}: no head tensor {head_key or 'V / head / weight / score.weight'}; "
                         f"it holds {sorted(tensors)} (pick one with head_key=)")
    return tensors[keys[0]].float(), tensors
