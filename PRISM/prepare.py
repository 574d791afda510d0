"""PRISM: build users, dialogs and pairs, and embed them with the reward model -> PRISM/data/.

    python PRISM/prepare.py                                  # downloads the jsonl files when absent
    python PRISM/prepare.py dataset_path=/path/to/prism-alignment model_name=/path/to/model
    torchrun --nproc_per_node=8 PRISM/prepare.py             # several GPUs

Reads survey.jsonl, conversations.jsonl and utterances.jsonl of HannahRoseKirk/prism-alignment
(from dataset_path, default data_dir, where they are downloaded through the hub client when
missing). Users with a completed conversation; dialogs with no complete turn dropped; users
with more than 5 dialogs; seed 123: as published, all users shuffled (NumPy), 80% seen / 20% unseen, then
the users with at most 5 dialogs dropped (user_split="filter_first": dropped first); half of each user's
dialogs for training (seen) or few-shot (unseen), half for test. A turn's prompt is the dialog
so far (user messages and chosen replies); every rejected reply is its own pair.

Writes to data_dir:
  pairs.parquet           one row per pair: user, user_id, seen, split, dialog, conversation_id,
                          turn, prompt (messages), chosen, rejected, scores, models, chosen_row, rejected_row
  users.parquet           one row per user: user, user_id, seen, dialogs, train/test dialogs, pairs
  embeddings.safetensors  `embeddings` [R, F] (the chosen conversation of every turn, then the
                          rejected conversation of every pair), `head` [F, 1] (the model's score
                          head), `published_reference` [F, 1] (the published scripts' reference
                          direction, read_published_reference), and per pair [P] int64:
                          chosen, rejected (rows of `embeddings`), user, dialog, turn, seen (0/1),
                          split (0 train / few-shot, 1 test)
Malformed jsonl lines are reported and skipped. Every file is written atomically, the parquet
tables once the embeddings are complete. Embedding is resumable (shards); an up-to-date file is
not recomputed.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorelib.config import (  # noqa: E402
    MissingFileError,  # noqa: E402
    configure,
    is_main_process,
    print0,
)
from lorelib.extract import extract_embeddings  # noqa: E402
from lorelib.files import (  # noqa: E402
    PUBLISHED_REFERENCE,
    atomic_write_bytes,
    read_published_reference,
    read_score_weight,
    save_tensors,
)
from PRISM import prism  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
model_name = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"  # hub id or local path
dataset_path = None        # folder with the three jsonl files; default data_dir (downloaded there if missing)
data_dir = None            # default: PRISM/data
seed = 123                 # user shuffle and dialog halves (published)
seen_fraction = 0.8
min_dialogs = 6            # keep users with more than 5 dialogs
user_split = "published"   # "published": shuffle all users, 80% seen, then drop those with < min_dialogs dialogs;
                           # "filter_first": drop them first, then shuffle and take exactly 80% of the rest as seen
max_length = 4096          # tokens; longer conversations keep their last max_length tokens
max_tokens_per_batch = 16384
shard_size = 2048          # conversations per resumable shard
stop_after_shards = None   # stop early after this many new shards (for testing resume)
embedding_dtype = None     # stored dtype: None = the model's (bfloat16 on CUDA, float32 on CPU), or "float32"
from_published = None      # folder with the published train_embeddings.pkl / test_embeddings.pkl: convert (no GPU)
# -----------------------------------------------------------------------------
config = configure(globals(), script=__file__, writable={"data_dir": "data"})
HERE = Path(__file__).resolve().parent
data_dir = Path(data_dir or HERE / "data")
source = Path(dataset_path or data_dir)
if from_published is not None:
    files = [Path(from_published) / name for name in prism.PUBLISHED_FILES.values()]
    out = save_tensors(data_dir / "embeddings.safetensors",
                             prism.convert_published(*files, read_score_weight(model_name),
                                                     read_published_reference(model_name)),
                             metadata={"converted_from": str(from_published)})
    print0(f"converted {files[0]} and {files[1].name} -> {out}")
    sys.exit(0)

paths = {}
for name in prism.FILES:
    paths[name] = source / name
    if not paths[name].is_file():
        if dataset_path is not None:
            raise MissingFileError(f"{paths[name]} not found (dataset_path={dataset_path})")
        from huggingface_hub import hf_hub_download
        print0(f"downloading {name} from {prism.REPO} to {source}")
        paths[name] = Path(hf_hub_download(prism.REPO, name, repo_type="dataset", local_dir=source))

rows = {name: prism.read_jsonl(path) for name, path in paths.items()}
dialogs = prism.build_dialogs(*(rows[name] for name in prism.FILES))
pairs, users, conversations = prism.build_pairs(dialogs, seed, seen_fraction, min_dialogs, user_split)

path = extract_embeddings(
    conversations, data_dir / "embeddings.safetensors", model_name=model_name,
    extra_tensors={**prism.pair_tensors(pairs), PUBLISHED_REFERENCE: read_published_reference(model_name)},
    metadata={"dataset": prism.REPO, "seed": seed, "seen_fraction": seen_fraction, "min_dialogs": min_dialogs,
              "user_split": user_split,
              "num_users": len(users), "num_seen": int(users["seen"].sum()), "num_pairs": len(pairs)},
    max_tokens_per_batch=max_tokens_per_batch, max_length=max_length, shard_size=shard_size,
    stop_after_shards=stop_after_shards, embedding_dtype=embedding_dtype, record=config.record)
if path is not None and is_main_process():  # the tables last, once their embeddings exist
    atomic_write_bytes(data_dir / "pairs.parquet", pairs.to_parquet(index=False))
    atomic_write_bytes(data_dir / "users.parquet", users.to_parquet(index=False))
    print0(f"wrote {path}, {data_dir / 'pairs.parquet'} and users.parquet")
