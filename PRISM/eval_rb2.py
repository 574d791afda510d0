"""Score learned reward heads on RewardBench 2 (allenai/reward-bench-2, split 'test').

    python PRISM/eval_rb2.py                                      # the reward model's own head
    python PRISM/eval_rb2.py rm_head=PRISM/results/models/K10_alpha10000.safetensors
    python PRISM/eval_rb2.py --rm_head PATH weights=basis         # each basis column on its own
    python PRISM/eval_rb2.py --limit 5 model_name=/path/to/model  # smoke run: 5 prompts per subset

rm_head: a model file written by a train_basis.py (`V` [F, K], `W` [N, K]), or a head V [F, K] (or [K, F])
in .safetensors, .npy or .pt / .pth / .bin (the published heads; read with torch.load(weights_only=True));
head_key= picks the tensor of a file that holds several. As published, every column of V is scored as its
own head and the heads are ranked (top_k= shows the best k). weights= mixes the columns instead: "uniform"
(w = 1/K), "user" (row `user` of W, a seen PRISM user), "basis" (every column, the published default) or
"all". The reward model's own head (score.weight) is always scored first.
The published flags work: --model --tokenizer --rm_head --head_bias --head_key --split --subset --limit
--batch_size --max_length --truncation_side --device --dtype --trust_remote_code --save_csv --top_k
--verbose_failures (and --mode, which is accepted and has no effect).
Every (prompt, response) is embedded with the reward model once and cached in data_dir.

A prompt counts as correct when every chosen response outscores every rejected one; Ties
prompts score 0.5 * that + 0.5 * (min(chosen) - max(rejected) > max(chosen) - min(chosen)).
Prints the per-subset accuracy table with the current overall score (mean of the six subsets) and the
published one (mean of the five-subset mean and Ties), and writes out_dir/eval_rb2_<head>.csv (or save_csv=).
"""
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorelib.config import (  # noqa: E402
    InputError,  # noqa: E402
    configure,
    is_main_process,
)
from lorelib.extract import extract_embeddings  # noqa: E402
from lorelib.files import atomic_write_bytes, load_tensors, save_or_fallback, script_out_dir  # noqa: E402
from lorelib.report import print_table  # noqa: E402
from PRISM import rewardbench  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override as key=value; --key value also works)
rm_head = None             # V [F, K]: .safetensors (train_basis.py models/), .npy, .pt, .pth, .bin; None: own head only
head_key = None            # the tensor of rm_head to use (default: V, head, weight or score.weight)
head_bias = 0.0            # added to every reward (published flag; it changes no comparison)
weights = None             # None (published): every column its own head; or "uniform", "user", "basis", "all"
user = 0                   # the seen user whose row of W is used (weights=user / all)
model_name = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"  # must be the model the head was trained on
model = None               # published flag: the same as model_name
tokenizer = None           # another tokenizer than the model's (published flag)
trust_remote_code = False
mode = None                # published flag; accepted, no effect
dataset_name = "allenai/reward-bench-2"
dataset_path = None        # local copy: a save_to_disk folder, or a folder of test*.parquet / jsonl files
split = "test"
subset = None              # score only this subset (a name)
limit = None               # keep the first `limit` prompts of each subset (smoke run)
batch_size = 64            # sequences per forward pass at most (also bounded by max_tokens_per_batch)
device = None              # default: cuda if available, else cpu
dtype = None               # default: bfloat16 on CUDA, float32 on CPU
top_k = None               # print only the best top_k learned heads (by the published overall score)
verbose_failures = False   # print the ids of the prompts each head gets wrong
save_csv = None            # CSV path; default out_dir/eval_rb2_<head>.csv
data_dir = None            # embedding cache; default: PRISM/data
out_dir = None             # default: PRISM/results
max_length = 4096
truncation_side = "left"
max_tokens_per_batch = 16384
shard_size = 2048
_types = {"head_key": str, "weights": str, "model": str, "tokenizer": str, "mode": str, "subset": str,
          "top_k": int, "save_csv": str, "dtype": str}
# -----------------------------------------------------------------------------
config = configure(globals(), script=__file__, writable={"out_dir": "results", "data_dir": "data"},
                   rules=rewardbench.RULES)
HERE = Path(__file__).resolve().parent
model_name = model or model_name
if weights is None:
    weights = "basis"

if rm_head is not None:  # read and check the head first: a bad file is reported before the long embedding pass
    V, saved = rewardbench.load_head(rm_head, head_key, make_cmd=f"python {HERE / 'train_basis.py'}")
    V = V.reshape(-1, 1) if V.dim() == 1 else V
    if V.dim() != 2:
        raise InputError(f"{rm_head}: the head has shape {tuple(V.shape)}, expected V [F, K]; "
                         f"pass rm_head= a file of {HERE / 'results' / 'models'}/ written by train_basis.py")
    if weights in ("user", "all") and ("W" not in saved or not 0 <= user < len(saved["W"])):
        shape = tuple(saved["W"].shape) if "W" in saved else None
        raise InputError(f"user={user}: {rm_head} has no row {user} in the user weights W (shape {shape}); "
                         "pass a smaller user= or weights=uniform")

df = rewardbench.load_prompts(dataset_name, dataset_path, limit, split=split)
if subset is not None:
    wanted = [subset]
    unknown = sorted(set(wanted) - set(rewardbench.SUBSETS))
    if unknown:
        raise InputError(f"subset={subset!r}: unknown subset(s) {unknown}; RewardBench 2 has {rewardbench.SUBSETS}")
    df = df[df["subset"].isin(wanted)].reset_index(drop=True)
conversations, prompt_row, is_chosen = rewardbench.conversations(df)
print(f"RewardBench 2: {len(df)} prompts, {len(conversations)} responses; "
      + ", ".join(f"{s} {n}" for s, n in df["subset"].value_counts().reindex(rewardbench.SUBSETS).dropna().items()))
tag = "".join(f"_{k}{v}" for k, v in [("split", None if split == "test" else split), ("limit", limit),
                                       ("subset", None if subset is None else "-".join(wanted).replace(" ", ""))]
              if v is not None)
cache = Path(data_dir or HERE / "data") / f"rb2{tag}.safetensors"
path = extract_embeddings(conversations, cache, model_name=model_name, tokenizer_name=tokenizer,
                                trust_remote_code=trust_remote_code, device=device, dtype=dtype,
                                extra_tensors={"prompt_row": prompt_row, "is_chosen": is_chosen.long()},
                                metadata={"dataset": dataset_name, "split": split, "limit": limit},
                                max_tokens_per_batch=max_tokens_per_batch, max_batch_size=batch_size,
                                max_length=max_length, truncation_side=truncation_side, shard_size=shard_size,
                                record=config.record)
if not is_main_process():
    sys.exit(0)
if path is None:
    raise SystemExit(f"embedding of {cache} did not finish; run again to resume")
t = load_tensors(path, ["embeddings", "head"], make_cmd=f"python {Path(__file__)}")
E = t["embeddings"].float()

heads = {"reference": t["head"]}  # name -> [F, 1]
learned = []
if rm_head is not None:
    F = E.shape[1]
    if F not in V.shape:
        raise InputError(f"{rm_head}: head of shape {tuple(V.shape)} has no side of {model_name}'s F = {F}; "
                         "score a head with the model it was trained on")
    V = V if V.shape[0] == F else V.T  # [K, F] (e.g. a Linear weight) -> [F, K]
    stem = Path(rm_head).stem
    if weights in ("uniform", "all"):
        heads[f"{stem} uniform"] = V.mean(1, keepdim=True)
    if weights in ("user", "all"):
        heads[f"{stem} user {user}"] = V @ saved["W"][user].float().reshape(-1, 1)
    if weights in ("basis", "all"):
        heads.update({f"{stem} basis {j}": V[:, j:j + 1] for j in range(V.shape[1])})
    learned = list(heads)[1:]

rewards = E @ torch.cat(list(heads.values()), dim=1) + head_bias  # [M, J]
subsets = df["subset"].tolist()
rows = [{"head": name, **rewardbench.accuracy(rewards[:, j], prompt_row, is_chosen, subsets)}
        for j, name in enumerate(heads)]
table = pd.DataFrame(rows)
ranked = pd.concat([table.iloc[:1], table.iloc[1:].sort_values("overall_published", ascending=False)])  # as published
shown = ranked if top_k is None else ranked.iloc[:1 + top_k]
cols = ["head"] + [c for c in rewardbench.SUBSETS + ["overall", "overall_published"] if c in table.columns]
print(f"\nRewardBench 2 accuracy ({model_name}{f', first {limit} prompts per subset' if limit else ''}); "
      "overall: mean of the subsets, overall_published: mean of (mean of the five non-Ties subsets, Ties)"
      + (f"; learned heads ranked, best {top_k} shown" if top_k is not None and learned else ""))
print_table(cols, shown[cols].values.tolist())
if verbose_failures:
    for j, name in enumerate(heads):
        failed = rewardbench.failures(rewards[:, j], prompt_row, is_chosen, subsets)
        print(f"{name}: {len(failed)} prompts not fully correct: " + ", ".join(str(df["id"][p]) for p in failed))
name = "reference" if rm_head is None else f"{Path(rm_head).stem}_{weights}"
out = Path(save_csv) if save_csv else script_out_dir(__file__, out_dir) / f"eval_rb2_{name}{tag}.csv"
written = save_or_fallback(out, lambda p: atomic_write_bytes(p, ranked[cols].to_csv(index=False).encode()))
if written != out:
    print(f"results in full ({out.name}):\n{ranked[cols].to_csv(index=False)}")
print(f"wrote {written}")
