"""Embedding extraction: e(x, y) = the final hidden state (after the final norm) of a frozen reward model at the
last token of the chat-templated conversation [user: x, assistant: y].

extract_embeddings() writes one safetensors file with the [M, F] matrix in the model's dtype (optionally split
into named row blocks), the reward head [F, 1] (score.weight.T: embedding @ head is the model's reward logit)
and the caller's tensors. Batches by length, resumes from finished shards, and runs on several GPUs under
torchrun (rank r computes shards r, r + G, ...; rank 0 merges). On CUDA it uses flash-attn when installed,
else PyTorch SDPA (and says so).

Imports: config, files.
"""
import hashlib
import importlib.util
import json
import numbers
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .config import InputError, barrier, dist_info, get_device, is_main_process, note_written, print0, process_group
from .files import ST_DTYPES, atomic_path, metadata_or_none, save_tensors

_RESERVED_METADATA = ("model_name", "fingerprint", "extras_sha256", "n_items", "n_features", "dtype",
                      "max_length", "truncation_side", "n_truncated", "groups")


def _resolve_dtype(dtype, device):
    """None -> bf16 on CUDA, float32 elsewhere; strings like 'bfloat16' -> torch dtype."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _default_attn(device, dtype):
    """flash_attention_2 on CUDA in half precision when flash_attn is usable, else sdpa."""
    if device.type != "cuda":
        return "sdpa"
    from transformers.utils import is_flash_attn_2_available
    if not is_flash_attn_2_available():  # flash_attn importable in a version transformers supports
        print0("load_reward_model: flash-attn is not installed, using attn_implementation='sdpa'")
        return "sdpa"
    return "flash_attention_2" if dtype in (torch.bfloat16, torch.float16) else "sdpa"


def load_reward_model(model_name, device=None, dtype=None, attn_implementation=None, tokenizer_name=None,
                      trust_remote_code=False):
    """-> (tokenizer, model): AutoTokenizer + AutoModelForSequenceClassification in eval mode on `device`.
    Defaults: device cuda:LOCAL_RANK if CUDA else cpu, dtype bf16 on CUDA / float32 on CPU,
    attention flash_attention_2 if available on CUDA else sdpa. Sets a pad token (eos) when the tokenizer has none."""
    device = get_device(device)
    dtype = _resolve_dtype(dtype, device)
    if attn_implementation is None:
        attn_implementation = _default_attn(device, dtype)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or model_name, trust_remote_code=trust_remote_code)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    if device.type == "cuda" and importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = str(device)  # weights load straight onto the GPU (needs accelerate)
    model = AutoModelForSequenceClassification.from_pretrained(model_name, **kwargs)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise InputError(f"tokenizer of {model_name} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def reward_head(model):
    """-> [F, 1] float32 CPU copy of model.score.weight.T (the reward is embedding @ head)."""
    score = getattr(model, "score", None)
    if score is None or not hasattr(score, "weight"):
        raise InputError(f"{type(model).__name__} has no `score` layer; load the reward model with "
                         "AutoModelForSequenceClassification")
    if score.weight.shape[0] != 1:
        raise InputError(f"expected a scalar reward head, got score.weight of shape {tuple(score.weight.shape)}")
    if getattr(score, "bias", None) is not None:
        raise InputError("the score layer has a bias, which embedding @ head cannot represent")
    return score.weight.detach().float().T.contiguous().cpu()


def check_conversations(conversations):
    """-> list of M conversations, each a non-empty list of {'role': str, 'content': str} dicts; else InputError."""
    if hasattr(conversations, "tolist"):  # numpy array / pandas Series
        conversations = conversations.tolist()
    if not isinstance(conversations, (list, tuple)) or len(conversations) == 0:
        raise InputError("conversations must be a non-empty list of conversations "
                         "(each a list of {'role': ..., 'content': ...} dicts)")
    out = []
    for i, conv in enumerate(conversations):
        if hasattr(conv, "tolist"):
            conv = conv.tolist()
        ok = isinstance(conv, (list, tuple)) and len(conv) > 0 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in conv)
        if not ok:
            raise InputError(f"conversations[{i}] must be a non-empty list of {{'role': str, 'content': str}} "
                             f"dicts, got {conv!r:.200}")
        out.append(list(conv))
    return out


def _check_side(name, side):
    if side not in ("left", "right"):
        raise InputError(f"{name} must be 'left' or 'right', got {side!r}")


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
            raise InputError(f"conversation {i} renders to zero tokens")
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
                    padding_side="right", pbar=None, out_dtype=torch.float32):
    """token_ids: list of N lists of int -> [N, F] CPU tensor of out_dtype: final hidden state (after the final norm)
    of the last real token, in input order. Length-sorted padded batches (see _length_batches; None disables a bound),
    explicit attention_mask and position_ids (so left padding sees the same positions as no padding)."""
    _check_side("padding_side", padding_side)
    base = getattr(model, model.base_model_prefix, model)  # LlamaModel: last_hidden_state is after the final norm
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in token_ids]
    out = torch.empty(len(token_ids), model.config.get_text_config().hidden_size, dtype=out_dtype)
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
            emb = hidden[torch.arange(B, device=device), last.to(device)].to(out_dtype).cpu()
        out[batch] = emb  # out is a normal tensor (usable with autograd later), not an inference tensor
        if pbar is not None:
            pbar.update(B)
    return out


def embed_batch(tokenizer, model, conversations, max_length=None, truncation_side="left", padding_side="right"):
    """conversations: list of M message lists -> [M, F] float32 CPU embeddings, all in one forward pass
    (for small inputs; extract_embeddings handles large ones)."""
    conversations = check_conversations(conversations)
    token_ids, n_truncated = tokenize_conversations(tokenizer, conversations, max_length, truncation_side)
    if n_truncated:
        print0(f"embed_batch: {n_truncated}/{len(token_ids)} conversations truncated to {max_length} tokens "
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
    out = []
    for name, n in groups.items():
        if not isinstance(name, str) or not name or name == "head":
            raise InputError(f"bad group name {name!r} (non-empty str, not 'head')")
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            raise InputError(f"group {name!r} must have a non-negative int size, got {n!r}")
        out.append((name, int(n)))
    groups = out
    if sum(n for _, n in groups) != n_items:
        raise InputError(f"group sizes {dict(groups)} sum to {sum(n for _, n in groups)}, "
                         f"but there are {n_items} conversations")
    return groups


def _check_extras(extra_tensors, groups):
    """-> {name: contiguous CPU tensor} with names not clashing with the groups or 'head'."""
    extras = {}
    for name, t in (extra_tensors or {}).items():
        t = torch.as_tensor(t).detach().cpu().contiguous()
        if not isinstance(name, str) or name == "head" or name in dict(groups):
            raise InputError(f"extra tensor name {name!r} clashes with 'head' or a group name")
        if t.dtype not in ST_DTYPES:
            raise InputError(f"extra tensor {name!r} has unsupported dtype {t.dtype}")
        extras[name] = t
    return extras


def _check_metadata(metadata):
    """-> {str: str} caller metadata (values converted with str()); reserved keys are refused."""
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    clash = sorted(set(metadata) & set(_RESERVED_METADATA))
    if clash:
        raise InputError(f"metadata keys {clash} are reserved by extract_embeddings")
    return metadata


def _tensor_bytes(t):
    """Raw little-endian bytes of a CPU tensor, as a uint8 numpy array (no copy when contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _extras_digest(extras, metadata):
    """sha256 hex over the caller's extra tensors (names, dtypes, shapes, bytes) and metadata."""
    h = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(extras):
        t = extras[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _write_embeddings_file(path, row_chunks, n_rows, n_features, groups, tensors, metadata, dtype=torch.float32):
    """Stream a safetensors file to path (atomically, deterministically) without holding the full matrix:
    the [n_rows, n_features] matrix of `dtype` arrives as row chunks [n_i, F] and is stored as consecutive row
    blocks named by groups [(name, n)]; tensors {name: small CPU tensor} and metadata {str: str} are added."""
    entries = [(name, dtype, [n, n_features], None) for name, n in groups]  # None: comes from row_chunks
    entries += [(name, t.dtype, list(t.shape), t) for name, t in sorted(tensors.items())]
    entries.sort(key=lambda e: -e[1].itemsize)  # keeps every tensor aligned; stable, so the blocks stay in a row
    header = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, _ in entries:
        nbytes = dtype.itemsize * torch.Size(shape).numel()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned
    with atomic_path(path) as tmp:
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
                        if chunk.dtype != dtype or chunk.dim() != 2 or chunk.shape[1] != n_features:
                            raise ValueError(f"bad row chunk {chunk.dtype} {tuple(chunk.shape)}")
                        f.write(_tensor_bytes(chunk))
                        rows += chunk.shape[0]
                    if rows != n_rows:
                        raise ValueError(f"got {rows} rows, expected {n_rows}")
                    matrix_done = True
            f.flush()
            os.fsync(f.fileno())


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


def _plan_shards(n_items, shard_size, settings, conv_digests, shard_dir, rank, world):
    """-> (ranges [(start, stop)] of all shards, their fingerprints, todo: the indices of this rank's shards
    (k = rank, rank + world, ...) that have no finished file in shard_dir yet)."""
    ranges = [(start, min(start + shard_size, n_items)) for start in range(0, n_items, shard_size)]
    shard_fps = [_fingerprint(settings, conv_digests[start:stop]) for start, stop in ranges]
    mine = range(rank, len(ranges), world)
    todo = [k for k in mine if _valid_shard(_shard_path(shard_dir, *ranges[k]), shard_fps[k], *ranges[k]) is None]
    if len(mine) > len(todo):
        print0(f"extract_embeddings: resuming, {len(mine) - len(todo)} finished shards found in {shard_dir}")
    return ranges, shard_fps, todo


def _compute_shards(conversations, todo, ranges, shard_fps, shard_dir, shard_meta, *, model_name, device, dtype,
                    max_length, truncation_side, padding_side, max_tokens_per_batch, max_batch_size, model_kwargs,
                    stop_after_shards, progress, embedding_dtype, record):
    """Embed and save the shards `todo` (indices into ranges / shard_fps) -> True when stopped early
    (stop_after_shards). shard_meta: the metadata every shard file gets, besides its own."""
    if not todo:
        return False
    tokenizer, model = load_reward_model(model_name, device=device, dtype=dtype, **model_kwargs)
    head = reward_head(model)
    shard_dir.mkdir(parents=True, exist_ok=True)
    pbar = tqdm(total=sum(ranges[k][1] - ranges[k][0] for k in todo), unit="seq", desc="embedding",
                disable=not progress or not is_main_process())
    if record is not None:
        record.resume = f"finished shards are kept in {shard_dir}; run the same command again to resume from them"
    stopped = False
    for n_computed, k in enumerate(todo):
        if stop_after_shards is not None and n_computed >= stop_after_shards:
            stopped = True
            break
        start, stop = ranges[k]
        token_ids, n_truncated = tokenize_conversations(tokenizer, conversations[start:stop], max_length,
                                                        truncation_side)
        emb = embed_token_ids(model, token_ids, tokenizer.pad_token_id, max_tokens_per_batch, max_batch_size,
                              padding_side, pbar, embedding_dtype)
        meta = {**shard_meta, "shard_fingerprint": shard_fps[k], "start": str(start), "stop": str(stop),
                "n_truncated": str(n_truncated)}
        save_tensors(_shard_path(shard_dir, start, stop), {"embeddings": emb, "head": head}, meta)
    pbar.close()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return stopped


def _merge_shards(out_path, shard_dir, ranges, shard_fps, groups, extras, metadata, run_meta, keep_shards, record):
    """Stream all finished shards into out_path (one shard in RAM at a time) -> out_path, or None if any is missing."""
    paths = [_shard_path(shard_dir, start, stop) for start, stop in ranges]
    metas = [_valid_shard(path, fp, start, stop) for path, fp, (start, stop) in zip(paths, shard_fps, ranges)]
    missing = sum(meta is None for meta in metas)
    if missing:
        print(f"extract_embeddings: {missing}/{len(ranges)} shards not finished in {shard_dir}; "
              "run again to resume", flush=True)
        return None
    first = load_file(str(paths[0]))
    head, dtype = first["head"], first["embeddings"].dtype

    def chunks():
        for path in paths:
            shard = load_file(str(path))
            if not torch.equal(shard["head"], head):
                raise InputError(f"{path} was computed with another reward head")
            yield shard["embeddings"]

    n_items = ranges[-1][1]
    n_truncated = sum(int(meta["n_truncated"]) for meta in metas)
    final_meta = {**metadata, **run_meta, "n_features": str(head.shape[0]), "n_truncated": str(n_truncated)}
    _write_embeddings_file(out_path, chunks(), n_items, head.shape[0], groups, {"head": head, **extras}, final_meta,
                           dtype)
    print(f"extract_embeddings: wrote {out_path} ({n_items} x {head.shape[0]}, {str(dtype).removeprefix('torch.')}); "
          f"{n_truncated}/{n_items} conversations truncated to max_length={run_meta['max_length']} tokens "
          f"(truncation_side={run_meta['truncation_side']})", flush=True)
    if not keep_shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
    note_written(record, out_path)
    if record is not None:
        record.resume = None
    return out_path


def _rewrite_extras(out_path, old_meta, groups, extras, metadata, extras_digest, chunk_rows):
    """Rewrite out_path with new extra tensors / metadata, streaming its embedding rows from the old file."""
    with safe_open(str(out_path), "pt") as f:
        head = f.get_tensor("head")
        chunks = (f.get_slice(name)[a:min(a + chunk_rows, n)] for name, n in groups for a in range(0, n, chunk_rows))
        final_meta = {**metadata, **{k: old_meta[k] for k in _RESERVED_METADATA if k in old_meta},
                      "extras_sha256": extras_digest}
        n_items = sum(n for _, n in groups)
        dtype = {v: k for k, v in ST_DTYPES.items()}[f.get_slice(groups[0][0]).get_dtype()]
        _write_embeddings_file(out_path, chunks, n_items, head.shape[0], groups, {"head": head, **extras}, final_meta,
                               dtype)


def extract_embeddings(conversations, out_path, *, model_name, groups=None, extra_tensors=None, metadata=None,
                       max_tokens_per_batch=16384, max_batch_size=64, max_length=4096, truncation_side="left",
                       padding_side="right", shard_size=2048, stop_after_shards=None, device=None, dtype=None,
                       embedding_dtype=None, keep_shards=False, progress=True, tokenizer_name=None,
                       trust_remote_code=False, record=None):
    """Embed M conversations with the reward model and write ONE safetensors file at out_path with
    `embeddings` [M, F] (or, with groups={name: n, ...} summing to M, consecutive row blocks under those names) in
    embedding_dtype (None: the model's dtype, bf16 on CUDA and float32 on CPU: the model's hidden state loses
    nothing; "float32" keeps float32), `head` [F, 1] float32 (score.weight.T), the caller's extra_tensors, and
    __metadata__ (caller metadata + model_name, fingerprint, n_items, n_features, dtype, max_length,
    truncation_side, n_truncated, groups).
    Returns out_path, or None when stopped early (stop_after_shards) or shards are missing.
    Skips the work when out_path is up to date (same fingerprint over conversations, model_name, max_length,
    truncation_side, dtype, groups; batching knobs only change rounding and are not part of it); only rewrites the
    file when just extra_tensors/metadata changed; resumes from finished shards of shard_size items in
    <out_path>.shards/; under torchrun, rank r computes shards r, r + G, ... and rank 0 merges.
    tokenizer_name: a tokenizer other than the model's (part of the fingerprint when given).
    record: the script's RunRecord (configure(...).record): Ctrl-C then says where the finished shards are."""
    conversations = check_conversations(conversations)
    n_items = len(conversations)
    groups = _check_groups(groups, n_items)
    extras = _check_extras(extra_tensors, groups)
    metadata = _check_metadata(metadata)
    _check_side("truncation_side", truncation_side)
    _check_side("padding_side", padding_side)
    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    out_path = Path(out_path)
    device = get_device(device)
    dtype = _resolve_dtype(dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    embedding_dtype = dtype if embedding_dtype is None else _resolve_dtype(embedding_dtype, device)
    settings = {"model_name": str(model_name), "max_length": max_length, "truncation_side": truncation_side,
                "dtype": dtype_name}
    if embedding_dtype != torch.float32:  # float32 files keep the fingerprints they were written with
        settings["embedding_dtype"] = str(embedding_dtype).removeprefix("torch.")
    if tokenizer_name is not None:
        settings["tokenizer_name"] = str(tokenizer_name)
    conv_digests = [_sha256_json(conv) for conv in conversations]
    fingerprint = _fingerprint(settings, conv_digests, groups)
    extras_digest = _extras_digest(extras, metadata)

    # up to date? (needs no model)
    old_meta = metadata_or_none(out_path)
    embeddings_current = old_meta is not None and old_meta.get("fingerprint") == fingerprint
    if embeddings_current and old_meta.get("extras_sha256") == extras_digest:
        print0(f"extract_embeddings: {out_path} is up to date (fingerprint {fingerprint[:12]}), skipping")
        return out_path

    rank, world, _ = dist_info()
    with process_group(device):
        if embeddings_current:  # same embeddings, other extra tensors / metadata: rewrite without the model
            if rank == 0:
                print0(f"extract_embeddings: {out_path} has current embeddings but other extra tensors or "
                       "metadata, rewriting it")
                _rewrite_extras(out_path, old_meta, groups, extras, metadata, extras_digest, shard_size)
            barrier()
            return out_path

        shard_dir = Path(f"{out_path}.shards")
        ranges, shard_fps, todo = _plan_shards(n_items, shard_size, settings, conv_digests, shard_dir, rank, world)
        shard_meta = {**{key: v for key, v in metadata.items() if key in ("dataset", "split")},
                      "model_name": str(model_name), "fingerprint": fingerprint, "dtype": dtype_name,
                      "max_length": str(max_length), "truncation_side": truncation_side}
        stopped = _compute_shards(conversations, todo, ranges, shard_fps, shard_dir, shard_meta,
                                  model_name=model_name, device=device, dtype=dtype, max_length=max_length,
                                  truncation_side=truncation_side, padding_side=padding_side,
                                  max_tokens_per_batch=max_tokens_per_batch, max_batch_size=max_batch_size,
                                  stop_after_shards=stop_after_shards, progress=progress,
                                  embedding_dtype=embedding_dtype, record=record,
                                  model_kwargs={"tokenizer_name": tokenizer_name,
                                                "trust_remote_code": trust_remote_code})
        if stopped:
            print0(f"extract_embeddings: stopped after {stop_after_shards} shard(s) per rank (stop_after_shards)")

        # rank 0 merges all shards into out_path
        barrier()
        result = None
        if rank == 0:
            result = _merge_shards(out_path, shard_dir, ranges, shard_fps, groups, extras, metadata, {
                "model_name": str(model_name), "fingerprint": fingerprint, "extras_sha256": extras_digest,
                "n_items": str(n_items), "dtype": dtype_name, "max_length": str(max_length),
                "truncation_side": truncation_side, "groups": json.dumps(groups)}, keep_shards, record)
        barrier()
        if rank != 0 and (metadata_or_none(out_path) or {}).get("fingerprint") == fingerprint:
            result = out_path
        return result

