"""Files: atomic writes (temp file, then rename), checked loads (safetensors, untrusted pickles), tensors read
alone from a checkpoint (the reward head, the published reference direction), dataset splits from the hub or a
local copy, and results folders with a fallback in the system temp directory.

Imports: config.
"""
import contextlib
import hashlib
import json
import math
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import InputError, MissingFileError, all_finite, check_value

ST_DTYPES = {  # torch dtype -> safetensors dtype name
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def usual_permissions(path, mode=0o666):
    """chmod a new file to 0666 (a folder: mode=0o777) minus the umask, as open() / mkdir() would have made it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp file path beside `path`; when the block succeeds, rename it onto `path`
    (atomic: never a half-written file there). The temp file never outlives the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        usual_permissions(tmp)  # mkstemp and safetensors' save_file make 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data):
    """Write bytes to `path` through a temp file and a rename: never a half-written file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def jsonable(obj):
    """NumPy / torch / Path values -> plain Python; NaN and inf -> None (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_json(path, obj):
    """Write `obj` as indented JSON atomically (NumPy/torch values converted, NaN -> null)."""
    return atomic_write_bytes(path, (json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n").encode())


def save_tensors(path, tensors, metadata=None):
    """Save a dict of tensors as safetensors atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
    return Path(path)


def _remake(make_cmd):
    return f"; recreate it with: {make_cmd}" if make_cmd else "; recreate it"


def _check_file(path, make_cmd=None):
    """MissingFileError (one line, naming the file and make_cmd) unless `path` is a file."""
    if not Path(path).is_file():
        raise MissingFileError(f"{path} not found" + (f"; create it with: {make_cmd}" if make_cmd else ""))


def tensor_shapes(path, make_cmd=None):
    """{name: shape (list)} of the tensors of a safetensors file, from its header only (no data read).
    A missing or unreadable file raises MissingFileError / InputError naming it and make_cmd."""
    _check_file(path, make_cmd)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a corrupted or truncated file
        raise InputError(f"{path}: cannot be read as safetensors, the file is corrupted or truncated "
                         f"({e}){_remake(make_cmd)}") from None


def fingerprint(path, make_cmd=None):
    """A short hash of a safetensors file's header (every tensor's name, dtype, shape and offsets, and the metadata)
    and size: the same for the same prepared file, different for another (no tensor data read)."""
    _check_file(path, make_cmd)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = f.read(min(n, 100_000_000))
    return hashlib.sha256(header + str(os.path.getsize(path)).encode()).hexdigest()[:12]


def load_tensors(path, keys=(), make_cmd=None, allow_nan=()):
    """Load a safetensors file -> dict of tensors, checking that it exists, can be read and holds `keys`.

    make_cmd: the command that creates the file, named in the one-line error (MissingFileError for a
    missing file, InputError for a corrupted or truncated one, missing keys or NaN values).
    Floating tensors must be finite, except those named in `allow_nan` (e.g. missing scores).
    """
    path = Path(path)
    _check_file(path, make_cmd)
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a corrupted or truncated file
        raise InputError(f"{path}: cannot be read as safetensors, the file is corrupted or truncated "
                         f"({e}){_remake(make_cmd)}") from None
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise InputError(f"{path} lacks tensor(s) {missing}; it holds {sorted(tensors)}{_remake(make_cmd)}")
    for k, v in tensors.items():
        if k not in allow_nan and not all_finite(v):
            raise InputError(f"{path}: tensor {k!r} contains NaN or inf values{_remake(make_cmd)}")
    return tensors


def check_shapes(path, shapes, make_cmd=None):
    """InputError naming `path` and make_cmd unless every tensor has its expected shape.

    shapes: {name: (actual shape, expected shape with letters for free sizes)}, e.g.
    {"head": (t["head"].shape, ("F", 1))}; a letter must take the same value everywhere it appears."""
    sizes = {}
    for name, (actual, expected) in shapes.items():
        actual = tuple(actual)
        ok = len(actual) == len(expected)
        for a, e in zip(actual, expected) if ok else ():
            ok = ok and (a == sizes.setdefault(e, a) if isinstance(e, str) else a == e)
        if not ok:
            have = ", ".join(f"{n} {tuple(a)}" for n, (a, _) in shapes.items())
            want = ", ".join(f"{n} [{', '.join(map(str, e))}]" for n, (_, e) in shapes.items())
            raise InputError(f"{path}: tensor {name!r} has the wrong shape ({have}; expected {want})"
                             f"{_remake(make_cmd)}")
    return sizes


def load_metadata(path):
    """The `__metadata__` dict (str -> str) of the safetensors file at `path`."""
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def metadata_or_none(path):
    """-> safetensors __metadata__ dict of the file at path, or None when missing/unreadable."""
    try:
        return load_metadata(path)
    except Exception:
        return None


def _tensor_from_bytes(b):
    """torch.storage._load_from_bytes, restricted to tensors and plain containers."""
    import io
    return torch.load(io.BytesIO(b), weights_only=True)


_PICKLE_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): None,
                   ("torch.storage", "_load_from_bytes"): _tensor_from_bytes,
                   ("collections", "OrderedDict"): None, ("torch", "Size"): None}


def load_pickle(path):
    """Load an untrusted pickle of tensors and plain containers (lists, dicts, str, numbers): a torch.save file
    with torch.load(weights_only=True), a plain pickle.dump file with an unpickler that allows only tensor
    rebuilding. Anything else (code, arbitrary classes) is refused with an InputError."""
    import pickle
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} not found")

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in _PICKLE_ALLOWED:
                raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
            return _PICKLE_ALLOWED[(module, name)] or super().find_class(module, name)

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:
        try:
            with open(path, "rb") as f:
                return Restricted(f).load()
        except Exception as e:
            raise InputError(f"{path}: refused to load: only tensors and plain containers are read from untrusted "
                             f"pickles (torch.load(weights_only=True): {first}; restricted unpickler: {e})") from e


def _checkpoint_tensor(model_name, keys, what):
    """The first of the tensors `keys` found in a checkpoint's safetensors shard(s) (model.safetensors, or the
    shard the index names), read alone: no model load, no GPU. model_name: a local folder, or a hub id (only the
    index and the one shard are downloaded). InputError naming `what` when none is there."""
    folder = Path(model_name)
    if folder.is_dir():
        def fetch(name):
            return folder / name if (folder / name).is_file() else None
    else:
        from huggingface_hub import hf_hub_download

        def fetch(name):
            try:
                return Path(hf_hub_download(str(model_name), name))
            except Exception:
                return None
    index = fetch("model.safetensors.index.json")
    weight_map = json.loads(index.read_text())["weight_map"] if index else {}
    key = next((k for k in keys if k in weight_map), keys[0])
    shard = (fetch(weight_map[key]) if key in weight_map else None) or fetch("model.safetensors")
    if shard is None:
        raise MissingFileError(f"{model_name}: no safetensors shard holding {what} (expected "
                               "model.safetensors or model.safetensors.index.json)")
    with safe_open(str(shard), "pt") as f:
        key = next((k for k in keys if k in f.keys()), None)
        if key is None:
            raise InputError(f"{shard} has no {what} ({' or '.join(keys)})")
        return f.get_tensor(key)


def read_score_weight(model_name):
    """-> [F, 1] float32 reward head (score.weight.T) of a checkpoint, read alone from its safetensors shard."""
    weight = _checkpoint_tensor(model_name, ["score.weight"], "score.weight: not an "
                                "AutoModelForSequenceClassification reward model")
    if weight.dim() != 2 or weight.shape[0] != 1:
        raise InputError(f"expected a scalar reward head, got score.weight of shape {tuple(weight.shape)}")
    return weight.float().T.contiguous()


def read_published_reference(model_name):
    """-> [F, 1] float32: the reference direction of the published scripts, `weight[:, 0]` of the last nn.Linear in
    AutoModel(model_name).named_modules() (for a Llama reward model, which AutoModel loads without its head: the
    last layer's mlp.down_proj, not the reward head). The module tree is built on the meta device (no weights) to
    find that layer; its weight is read alone from the checkpoint's safetensors shard."""
    from transformers import AutoConfig, AutoModel
    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(model_name))
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    weight = _checkpoint_tensor(model_name, [f"{model.base_model_prefix}.{name}.weight", f"{name}.weight"],
                                f"the weight of {name}, the last linear layer of AutoModel")
    return weight[:, :1].float().contiguous()


PUBLISHED_REFERENCE = "published_reference"  # the prepared files' tensor of read_published_reference [F, 1]


def choose_reference(reference, tensors, path=None, make_cmd=None):
    """The K = 0 column and V_sft [F, 1] from a prepared file's tensors: the reward head `head` (reference="head"),
    or the published scripts' direction `published_reference` (reference="published", read_published_reference)."""
    check_value("reference", reference)
    if reference == "head":
        return tensors["head"]
    if PUBLISHED_REFERENCE not in tensors:
        raise InputError(f"{path} has no {PUBLISHED_REFERENCE} tensor (prepared before it was stored); add it with: "
                         f"{make_cmd} (the embeddings are kept, not computed again)")
    ref = tensors[PUBLISHED_REFERENCE].float()
    if ref.shape != tensors["head"].shape:
        raise InputError(f"{path}: {PUBLISHED_REFERENCE} has shape {tuple(ref.shape)}, expected "
                         f"{tuple(tensors['head'].shape)}{_remake(make_cmd)}")
    return ref


def stand_in_reference(head, seed):
    """A synthetic dataset's stand-in for the published reference direction: a random direction [F, 1] with the
    norm of `head`, unrelated to the rewards (as a column of an MLP weight is), drawn from its own generator."""
    r = torch.randn(head.shape, generator=torch.Generator().manual_seed(seed + 7919))
    return r * head.norm() / r.norm()


def script_out_dir(script_file, out_dir=None):
    """Resolve a script's output folder: `out_dir` if given, else `results/` beside the script. It is created
    when possible; one that cannot be is left to save_or_fallback (the results are not lost)."""
    path = Path(out_dir) if out_dir else Path(script_file).resolve().parent / "results"
    with contextlib.suppress(OSError):
        path.mkdir(parents=True, exist_ok=True)
    return path


def fallback_dir():
    """This process's folder for results that could not be written where asked: lore-results-<pid> in the system
    temp directory (one per process, derived from its id: no state to keep)."""
    return Path(tempfile.gettempdir()) / f"lore-results-{os.getpid()}"


def save_or_fallback(path, write):
    """write(path) with an atomic writer (e.g. lambda p: save_json(p, obj)) -> the path written.

    When that fails (OSError: folder gone, disk full, no permission, a folder in the way), the same file name
    is written to fallback_dir() instead and both are printed; None when that fails too. Results that took long
    to compute are never lost to a failed write."""
    try:
        return write(Path(path))
    except OSError as e:
        print(f"warning: could not write {path} ({e.strerror or e})", file=sys.stderr, flush=True)
    try:
        folder = fallback_dir()
        folder.mkdir(mode=0o700, exist_ok=True)
        written = write(folder / Path(path).name)
    except OSError as e:
        print(f"warning: the fallback copy in {tempfile.gettempdir()} failed too ({e.strerror or e})",
              file=sys.stderr, flush=True)
        return None
    print(f"wrote {written} instead (fallback in the system temp directory)", flush=True)
    return written


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
        raise MissingFileError(f"dataset_path {path} does not exist")
    if path.is_dir() and (path / "dataset_dict.json").exists():
        dd = datasets.load_from_disk(str(path))
        if split not in dd:
            raise InputError(f"{path} has splits {list(dd)}, not {split!r}")
        return dd[split].to_pandas()
    if path.is_dir() and (path / "state.json").exists():
        return datasets.load_from_disk(str(path)).to_pandas()
    files = [path] if path.is_file() else sorted(
        f for d in (path, path / "data") if d.is_dir() for f in d.iterdir()
        if f.name.startswith(split) and f.suffix in (".parquet", ".jsonl", ".json"))
    if not files:
        raise MissingFileError(f"no {split!r} split in {path}: expected a save_to_disk folder or "
                               f"{split}*.parquet / {split}*.jsonl files")
    frames = [pd.read_parquet(f) if f.suffix == ".parquet" else pd.read_json(f, lines=f.suffix == ".jsonl")
              for f in files]
    return pd.concat(frames, ignore_index=True)


def require_columns(df, columns, where):
    """Raise a clear error when the DataFrame `df` lacks any of `columns`."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {missing}; found {list(df.columns)}")

