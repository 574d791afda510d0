"""Score learned reward heads on RewardBench 2 (allenai/reward-bench-2, split 'test').

    python PRISM/eval_rb2.py                                      # the reward model's own head
    python PRISM/eval_rb2.py rm_head=PRISM/results/heads/K10_alpha10000.safetensors
    python PRISM/eval_rb2.py --rm_head PATH weights=basis         # each basis column on its own
    python PRISM/eval_rb2.py --limit 5 model_name=/path/to/model  # smoke run: 5 prompts per subset

rm_head: a file written by PRISM/train_basis.py (`V` [F, K], `W` [N, K]) or any safetensors
with `V` [F, K] or `head` [F, 1]. Its rewards e^T V w use the weights `weights`: "uniform"
(w = 1/K), "user" (row `user` of W, a seen PRISM user), "basis" (every column on its own) or
"all" (all of these). The reward model's own head (score.weight) is always scored first.
Every (prompt, response) is embedded with the reward model once and cached in data_dir.

A prompt counts as correct when every chosen response outscores every rejected one; Ties
prompts score 0.5 * that + 0.5 * (min(chosen) - max(rejected) > max(chosen) - min(chosen)).
Prints the per-subset accuracy table and writes out_dir/eval_rb2_<head>.csv.
"""
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from PRISM import rewardbench  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override as key=value; --key value also works)
rm_head = None             # safetensors with V [F, K] (train_basis.py heads/); None: the model's own head only
weights = "uniform"        # "uniform", "user", "basis" or "all": how the columns of V are mixed
user = 0                   # the seen user whose row of W is used (weights=user / all)
model_name = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"  # must be the model the head was trained on
dataset_name = "allenai/reward-bench-2"
dataset_path = None        # local copy: a save_to_disk folder, or a folder of test*.parquet / jsonl files
limit = None               # keep the first `limit` prompts of each subset (smoke run)
data_dir = None            # embedding cache; default: PRISM/data
out_dir = None             # default: PRISM/results
max_length = 4096
max_tokens_per_batch = 16384
shard_size = 2048
# -----------------------------------------------------------------------------
config = utils.configure(globals())
utils.check_settings(config, __file__, writable={"out_dir": "results", "data_dir": "data"})
HERE = Path(__file__).resolve().parent

if rm_head is not None:  # read and check the head first: a bad file is reported before the long embedding pass
    saved = utils.load_tensors(rm_head, make_cmd=f"python {HERE / 'train_basis.py'}")
    V = saved.get("V", saved.get("head"))
    if V is None or V.dim() != 2:
        raise ValueError(f"{rm_head} holds no `V` [F, K] or `head` [F, 1] tensor (it has {sorted(saved)}); "
                         f"pass rm_head= a file of {HERE / 'results' / 'heads'}/ written by train_basis.py")
    if weights in ("user", "all") and ("W" not in saved or not user < len(saved["W"])):
        shape = tuple(saved["W"].shape) if "W" in saved else None
        raise ValueError(f"user={user}: {rm_head} has no row {user} in the user weights W (shape {shape}); "
                         "pass a smaller user= or weights=uniform")

df = rewardbench.load_prompts(dataset_name, dataset_path, limit)
conversations, prompt_row, is_chosen = rewardbench.conversations(df)
print(f"RewardBench 2: {len(df)} prompts, {len(conversations)} responses; "
      + ", ".join(f"{s} {n}" for s, n in df["subset"].value_counts().reindex(rewardbench.SUBSETS).dropna().items()))
cache = Path(data_dir or HERE / "data") / ("rb2.safetensors" if limit is None else f"rb2_limit{limit}.safetensors")
path = utils.extract_embeddings(conversations, cache, model_name=model_name,
                                extra_tensors={"prompt_row": prompt_row, "is_chosen": is_chosen.long()},
                                metadata={"dataset": dataset_name, "split": "test", "limit": limit},
                                max_tokens_per_batch=max_tokens_per_batch, max_length=max_length,
                                shard_size=shard_size)
if not utils.is_main_process():
    sys.exit(0)
if path is None:
    raise SystemExit(f"embedding of {cache} did not finish; run again to resume")
t = utils.load_tensors(path, ["embeddings", "head"], make_cmd=f"python {Path(__file__)}")
E = t["embeddings"]

heads = {"reference": t["head"]}  # name -> [F, 1]
if rm_head is not None:
    if V.shape[0] != E.shape[1]:
        raise ValueError(f"{rm_head}: V has {V.shape[0]} rows but {model_name} embeddings have F = {E.shape[1]}; "
                         "score a head with the model it was trained on")
    stem = Path(rm_head).stem
    if weights in ("uniform", "all"):
        heads[f"{stem} uniform"] = V.mean(1, keepdim=True)
    if weights in ("user", "all"):
        heads[f"{stem} user {user}"] = V @ saved["W"][user].reshape(-1, 1)
    if weights in ("basis", "all"):
        heads.update({f"{stem} basis {j}": V[:, j:j + 1] for j in range(V.shape[1])})

rewards = E @ torch.cat(list(heads.values()), dim=1)  # [M, J]
rows = [{"head": name, **rewardbench.accuracy(rewards[:, j], prompt_row, is_chosen, df["subset"].tolist())}
        for j, name in enumerate(heads)]
table = pd.DataFrame(rows)
cols = ["head"] + [c for c in rewardbench.SUBSETS + ["overall"] if c in table.columns]
print(f"\nRewardBench 2 accuracy ({model_name}{f', first {limit} prompts per subset' if limit else ''})")
utils.print_table(cols, table[cols].values.tolist())
name = "reference" if rm_head is None else f"{Path(rm_head).stem}_{weights}"
out = utils.script_out_dir(__file__, out_dir) / f"eval_rb2_{name}{'' if limit is None else f'_limit{limit}'}.csv"
written = utils.save_or_fallback(out, lambda p: utils.atomic_write_bytes(p, table[cols].to_csv(index=False).encode()))
if written != out:
    print(f"results in full ({out.name}):\n{table[cols].to_csv(index=False)}")
print(f"wrote {written}")
