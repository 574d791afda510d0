import datetime
import hashlib
import json
import os
import pathlib
import shutil
import struct

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

# -----------------------------------------------------------------------------
# Embedding extraction
#
# e(x, y) = final hidden state (after the final norm) of a frozen reward model at the last token of the
# chat-templated conversation. extract_embeddings() writes one safetensors file with the [M, F] float32 matrix
# (optionally split into named row blocks), the reward head [F, 1] and caller tensors. It resumes from shards and
# runs on several GPUs under torchrun.

_ST_DTYPES = {  # torch dtype -> safetensors dtype name
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_RESERVED_METADATA = ("model_name", "fingerprint", "extras_sha256", "n_items", "n_features", "dtype",
                      "max_length", "truncation_side", "n_truncated", "groups")


def dist_info():
    """-> (rank, world_size, local_rank): from torch.distributed if initialised, else from torchrun's env vars."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local_rank


def is_main_process():
    return dist_info()[0] == 0


def _print0(*args):
    if is_main_process():
        print(*args, flush=True)


def _resolve_device(device=None):
    """None -> cuda:LOCAL_RANK (torchrun) / the current cuda device / cpu."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        index = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
        device = torch.device("cuda", index)
    return device


def _resolve_dtype(dtype, device):
    """None -> bf16 on CUDA, float32 elsewhere; strings like 'bfloat16' -> torch dtype."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _default_attn(device, dtype):
    """flash_attention_2 on CUDA in half precision when flash_attn imports, else sdpa."""
    if device.type != "cuda":
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except Exception:
        _print0("load_reward_model: flash-attn is not installed, using attn_implementation='sdpa'")
        return "sdpa"
    return "flash_attention_2" if dtype in (torch.bfloat16, torch.float16) else "sdpa"


def load_reward_model(model_name, device=None, dtype=None, attn_implementation=None):
    """-> (tokenizer, model): AutoTokenizer + AutoModelForSequenceClassification in eval mode on `device`.
    Defaults: device cuda:LOCAL_RANK if CUDA else cpu, dtype bf16 on CUDA / float32 on CPU,
    attention flash_attention_2 if available on CUDA else sdpa. Sets a pad token (eos) when the tokenizer has none."""
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    if attn_implementation is None:
        attn_implementation = _default_attn(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation)
    try:
        import accelerate  # noqa: F401  (with accelerate the weights load straight onto the GPU)
        if device.type == "cuda":
            kwargs["device_map"] = str(device)
    except ImportError:
        pass
    model = AutoModelForSequenceClassification.from_pretrained(model_name, **kwargs)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {model_name} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def reward_head(model):
    """-> [F, 1] float32 CPU copy of model.score.weight.T (the reward is embedding @ head)."""
    score = getattr(model, "score", None)
    if score is None or not hasattr(score, "weight"):
        raise ValueError(f"{type(model).__name__} has no `score` layer; load the reward model with "
                         "AutoModelForSequenceClassification")
    if score.weight.shape[0] != 1:
        raise ValueError(f"expected a scalar reward head, got score.weight of shape {tuple(score.weight.shape)}")
    if getattr(score, "bias", None) is not None:
        raise ValueError("the score layer has a bias, which embedding @ head cannot represent")
    return score.weight.detach().float().T.contiguous().cpu()


def _check_conversations(conversations):
    """-> list of M conversations, each a non-empty list of {'role': str, 'content': str} dicts; else ValueError."""
    if hasattr(conversations, "tolist"):  # numpy array / pandas Series
        conversations = conversations.tolist()
    if not isinstance(conversations, (list, tuple)) or len(conversations) == 0:
        raise ValueError("conversations must be a non-empty list of conversations "
                         "(each a list of {'role': ..., 'content': ...} dicts)")
    out = []
    for i, conv in enumerate(conversations):
        if hasattr(conv, "tolist"):
            conv = conv.tolist()
        ok = isinstance(conv, (list, tuple)) and len(conv) > 0 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in conv)
        if not ok:
            raise ValueError(f"conversations[{i}] must be a non-empty list of {{'role': str, 'content': str}} "
                             f"dicts, got {conv!r:.200}")
        out.append(list(conv))
    return out


def _check_side(name, side):
    if side not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")


def tokenize_conversations(tokenizer, conversations, max_length=None, truncation_side="left"):
    """-> (token_ids: list of M lists of int, n_truncated).
    Renders tokenizer.apply_chat_template(conv, tokenize=False) and tokenises the text with
    add_special_tokens=False (the template already writes BOS). Sequences longer than max_length keep their
    last max_length tokens (truncation_side='left', where the reward is read; BOS is dropped then) or first ones."""
    _check_side("truncation_side", truncation_side)
    texts = [tokenizer.apply_chat_template(conv, tokenize=False) for conv in conversations]
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    n_truncated = 0
    for i, ids in enumerate(token_ids):
        if len(ids) == 0:
            raise ValueError(f"conversation {i} renders to zero tokens")
        if max_length is not None and len(ids) > max_length:
            token_ids[i] = ids[-max_length:] if truncation_side == "left" else ids[:max_length]
            n_truncated += 1
    return token_ids, n_truncated


def _length_batches(lengths, max_tokens_per_batch=None, max_batch_size=None):
    """-> list of batches (lists of item indices), longest items first; each batch has at most max_batch_size
    items and batch_size * padded_len <= max_tokens_per_batch (an item longer than that budget runs alone)."""
    max_tokens = max_tokens_per_batch or float("inf")
    max_size = max_batch_size or float("inf")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    batches, batch = [], []
    for i in order:
        # the first item of a batch is its longest, so it sets the padded length
        if batch and (len(batch) >= max_size or (len(batch) + 1) * lengths[batch[0]] > max_tokens):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def embed_token_ids(model, token_ids, pad_id, max_tokens_per_batch=16384, max_batch_size=64,
                    padding_side="right", pbar=None):
    """token_ids: list of N lists of int -> [N, F] float32 CPU: final hidden state (after the final norm) of the last
    real token, in input order. Length-sorted padded batches (see _length_batches; None disables a bound),
    explicit attention_mask and position_ids (so left padding sees the same positions as no padding)."""
    _check_side("padding_side", padding_side)
    base = getattr(model, model.base_model_prefix, model)  # LlamaModel: last_hidden_state is after the final norm
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in token_ids]
    out = torch.empty(len(token_ids), model.config.get_text_config().hidden_size, dtype=torch.float32)
    for batch in _length_batches(lengths, max_tokens_per_batch, max_batch_size):
        B, L = len(batch), lengths[batch[0]]
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for j, i in enumerate(batch):
            n = lengths[i]
            cols = slice(0, n) if padding_side == "right" else slice(L - n, L)
            input_ids[j, cols] = torch.tensor(token_ids[i], dtype=torch.long)
            mask[j, cols] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        last = mask.sum(-1) - 1 if padding_side == "right" else torch.full((B,), L - 1)
        with torch.inference_mode():
            hidden = base(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                          position_ids=position_ids.to(device), use_cache=False).last_hidden_state  # [B, L, F]
            emb = hidden[torch.arange(B, device=device), last.to(device)].float().cpu()
        out[batch] = emb  # out is a normal tensor (usable with autograd later), not an inference tensor
        if pbar is not None:
            pbar.update(B)
    return out


def embed_batch(tokenizer, model, conversations, max_length=None, truncation_side="left", padding_side="right"):
    """conversations: list of M message lists -> [M, F] float32 CPU embeddings, all in one forward pass
    (for small inputs; extract_embeddings handles large ones)."""
    conversations = _check_conversations(conversations)
    token_ids, n_truncated = tokenize_conversations(tokenizer, conversations, max_length, truncation_side)
    if n_truncated:
        _print0(f"embed_batch: {n_truncated}/{len(token_ids)} conversations truncated to {max_length} tokens "
                f"(truncation_side={truncation_side})")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return embed_token_ids(model, token_ids, pad_id, max_tokens_per_batch=None, max_batch_size=None,
                           padding_side=padding_side)


def _sha256_json(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).digest()


def _fingerprint(settings, conv_digests, groups=None):
    """sha256 hex over the settings dict, the groups and the per-conversation digests."""
    h = hashlib.sha256(json.dumps({"settings": settings, "groups": groups}, sort_keys=True, default=str).encode())
    for d in conv_digests:
        h.update(d)
    return h.hexdigest()


def _check_groups(groups, n_items):
    """-> list of (name, n_rows) row blocks covering the n_items rows in order."""
    if groups is None:
        return [("embeddings", n_items)]
    groups = list(groups.items())
    for name, n in groups:
        if not isinstance(name, str) or not name or name == "head":
            raise ValueError(f"bad group name {name!r} (non-empty str, not 'head')")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"group {name!r} must have a non-negative int size, got {n!r}")
    if sum(n for _, n in groups) != n_items:
        raise ValueError(f"group sizes {dict(groups)} sum to {sum(n for _, n in groups)}, "
                         f"but there are {n_items} conversations")
    return groups


def _check_extras(extra_tensors, groups):
    """-> {name: contiguous CPU tensor} with names not clashing with the groups or 'head'."""
    extras = {}
    for name, t in (extra_tensors or {}).items():
        t = torch.as_tensor(t).detach().cpu().contiguous()
        if not isinstance(name, str) or name == "head" or name in dict(groups):
            raise ValueError(f"extra tensor name {name!r} clashes with 'head' or a group name")
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"extra tensor {name!r} has unsupported dtype {t.dtype}")
        extras[name] = t
    return extras


def _check_metadata(metadata):
    """-> {str: str} caller metadata (values converted with str()); reserved keys are refused."""
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    clash = sorted(set(metadata) & set(_RESERVED_METADATA))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by extract_embeddings")
    return metadata


def _extras_digest(extras, metadata):
    """sha256 hex over the caller's extra tensors (names, dtypes, shapes, bytes) and metadata."""
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(extras):
        t = extras[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes(t):
    """Raw little-endian bytes of a CPU tensor, as a uint8 numpy array (no copy when contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _read_metadata(path):
    """-> safetensors __metadata__ dict of the file at path, or None when missing/unreadable."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:
        return None


def _tmp_path(path):
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _save_atomic(tensors, path, metadata):
    """safetensors save_file to a temp file in the same folder, then os.replace."""
    tmp = _tmp_path(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_embeddings_file(path, row_chunks, n_rows, n_features, groups, tensors, metadata):
    """Stream a safetensors file to path (atomically, deterministically) without holding the full matrix:
    the float32 [n_rows, n_features] matrix arrives as row chunks [n_i, F] and is stored as consecutive row
    blocks named by groups [(name, n)]; tensors {name: small CPU tensor} and metadata {str: str} are added."""
    entries = [(name, "F32", [n, n_features], None) for name, n in groups]  # None: comes from row_chunks
    entries += [(name, _ST_DTYPES[t.dtype], list(t.shape), t) for name, t in sorted(tensors.items())]
    itemsize = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    entries.sort(key=lambda e: -itemsize[e[1]])  # keeps every tensor aligned; stable, so the blocks stay in a row
    header = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, _ in entries:
        nbytes = itemsize[dtype] * (torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            matrix_done = False
            for name, dtype, shape, t in entries:
                if t is not None:
                    f.write(_tensor_bytes(t))
                elif not matrix_done:  # all group blocks, back to back
                    rows = 0
                    for chunk in row_chunks:
                        if chunk.dtype != torch.float32 or chunk.dim() != 2 or chunk.shape[1] != n_features:
                            raise ValueError(f"bad row chunk {chunk.dtype} {tuple(chunk.shape)}")
                        f.write(_tensor_bytes(chunk))
                        rows += chunk.shape[0]
                    if rows != n_rows:
                        raise ValueError(f"got {rows} rows, expected {n_rows}")
                    matrix_done = True
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _shard_path(shard_dir, start, stop):
    return shard_dir / f"shard_{start:08d}_{stop:08d}.safetensors"


def _valid_shard(path, shard_fingerprint, start, stop):
    """-> the shard's metadata if path holds the finished shard [start, stop) for these inputs, else None."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            shape = f.get_slice("embeddings").get_shape()
    except Exception:
        return None
    ok = (meta.get("shard_fingerprint") == shard_fingerprint and meta.get("start") == str(start)
          and meta.get("stop") == str(stop) and shape[0] == stop - start)
    return meta if ok else None


def _barrier():
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def extract_embeddings(conversations, out_path, *, model_name, groups=None, extra_tensors=None, metadata=None,
                       max_tokens_per_batch=16384, max_batch_size=64, max_length=4096, truncation_side="left",
                       padding_side="right", shard_size=2048, stop_after_shards=None, device=None, dtype=None,
                       keep_shards=False, progress=True):
    """Embed M conversations with the reward model and write ONE safetensors file at out_path with
    `embeddings` [M, F] float32 (or, with groups={name: n, ...} summing to M, consecutive row blocks under those
    names), `head` [F, 1] float32 (score.weight.T), the caller's extra_tensors, and __metadata__ (caller metadata +
    model_name, fingerprint, n_items, n_features, dtype, max_length, truncation_side, n_truncated, groups).
    Returns out_path, or None when stopped early (stop_after_shards) or shards are missing.
    Skips the work when out_path is up to date; resumes from finished shards in <out_path>.shards/;
    under torchrun, rank r computes shards r, r + G, ... and rank 0 merges."""
    conversations = _check_conversations(conversations)
    n_items = len(conversations)
    groups = _check_groups(groups, n_items)
    extras = _check_extras(extra_tensors, groups)
    metadata = _check_metadata(metadata)
    _check_side("truncation_side", truncation_side)
    _check_side("padding_side", padding_side)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_path = pathlib.Path(out_path)
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    settings = {"model_name": str(model_name), "max_length": max_length, "truncation_side": truncation_side,
                "dtype": dtype_name}
    conv_digests = [_sha256_json(conv) for conv in conversations]
    fingerprint = _fingerprint(settings, conv_digests, groups)
    extras_digest = _extras_digest(extras, metadata)

    # up to date? (needs no model)
    old_meta = _read_metadata(out_path)
    embeddings_current = old_meta is not None and old_meta.get("fingerprint") == fingerprint
    if embeddings_current and old_meta.get("extras_sha256") == extras_digest:
        _print0(f"extract_embeddings: {out_path} is up to date (fingerprint {fingerprint[:12]}), skipping")
        return out_path

    rank, world, _ = dist_info()
    created_group = False
    if world > 1 and not dist.is_initialized():  # launched by torchrun: ranks wait for each other, so a long timeout
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=24))
        created_group = True
    try:
        if embeddings_current:  # same embeddings, other extra tensors / metadata: rewrite without the model
            if rank == 0:
                _print0(f"extract_embeddings: {out_path} has current embeddings but other extra tensors or "
                        "metadata, rewriting it")
                _rewrite_extras(out_path, old_meta, groups, extras, metadata, extras_digest, shard_size)
            _barrier()
            return out_path

        # compute this rank's missing shards
        shard_dir = pathlib.Path(f"{out_path}.shards")
        ranges = [(start, min(start + shard_size, n_items)) for start in range(0, n_items, shard_size)]
        shard_fps = [_fingerprint(settings, conv_digests[start:stop]) for start, stop in ranges]
        todo = [k for k in range(rank, len(ranges), world)
                if _valid_shard(_shard_path(shard_dir, *ranges[k]), shard_fps[k], *ranges[k]) is None]
        n_done = sum(1 for k in range(rank, len(ranges), world)) - len(todo)
        if n_done:
            _print0(f"extract_embeddings: resuming, {n_done} finished shards found in {shard_dir}")
        stopped = False
        if todo:
            tokenizer, model = load_reward_model(model_name, device=device, dtype=dtype)
            head = reward_head(model)
            pad_id = tokenizer.pad_token_id
            shard_dir.mkdir(parents=True, exist_ok=True)
            pbar = tqdm(total=sum(ranges[k][1] - ranges[k][0] for k in todo), unit="seq", desc="embedding",
                        disable=not progress or rank != 0)
            for n_computed, k in enumerate(todo):
                if stop_after_shards is not None and n_computed >= stop_after_shards:
                    stopped = True
                    break
                start, stop = ranges[k]
                token_ids, n_truncated = tokenize_conversations(tokenizer, conversations[start:stop], max_length,
                                                                truncation_side)
                emb = embed_token_ids(model, token_ids, pad_id, max_tokens_per_batch, max_batch_size,
                                      padding_side, pbar)
                shard_meta = {**{key: v for key, v in metadata.items() if key in ("dataset", "split")},
                              "model_name": str(model_name), "fingerprint": fingerprint,
                              "shard_fingerprint": shard_fps[k], "start": str(start), "stop": str(stop),
                              "dtype": dtype_name, "max_length": str(max_length),
                              "truncation_side": truncation_side, "n_truncated": str(n_truncated)}
                _save_atomic({"embeddings": emb, "head": head}, _shard_path(shard_dir, start, stop), shard_meta)
            pbar.close()
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if stopped:
            _print0(f"extract_embeddings: stopped after {stop_after_shards} shard(s) per rank (stop_after_shards)")

        # rank 0 merges all shards into out_path
        _barrier()
        result = None
        if rank == 0:
            result = _merge_shards(out_path, shard_dir, ranges, shard_fps, groups, extras, metadata, {
                "model_name": str(model_name), "fingerprint": fingerprint, "extras_sha256": extras_digest,
                "n_items": str(n_items), "dtype": dtype_name, "max_length": str(max_length),
                "truncation_side": truncation_side, "groups": json.dumps(groups)}, keep_shards)
        _barrier()
        if rank != 0 and (_read_metadata(out_path) or {}).get("fingerprint") == fingerprint:
            result = out_path
        return result
    finally:
        if created_group:
            dist.destroy_process_group()


def _merge_shards(out_path, shard_dir, ranges, shard_fps, groups, extras, metadata, run_meta, keep_shards):
    """Stream all finished shards into out_path (one shard in RAM at a time) -> out_path, or None if some are missing."""
    paths = [_shard_path(shard_dir, start, stop) for start, stop in ranges]
    metas = [_valid_shard(path, fp, start, stop) for path, fp, (start, stop) in zip(paths, shard_fps, ranges)]
    missing = sum(meta is None for meta in metas)
    if missing:
        print(f"extract_embeddings: {missing}/{len(ranges)} shards not finished in {shard_dir}; "
              "run again to resume", flush=True)
        return None
    head = load_file(str(paths[0]))["head"]

    def chunks():
        for path in paths:
            shard = load_file(str(path))
            if not torch.equal(shard["head"], head):
                raise ValueError(f"{path} was computed with another reward head")
            yield shard["embeddings"]

    n_items = ranges[-1][1]
    n_truncated = sum(int(meta["n_truncated"]) for meta in metas)
    final_meta = {**metadata, **run_meta, "n_features": str(head.shape[0]), "n_truncated": str(n_truncated)}
    _write_embeddings_file(out_path, chunks(), n_items, head.shape[0], groups, {"head": head, **extras}, final_meta)
    print(f"extract_embeddings: wrote {out_path} ({n_items} x {head.shape[0]}); {n_truncated}/{n_items} "
          f"conversations truncated to max_length={run_meta['max_length']} tokens "
          f"(truncation_side={run_meta['truncation_side']})", flush=True)
    if not keep_shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
    return out_path


def _rewrite_extras(out_path, old_meta, groups, extras, metadata, extras_digest, chunk_rows):
    """Rewrite out_path with new extra tensors / metadata, streaming its embedding rows from the old file."""
    with safe_open(str(out_path), "pt") as f:
        head = f.get_tensor("head")
        chunks = (f.get_slice(name)[a:min(a + chunk_rows, n)] for name, n in groups for a in range(0, n, chunk_rows))
        final_meta = {**metadata, **{k: old_meta[k] for k in _RESERVED_METADATA if k in old_meta},
                      "extras_sha256": extras_digest}
        n_items = sum(n for _, n in groups)
        _write_embeddings_file(out_path, chunks, n_items, head.shape[0], groups, {"head": head, **extras}, final_meta)
