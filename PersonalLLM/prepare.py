"""PersonalLLM: embed every (prompt, response) with the reward model -> data/{split}.safetensors.

    python PersonalLLM/prepare.py                                   # both splits, from the hub
    python PersonalLLM/prepare.py dataset_path=/path/to/PersonalLLM model_name=/path/to/model
    torchrun --nproc_per_node=8 PersonalLLM/prepare.py              # several GPUs

Each split file holds `embeddings` [P * 8, F] float32 (prompt-major: row 8 p + i is response
i + 1 of prompt p), `scores` [P, 8, 10] (the 10 reward models' scores, NaN where missing),
`prompt_index` [P] (row of the dataset), `head` [F, 1] (the reward model's own score head) and
`published_reference` [F, 1] (the published scripts' reference direction, read_published_reference),
so train_basis.py and vary_fewshot.py never load the 8B model or the dataset again. Work is
written in resumable shards; an up-to-date file is not recomputed.
"""
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
)
from PersonalLLM import personalllm  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
model_name = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"  # hub id or local path
dataset_name = "namkoong-lab/PersonalLLM"
dataset_path = None        # local copy: a save_to_disk folder, or a folder of parquet / jsonl files
splits = ["train", "test"]
split = None               # one split only (overrides splits)
data_dir = None            # default: PersonalLLM/data
max_length = 4096          # tokens; longer conversations keep their last max_length tokens
max_tokens_per_batch = 16384
shard_size = 2048          # conversations per resumable shard
stop_after_shards = None   # stop early after this many new shards (for testing resume)
embedding_dtype = None     # stored dtype: None = the model's (bfloat16 on CUDA, float32 on CPU), or "float32"
from_published = None      # the published script's embeddings safetensors: convert it (train split, no GPU)
# -----------------------------------------------------------------------------
config = configure(globals(), script=__file__, writable={"data_dir": "data"})
HERE = Path(__file__).resolve().parent
NUM_RESPONSES, MODEL_NAMES = personalllm.NUM_RESPONSES, personalllm.MODEL_NAMES


def prepare(split_name):
    df = load_split(dataset_name, split_name, dataset_path)
    responses = [f"response_{i}" for i in range(1, NUM_RESPONSES + 1)]
    require_columns(df, ["prompt"] + responses, f"{dataset_name} [{split_name}]")
    missing_scores = [f"response_{i}_{m}" for i in range(1, NUM_RESPONSES + 1) for m in MODEL_NAMES
                      if f"response_{i}_{m}" not in df.columns]
    if missing_scores:
        raise InputError(f"{dataset_name} [{split_name}]: missing score column(s) {missing_scores[:5]}"
                         f"{' ...' if len(missing_scores) > 5 else ''}")
    text_ok = df[["prompt"] + responses].map(lambda v: isinstance(v, str)).all(axis=1).to_numpy()
    if not text_ok.all():
        print0(f"{split_name}: skipping {int((~text_ok).sum())} of {len(df)} rows "
                     "with a missing prompt or response")
    df = df[text_ok]
    conversations = [[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[r]}]
                     for _, row in df.iterrows() for r in responses]
    print0(f"{split_name}: {len(df)} prompts x {NUM_RESPONSES} responses = {len(conversations)} conversations")
    out = Path(data_dir or HERE / "data") / f"{split_name}.safetensors"
    return extract_embeddings(
        conversations, out, model_name=model_name,
        extra_tensors={"scores": personalllm.reward_tensor(df),
                       "prompt_index": torch.as_tensor(np.flatnonzero(text_ok), dtype=torch.long),
                       PUBLISHED_REFERENCE: read_published_reference(model_name)},
        metadata={"dataset": dataset_name, "split": split_name, "reward_models": ",".join(MODEL_NAMES)},
        max_tokens_per_batch=max_tokens_per_batch, max_length=max_length, shard_size=shard_size,
        stop_after_shards=stop_after_shards, embedding_dtype=embedding_dtype, record=config.record)


if from_published is not None:  # the published output: train split only, scores from the dataset
    out = Path(data_dir or HERE / "data") / "train.safetensors"
    personalllm.convert_published(from_published, load_split(dataset_name, "train", dataset_path),
                                  read_score_weight(model_name), out, read_published_reference(model_name))
    print0(f"converted {from_published} -> {out} (the published script embeds the train split only; "
                 f"make the test split with: python {Path(__file__)} split=test)")
    sys.exit(0)
for s in [split] if split else splits:
    path = prepare(s)
    if path is not None and is_main_process():
        print0(f"{s}: wrote {path}")
