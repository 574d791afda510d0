"""Reddit TLDR: embed every comparison's winning and losing summary -> data/{split}.safetensors.

    python RedditTLDR/prepare.py                                    # train and validation, from the hub
    python RedditTLDR/prepare.py dataset_path=/path/to/summarize_from_feedback model_name=/path/to/model
    torchrun --nproc_per_node=8 RedditTLDR/prepare.py               # several GPUs

Dataset: openai/summarize_from_feedback, config 'comparisons'. Each comparison has a worker, a post
(info.post), two summaries (summaries[i].text) and the worker's choice (0 or 1). The conversation
[user: post, assistant: summary] is embedded for the winner summaries[choice] and the loser.
Each split file holds `chosen` and `rejected` [n, F] float32, `worker` [n] int64 (index into the
JSON list in the file's metadata 'workers'), `row` [n] int64 (row of the comparison in the dataset
split), `head` [F, 1] (the reward model's own score head) and `published_reference` [F, 1] (the published
scripts' reference direction, read_published_reference). Rows with a missing post (the CNN/DM
rows), summary, choice or worker are skipped, with a printed count. Work is written in resumable
shards; an up-to-date file is not recomputed.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorelib.config import (  # noqa: E402
    InputError,  # noqa: E402
    configure,
    is_main_process,
    print0,
)
from lorelib.extract import extract_embeddings  # noqa: E402
from lorelib.files import (  # noqa: E402
    PUBLISHED_REFERENCE,
    load_split,
    read_published_reference,
    read_score_weight,
    require_columns,
    save_tensors,
)
from RedditTLDR import tldr  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
model_name = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"  # hub id or local path
dataset_name = "openai/summarize_from_feedback"
dataset_config = "comparisons"
dataset_path = None        # local copy: a save_to_disk folder, or a folder of parquet / jsonl files
splits = ["train", "validation"]
split = None               # one split only (overrides splits)
data_dir = None            # default: RedditTLDR/data
max_length = 4096          # tokens; longer conversations keep their last max_length tokens
max_tokens_per_batch = 16384
shard_size = 2048          # conversations per resumable shard
stop_after_shards = None   # stop early after this many new shards (for testing resume)
embedding_dtype = None     # stored dtype: None = the model's (bfloat16 on CUDA, float32 on CPU), or "float32"
from_published = None      # folder with the published tldr_embeddings_{train,val}.pkl: convert them (no GPU)
# -----------------------------------------------------------------------------
config = configure(globals(), script=__file__, writable={"data_dir": "data"})
HERE = Path(__file__).resolve().parent
COLUMNS = ["info", "summaries", "choice", "worker"]


def _text(x):
    """x if it is a non-empty string, else None."""
    return x if isinstance(x, str) and x.strip() else None


def comparison(row):
    """(worker, post, winner, loser) of a dataset row, or the reason it is skipped (a str)."""
    info, summaries, choice, worker = (row[c] for c in COLUMNS)
    post = _text(info.get("post")) if isinstance(info, dict) else None
    if post is None:
        return "missing post"
    summaries = summaries.tolist() if hasattr(summaries, "tolist") else summaries
    texts = [_text(s.get("text")) if isinstance(s, dict) else None for s in summaries or []]
    if len(texts) != 2 or None in texts:
        return "missing summary"
    if isinstance(choice, (bool, np.bool_)) or choice not in (0, 1):  # None / NaN / out of range
        return "missing choice"
    if _text(worker) is None:
        return "missing worker"
    choice = int(choice)
    return worker, post, texts[choice], texts[1 - choice]


def prepare(split_name):
    df = load_split(dataset_name, split_name, dataset_path, dataset_config)
    require_columns(df, COLUMNS, f"{dataset_name} [{split_name}]")
    rows, skipped = [], {}
    for i, row in enumerate(df[COLUMNS].to_dict("records")):
        c = comparison(row)
        if isinstance(c, str):
            skipped[c] = skipped.get(c, 0) + 1
        else:
            rows.append((i, *c))
    if skipped:
        print0(f"{split_name}: skipping {sum(skipped.values())} of {len(df)} rows ("
                     + ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) + ")")
    if not rows:
        raise InputError(f"{dataset_name} [{split_name}]: no usable comparisons")
    index, workers, posts, winners, losers = zip(*rows)
    names = sorted(set(workers))
    worker_id = {w: j for j, w in enumerate(names)}
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": s}]
                     for summaries in (winners, losers) for p, s in zip(posts, summaries)]
    n = len(rows)
    print0(f"{split_name}: {n} comparisons by {len(names)} workers -> {2 * n} conversations")
    out = Path(data_dir or HERE / "data") / f"{split_name}.safetensors"
    return extract_embeddings(
        conversations, out, model_name=model_name, groups={"chosen": n, "rejected": n},
        extra_tensors={"worker": torch.tensor([worker_id[w] for w in workers], dtype=torch.long),
                       "row": torch.tensor(index, dtype=torch.long),
                       PUBLISHED_REFERENCE: read_published_reference(model_name)},
        metadata={"dataset": f"{dataset_name}/{dataset_config}", "split": split_name, "workers": json.dumps(names)},
        max_tokens_per_batch=max_tokens_per_batch, max_length=max_length, shard_size=shard_size,
        stop_after_shards=stop_after_shards, embedding_dtype=embedding_dtype, record=config.record)


if from_published is not None:
    head, reference = read_score_weight(model_name), read_published_reference(model_name)
    for s, name in tldr.PUBLISHED_FILES.items():
        tensors, names = tldr.convert_published(Path(from_published) / name, head, reference)
        out = save_tensors(Path(data_dir or HERE / "data") / f"{s}.safetensors", tensors,
                                 metadata={"workers": json.dumps(names), "converted_from": str(name)})
        print0(f"converted {Path(from_published) / name} -> {out}")
    sys.exit(0)
for s in [split] if split else splits:
    path = prepare(s)
    if path is not None and is_main_process():
        print0(f"{s}: wrote {path}")
