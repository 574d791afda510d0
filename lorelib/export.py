"""Export a personalized reward as a Hugging Face AutoModelForSequenceClassification checkpoint: the base reward
model with a new score.weight [1, F]. The export is a sharded checkpoint whose index maps score.weight to a small
file of its own and every other tensor to the base model's files, linked (hard links, or symlinks), never copied.

Imports: config, files.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .config import InputError, MissingFileError
from .files import ST_DTYPES, jsonable, save_json, save_tensors, usual_permissions

EXPORT_HEAD_FILE = "personalized-head.safetensors"  # sorts after every base-* link (see export_reward_model)
EXPORT_BASE_PREFIX = "base-"  # never a name save_pretrained writes, so saving into the folder cannot touch the base
EXPORT_INDEX_FILE = "model.safetensors.index.json"
EXPORT_COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                       "chat_template.jinja", "chat_template.json")
_ST_NAME_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                  "F8_E4M3": 1, "F8_E5M2": 1}


def _base_file(model_name, filename):
    """Path of `filename` in a local model folder or the hub cache (downloaded when needed and possible), or None."""
    from transformers.utils import cached_file
    try:
        return cached_file(model_name, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None


def base_weight_files(model_name):
    """-> (weight_map {tensor: file name}, files {file name: resolved path}) of a safetensors reward model:
    a single model.safetensors or a sharded model.safetensors.index.json (the order transformers tries them)."""
    single = _base_file(model_name, "model.safetensors")
    if single is not None:
        with safe_open(single, "pt") as f:
            return {k: "model.safetensors" for k in f.keys()}, {"model.safetensors": single}
    index = _base_file(model_name, EXPORT_INDEX_FILE)
    if index is None:
        raise MissingFileError(f"{model_name} has neither model.safetensors nor {EXPORT_INDEX_FILE}: export needs "
                               "a reward model saved as safetensors (save_pretrained writes them)")
    with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    files = {}
    for name in sorted(set(weight_map.values())):
        files[name] = _base_file(model_name, name)
        if files[name] is None:
            raise MissingFileError(f"{model_name}: shard {name} listed in {EXPORT_INDEX_FILE} is missing")
    return weight_map, files


def _link(src, dst):
    """Hard link dst -> the real file behind src (a hub-cache snapshot entry is a symlink to a blob); a symlink
    to its absolute path where a hard link is impossible (another filesystem, no permission).
    -> "hardlink" or "symlink"."""
    real = os.path.realpath(src)
    try:
        os.link(real, dst)
        return "hardlink"
    except OSError:
        os.symlink(real, dst)
        return "symlink"


class FolderInUseError(InputError, FileExistsError):
    """An output folder that holds something else (export_reward_model never writes into it)."""


def export_reward_model(model_name, score_weight, out_dir, info=None):
    """Write an AutoModelForSequenceClassification checkpoint of `model_name` with a new score.weight [1, F].

    out_dir gets: base-<file> links to each of the base model's safetensors files (hard links, or symlinks
    where a hard link is impossible; nothing is copied), EXPORT_HEAD_FILE with the new score.weight (in the
    base head's dtype; `info` in its metadata), an index model.safetensors.index.json mapping score.weight to
    that file and every other tensor to its base file, and copies of the config and tokenizer files.
    The base files hold the old score.weight too: loaders that read every file of the index (transformers
    does) read them in sorted order, so the head file, which sorts last, wins. out_dir is built beside
    itself and renamed into place; an earlier export there is replaced, another non-empty folder refused.
    -> Path(out_dir)."""
    out_dir = Path(out_dir)
    weight_map, files = base_weight_files(model_name)
    score_file = weight_map.get("score.weight")
    if score_file is None or "score.bias" in weight_map:
        raise InputError(f"{model_name} has no bias-free `score` head (score.weight); export needs a reward model "
                         "loadable with AutoModelForSequenceClassification")
    with safe_open(files[score_file], "pt") as f:
        base_score = f.get_slice("score.weight")
        shape, dtype = base_score.get_shape(), base_score.get_dtype()
    score_weight = torch.as_tensor(score_weight).detach().float().cpu().reshape(1, -1)
    if list(score_weight.shape) != list(shape):
        raise InputError(f"the new head has shape {tuple(score_weight.shape)}, {model_name}'s score.weight {shape}")
    torch_dtype = {v: k for k, v in ST_DTYPES.items()}[dtype]
    config = _base_file(model_name, "config.json")
    if config is None:
        raise MissingFileError(f"{model_name} has no config.json")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / EXPORT_HEAD_FILE).exists():
        raise FolderInUseError(f"{out_dir} exists and is not an earlier export: give an empty or new folder")
    if out_dir.exists() and any(Path(p).resolve().parent == out_dir.resolve() for p in files.values()):
        raise InputError(f"out_dir {out_dir} is the base model's own folder")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        links, sizes = {}, {}
        for name, path in files.items():
            links[name] = _link(path, tmp / (EXPORT_BASE_PREFIX + name))
            with safe_open(path, "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    sizes[k] = int(np.prod(sl.get_shape(), dtype=np.int64)) * _ST_NAME_BYTES[sl.get_dtype()]
        index = {k: EXPORT_BASE_PREFIX + v for k, v in weight_map.items() if k != "score.weight"}
        index["score.weight"] = EXPORT_HEAD_FILE
        meta = {"format": "pt", "base_model": str(model_name)}
        meta.update({k: json.dumps(jsonable(v)) for k, v in (info or {}).items()})
        save_tensors(tmp / EXPORT_HEAD_FILE, {"score.weight": score_weight.to(torch_dtype)}, metadata=meta)
        save_json(tmp / EXPORT_INDEX_FILE, {"metadata": {"total_size": sum(sizes[k] for k in index)},
                                            "weight_map": dict(sorted(index.items()))})
        for name in EXPORT_COPIED_FILES:
            src = config if name == "config.json" else _base_file(model_name, name)
            if src is not None:
                shutil.copyfile(src, tmp / name)
        usual_permissions(tmp, 0o777)  # mkdtemp makes 0700
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)  # unlinks the old links only, never the base files they point to
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"export: wrote {out_dir} (score.weight [1, {shape[1]}] in {EXPORT_HEAD_FILE}; {len(links)} base file(s) "
          f"of {model_name} {' and '.join(sorted(set(links.values())))}ed, not copied)")
    return out_dir

