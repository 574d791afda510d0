"""LoRe: personalized low-rank reward modeling (Bose et al. 2025, arXiv 2504.14439).

The method and what every dataset folder shares. A user's reward is r_i(x, y) = e(x, y)^T V w_i,
with e(x, y) [F] a frozen reward-model embedding, V [F, K] K shared basis rewards and w_i [K]
on the simplex. A comparison is stored as d = e(x, chosen) - e(x, rejected) and trained
with the Bradley-Terry likelihood sigmoid(d^T V w_i / 100). Each dataset's own code (loading,
split protocol, synthetic data) lives in its folder (PersonalLLM/personalllm.py, RedditTLDR/tldr.py,
PRISM/prism.py, PRISM/rewardbench.py) and the other papers' methods (VPL, PAL) in baselines.py; they
import this module, and this module imports none of them.

Sections, each using only the ones above it:
  1. Configuration, errors (InputError), device and process helpers, range rules
  2. File I/O: atomic writes, checked loads, dataset files
  3. Reporting: tables, results JSON and plots
  4. Preference pairs of many users (Pairs) and what a dataset loader returns (PreferenceData)
  5. Population simulation (the PersonalLLM protocol, without [N, P, F])
  6. Evaluation
  7. Fast kernels (numba on CPU) and thin products
  8. Models: LoRe, LoRe_regularized, PersonalizeBatch, PerUserBT
  9. Pipelines: run, run_regularized, run_few_shot_vary_shots
 10. Embedding extraction (batched, resumable, multi-GPU)
 11. Using a learned model: model files, PersonalizedReward, export as a Hugging Face reward model
 12. The published interface: the published helper names, each a thin wrapper over the sections above
"""

import ast
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F_nn
import torch.optim as optim  # noqa: F401  (published name: `from utils import *` gives it)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

try:  # optional: fused one-pass CPU kernels (section 7)
    import numba
except ImportError:
    numba = None

LOGIT_SCALE = 100.0  # P(chosen > rejected) = sigmoid(d^T V w / LOGIT_SCALE), as in the published code


# ----------------------------------------------------------------------------------------
# 1. Configuration, errors, device and process helpers
# ----------------------------------------------------------------------------------------

class InputError(ValueError):
    """Bad input: a setting out of its range, an unreadable or inconsistent file, impossible protocol arithmetic.
    A script ends on it with one `error: ...` line and exit status 2 (see configure); every other exception is a
    bug and keeps its traceback."""


class MissingFileError(InputError, FileNotFoundError):
    """An input file that is not there (the message names it and the command that makes it)."""


def dist_info():
    """-> (rank, world_size, local_rank): from torch.distributed if initialised, else from torchrun's env vars."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local_rank


def is_main_process():
    return dist_info()[0] == 0


def print0(*args):
    """print on the main process only (rank 0 under torchrun)."""
    if is_main_process():
        print(*args, flush=True)


def get_device(device=None):
    """The torch.device to compute on: `device` if given, else CUDA when available, else CPU.
    A CUDA device without an index gets cuda:LOCAL_RANK under torchrun, else the current CUDA device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        index = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
        device = torch.device("cuda", index)
    return device


def all_finite(t, block_floats=2**22):
    """torch.isfinite(t).all(), a block of rows at a time: no [N, F] mask (nor |t| copy) of a large tensor."""
    if not t.is_floating_point():
        return True
    flat = t.flatten(1) if t.dim() > 1 else t.reshape(-1, 1)
    rows = max(1, block_floats // max(1, flat.shape[1]))
    return all(bool(torch.isfinite(flat[i:i + rows]).all()) for i in range(0, len(flat), rows))


def set_seed(seed):
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _barrier():
    """Wait for every process of the process group (nothing to do without one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def _process_group(device):
    """Under torchrun with no process group yet, create one for the block (nccl on CUDA, else gloo) and
    destroy it afterwards; otherwise do nothing. Ranks wait for each other, so the timeout is long."""
    created = False
    if dist_info()[1] > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=24))
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


# --- range rules: one per setting, checked by check_value(s) ---

# The range of every setting of the scripts and of the core classes and pipelines (a rule of check_value).
# A baseline class of baselines.py carries the rules of its own settings (its `rules`).
RULES = {
    "K_list": "each int >= 0", "K": "int >= 0", "alpha_list": "each >= 0", "alpha": ">= 0",
    "N": "int >= 1", "N_unseen": "int >= 1", "synthetic_users": "int >= 2",
    "num_classes": "int >= 1", "num_features": "int >= 1", "num_basis_vectors": "int >= 1",
    "train_density": "in (0, 1]", "fewshot_density": "in (0, 1]", "fewshot_pool_density": "in (0, 1] or None",
    "dirichlet_alpha": "> 0", "max_train_pairs": "int >= 1 or None", "max_fewshot_pairs": "int >= 1 or None",
    "min_comparisons": "int >= 2", "protocol": "one of published paper",
    "num_iterations": "int >= 1", "learning_rate": "> 0",
    "fewshot_iterations": "int >= 0",  # 0: unseen users keep uniform weights (run says so)
    "fewshot_learning_rate": "> 0", "num_shots": "each int >= 1", "shots": "int >= 1", "trials": "int >= 1",
    "synthetic_features": "int >= 1", "synthetic_prompts": "each int >= 1",
    "weights": "one of uniform user basis all", "user": "int >= 0", "limit": "int >= 1",
    "top_k": "int >= 1", "batch_size": "int >= 1", "truncation_side": "one of left right",
    "user_split": "one of published filter_first",
    "seen_fraction": "in (0, 1)", "min_dialogs": "int >= 1", "max_length": "int >= 1",
    "validation_fraction": "in [0, 1)", "reference": "one of head published",
    "max_tokens_per_batch": "int >= 1", "shard_size": "int >= 1", "stop_after_shards": "int >= 0",
    "embedding_dtype": "one of float32 bfloat16 float16", "pairs_dtype": "one of auto float32 bfloat16",
    "shot_selection": "one of random uncertainty active (or a list)", "selection": "one of active uncertainty",
    "num_suggestions": "int >= 1",
}


def _describe(rule):
    """The words of a check_value rule: 'int >= 1' -> 'an integer >= 1', 'in (0, 1]' -> 'a number in (0, 1]'."""
    if rule.startswith("one of "):
        return "one of " + ", ".join(rule[len("one of "):].split())
    if rule == "number":
        return "a finite number"
    if rule == "bool":
        return "True or False"
    if rule.startswith("int "):
        return f"an integer {rule[4:]}"
    return f"a number {rule}"


def _passes(value, rule):
    """Does `value` satisfy the single-value rule ('int >= 1', '> 0', 'in (0, 1]', 'number', 'bool', 'one of a b')?"""
    if rule.startswith("one of "):
        return value in rule[len("one of "):].split()
    if rule == "bool":
        return isinstance(value, bool)
    is_int = rule.startswith("int ")
    rule = rule[4:] if is_int else rule
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if is_int else numbers.Real):
        return False
    if not math.isfinite(value):
        return False
    if rule == "number":
        return True
    if rule == "in (0, 1]":
        return 0 < value <= 1
    if rule == "in (0, 1)":
        return 0 < value < 1
    if rule == "in [0, 1)":
        return 0 <= value < 1
    op, bound = rule.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def check_value(name, value, rule=None):
    """Raise InputError('<name>=<value>: <why>; <what to do>') unless `value` satisfies `rule` (default RULES[name]).

    rule: ['each '] ('int ' | '') ('>= x' | '> x' | 'in (0, 1]' | 'in (0, 1)' | 'in [0, 1)' | 'number')
    [' or None'], 'bool', or 'one of a b c' [' (or a list)']. 'each': a non-empty list whose every entry satisfies
    the rest; 'or None': None is accepted too; '(or a list)': one value, or a non-empty list of them.
    """
    rule = RULES[name] if rule is None else rule
    if rule.endswith(" (or a list)"):
        rule = ("each " if isinstance(value, (list, tuple)) else "") + rule[:-len(" (or a list)")]
    if rule.endswith(" or None"):
        if value is None:
            return
        rule = rule[:-len(" or None")]
    if rule.startswith("each "):
        rule = rule[len("each "):]
        if not isinstance(value, (list, tuple)) or len(value) == 0:
            raise InputError(f"{name}={value!r}: must be a non-empty list, each entry {_describe(rule)}; "
                             f"pass {name}=[...] with such entries")
        bad = [v for v in value if not _passes(v, rule)]
        if bad:
            raise InputError(f"{name}={value!r}: the entry {bad[0]!r} is not {_describe(rule)}; "
                             f"make every entry of {name} {_describe(rule)}")
        return
    if not _passes(value, rule):
        raise InputError(f"{name}={value!r}: must be {_describe(rule)}; pass {name}=<{_describe(rule)}>")


def check_values(values, rules=None):
    """check_value for every entry of `values` ({name: value}) that `rules` (default RULES) has a rule for."""
    rules = RULES if rules is None else rules
    for name, value in values.items():
        if name in rules:
            check_value(name, value, rules[name])


# --- script configuration ---

_CONFIG_TYPES = (bool, int, float, str, list, tuple, dict, type(None))

# The type of the settings whose default is None (a script may add its own in a `_types = {name: type}` dict).
NONE_DEFAULT_TYPES = {"data_dir": str, "out_dir": str, "dataset_path": str, "device": str, "split": str,
                      "rm_head": str, "from_published": str, "stop_after_shards": int, "limit": int,
                      "num_iterations": int, "num_shots": list, "max_fewshot_pairs": int, "embedding_dtype": str}


def _normalise_argv(argv):
    """`--key value` and `--key=value` -> `key=value` (the published READMEs use flags)."""
    out, argv = [], list(argv)
    while argv:
        arg = argv.pop(0)
        if arg.startswith("--") and "=" not in arg:
            if not argv:
                raise InputError(f"{arg} needs a value")
            arg = f"{arg}={argv.pop(0)}"
        out.append(arg[2:] if arg.startswith("--") else arg)
    return out


def _in_notebook():
    """True inside a Jupyter / IPython kernel, whose sys.argv is the kernel's own, not the user's."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


def _parse_overrides(config, argv):
    """Apply the key=value overrides `argv` to `config` (a script's globals()) -> {key: value} of its config."""
    keys = {k: v for k, v in config.items()
            if not k.startswith("_") and isinstance(v, _CONFIG_TYPES) and not isinstance(v, type)}
    script_types = config.get("_types", {})
    none_types = {**NONE_DEFAULT_TYPES, **script_types}
    for arg in _normalise_argv(argv):
        if "=" not in arg:
            raise InputError(f"expected key=value, got {arg!r}. Config keys: {', '.join(keys)}")
        key, text = arg.split("=", 1)
        if key not in keys:
            raise InputError(f"unknown config key {key!r}. Config keys: {', '.join(keys)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word such as out_dir=/tmp/x
        default = keys[key]
        if default is None and value is not None and key in none_types:
            default = none_types[key]()  # check against the documented type: str(), int(), list()
            if isinstance(default, str):
                value = text  # out_dir=2024 is the folder "2024"
        ok = (default is None or (value is None and key in none_types)
              or (isinstance(script_types.get(key), tuple) and isinstance(value, script_types[key]))
              or (isinstance(default, bool) and isinstance(value, bool))
              or (isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool))
              or (isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)))
              or (not isinstance(default, (bool, float, list, tuple)) and type(value) is type(default)))
        if not ok:
            raise InputError(f"{key}={text!r} must be of type {type(default).__name__} (default {keys[key]!r})")
        if isinstance(default, float) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, list) and isinstance(value, tuple):
            value = list(value)
        print0(f"config: {key} = {value!r}")
        config[key] = keys[key] = value
    return keys


def configure(config, argv=None, *, script=None, writable=None, checks=()):
    """Apply `key=value` (or `--key value`) command-line overrides to a script's config, in place, and check it.

    config: the script's globals(); every public name bound to a bool/int/float/str/list/tuple/dict/None is a
    config key. Values are parsed as Python literals (a bare word is a string) and must keep the type of the
    default (an int is accepted for a float). A None default takes None or a value of its type in
    NONE_DEFAULT_TYPES / the script's `_types` (anything when neither names it); a tuple of types there, e.g.
    `_types = {"shot_selection": (str, list)}`, is accepted whatever the default. argv None: sys.argv[1:], or
    nothing in a notebook kernel. Every setting with a rule in RULES is range-checked (a None default also
    accepts None).
    script: the script's __file__. Given, configure also creates and test-writes the output folders `writable`
    ({key: default folder name beside the script}, e.g. {"out_dir": "results"}), runs `checks` (functions of the
    config dict that raise InputError: a dataset's or the baselines' own checks), and makes the script end on an
    InputError with one `error: ...` line (exit status 2) and on Ctrl-C with what was finished (exit status 130);
    every other exception keeps its traceback. All of it happens before any data is loaded.
    Returns {key: value} of the config, for the results JSON.
    """
    if script is not None:
        sys.excepthook = _script_excepthook
    if argv is None:
        argv = [] if _in_notebook() else sys.argv[1:]
    defaults = dict(config)
    keys = _parse_overrides(config, argv)
    check_values({k: v for k, v in keys.items() if not (v is None and defaults.get(k) is None)})
    for key, default in (writable or {}).items():
        folder = Path(keys[key]) if keys[key] else Path(script).resolve().parent / default
        _check_writable(key, folder)
    for check in checks:
        check(keys)
    return dict(keys)


def _check_writable(key, folder):
    """Create `folder` and write (and remove) a temp file there; else InputError naming the setting `key`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"{key}={folder}: cannot create or write this folder ({e.strerror or e}); "
                         f"choose a writable folder with {key}=PATH") from None


# What the running script has finished, for the Ctrl-C message: files written (atomically, so complete),
# results computed but not yet saved, and how to resume unfinished work.
_progress = {"written": [], "finished": [], "resume": None}


def note_finished(what):
    """Record a finished piece of work (a str) for the Ctrl-C message."""
    _progress["finished"].append(what)


def _interrupt_message():
    lines = ["interrupted (Ctrl-C): stopped cleanly; no half-written file is left under an output name."]
    if _progress["finished"]:
        lines.append(f"finished (printed above, not saved: results are written when the run ends): "
                     f"{', '.join(_progress['finished'])}")
    written = list(dict.fromkeys(str(p) for p in _progress["written"] if not p.parent.name.endswith(".shards")))
    lines.append(f"written: {', '.join(written)}" if written else "nothing was written.")
    if _progress["resume"]:
        lines.append(_progress["resume"])
    return "\n".join(lines)


def _script_excepthook(exc_type, exc, tb):
    """sys.excepthook of a configured script: one `error:` line (exit 2) for an InputError, what was finished for
    Ctrl-C (exit 130), the usual traceback for anything else (a bug)."""
    if issubclass(exc_type, KeyboardInterrupt):
        message, code = _interrupt_message(), 130
    elif issubclass(exc_type, InputError):
        message, code = f"error: {exc}", 2
    else:
        return sys.__excepthook__(exc_type, exc, tb)
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(code)  # after an uncaught exception Python would exit with status 1


# ----------------------------------------------------------------------------------------
# 2. File I/O: atomic writes, checked loads, dataset files
# ----------------------------------------------------------------------------------------

def _usual_permissions(path, mode=0o666):
    """chmod a new file to 0666 (a folder: mode=0o777) minus the umask, as open() / mkdir() would have made it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


@contextlib.contextmanager
def _atomic_path(path):
    """Yield a temp file path beside `path`; when the block succeeds, rename it onto `path`
    (atomic: never a half-written file there). The temp file never outlives the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        _usual_permissions(tmp)  # mkstemp and safetensors' save_file make 0600
        os.replace(tmp, path)
        _progress["written"].append(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data):
    """Write bytes to `path` through a temp file and a rename: never a half-written file."""
    with _atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def _jsonable(obj):
    """NumPy / torch / Path values -> plain Python; NaN and inf -> None (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_json(path, obj):
    """Write `obj` as indented JSON atomically (NumPy/torch values converted, NaN -> null)."""
    return atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n").encode())


def save_tensors(path, tensors, metadata=None):
    """Save a dict of tensors as safetensors atomically (temp file, then rename)."""
    with _atomic_path(path) as tmp:
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


def _read_metadata(path):
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


_fallback_dir = []  # the one folder in the system temp dir that this process writes fallback copies to


def save_or_fallback(path, write):
    """write(path) with an atomic writer (e.g. lambda p: save_json(p, obj)) -> the path written.

    When that fails (OSError: folder gone, disk full, no permission, a folder in the way), the same file name
    is written to a fresh folder in the system temp directory instead and both are printed; None when that
    fails too. Results that took long to compute are never lost to a failed write."""
    try:
        return write(Path(path))
    except OSError as e:
        print(f"warning: could not write {path} ({e.strerror or e})", file=sys.stderr, flush=True)
    try:
        if not _fallback_dir:
            _fallback_dir.append(Path(tempfile.mkdtemp(prefix="lore-results-")))
        written = write(_fallback_dir[0] / Path(path).name)
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


# ----------------------------------------------------------------------------------------
# 3. Reporting: tables, results JSON and plots
# ----------------------------------------------------------------------------------------

RESULT_NAMES = ["seen_train", "seen_test", "unseen_fewshot", "unseen_test"]


def print_table(header, rows, fmt="{:.4f}"):
    """Print a plain-text table: header [str], rows [[value, ...]]."""
    cells = [[str(h) for h in header]] + [
        [fmt.format(v) if isinstance(v, (float, np.floating)) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))


def save_plot(path, x, series, xlabel, ylabel, title, xticks=None, hlines=None):
    """Line plot with error bars, saved atomically as PNG.

    x: [n] values; series: {label: (mean [n], std [n])}; hlines: {label: (y, linestyle)} horizontal
    reference lines (methods with one value for the whole x axis).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (mean, std) in series.items():
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label)
    colors = {}
    for label, (y, style) in (hlines or {}).items():
        method = label.split(",")[0]  # one colour per method: "VPL, seen users" and "VPL, unseen users"
        colors.setdefault(method, f"C{(len(series) + len(colors)) % 10}")
        ax.axhline(y, color=colors[method], linestyle=style, linewidth=1.2, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if xticks is not None:
        ax.set_xticks(list(x))
        ax.set_xticklabels([str(t) for t in xticks])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        with _atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def _method_of(K):
    """Row label of rank K in run tables: the reference head, one Bradley-Terry reward, or LoRe."""
    return "ref" if K == 0 else "BT" if K == 1 else "LoRe"


def _summary(means, K_list, alpha_list, selection, baselines):
    """{method: {rank settings..., "seen_test", "unseen_test"}}, printed one line per method: LoRe's K (and
    alpha) from select_rank's `selection`, a swept baseline's from its "chosen" entry, never from test pairs."""
    a = alpha_list.index(selection["alpha"]) if selection else 0
    lore = [K for K in K_list if K >= 2]
    lore_K = selection["K"] if selection else lore[0] if len(lore) == 1 else None
    picks = {_method_of(K): (K, {}) for K in K_list if K <= 1}
    if lore:
        picks["LoRe"] = (lore_K, {"K": lore_K} if len(alpha_list) == 1 else {"K": lore_K, "alpha": alpha_list[a]})
    out = {}
    for method, (K, ranks) in picks.items():
        k = K_list.index(K) if K is not None else None
        out[method] = ranks if k is None else {**ranks, "seen_test": float(means[1][a, k]),
                                               "unseen_test": float(means[3][a, k])}
    for method in dict.fromkeys(e["method"] for e in baselines.values()):
        group = [e for e in baselines.values() if e["method"] == method]
        pick = [e for e in group if e.get("chosen")] or (group if len(group) == 1 else [])
        out[method] = {k: None for k in group[0].get("sweep", {})} if not pick else {
            **pick[0].get("sweep", {}), "seen_test": pick[0]["seen_test"]["mean"],
            "unseen_test": pick[0]["unseen_test"]["mean"]}
    print("\none line per method (K chosen on held-out pairs of the seen users' training data, never on test pairs): "
          "seen / unseen users' test accuracy")
    for method, acc in out.items():
        if "seen_test" not in acc:
            print(f"  {method}: not chosen (validation_fraction = 0)")
            continue
        ranks = "".join(f"{k} = {v:g}, " for k, v in acc.items() if k not in ("seen_test", "unseen_test"))
        print(f"  {method}: {ranks}{acc['seen_test']:.4f} / {acc['unseen_test']:.4f}")
    return out


def report_run(res, K_list, alpha_list, config, out_dir, name, title, extra=None, baselines=None, selection=None):
    """Print the accuracy table of a run()/run_regularized() result and write `name`.json / .png.

    res: the 8 arrays returned by run (4 means, 4 stds, each [len(alpha_list) * len(K_list)], alpha-major).
    baselines: baselines.run_baselines' {entry: {"label", "settings", "seconds", result name: {"mean", "std"}}}:
    extra table rows, the JSON's "baselines" (each entry under its name) and horizontal lines in the plot.
    selection: LoRe's rank chosen by select_rank; with the baselines' choices it makes the one-line-per-method
    summary, printed and written as the JSON's "summary".
    """
    shape = (len(alpha_list), len(K_list))
    means, stds = [np.asarray(r).reshape(shape) for r in res[:4]], [np.asarray(r).reshape(shape) for r in res[4:8]]
    rows, results = [], []
    for a, al in enumerate(alpha_list):
        for k, K in enumerate(K_list):
            rows.append([_method_of(K), f"{al:g}", K] +
                        [f"{means[r][a, k]:.4f} ± {stds[r][a, k]:.4f}" for r in range(4)])
            results.append({"alpha": al, "K": K, **{n: {"mean": means[r][a, k], "std": stds[r][a, k]}
                                                    for r, n in enumerate(RESULT_NAMES)}})
    baselines = baselines or {}
    for acc in baselines.values():
        rows.append([acc["label"], "", ""] + [f"{acc[n]['mean']:.4f} ± {acc[n]['std']:.4f}" for n in RESULT_NAMES])
    print(f"\n{title}: accuracy, mean ± std over users (K = 0: reference head, K = 1: Bradley-Terry)")
    print_table(["method", "alpha", "K"] + RESULT_NAMES, rows)
    summary = _summary(means, list(K_list), list(alpha_list), selection, baselines)
    series = {f"{label} (alpha={al:g})": (means[r][a], stds[r][a]) for a, al in enumerate(alpha_list)
              for r, label in [(1, "seen users"), (3, "unseen users")]}
    hlines = {f"{acc['label']}, {label}": (acc[key]["mean"], style) for acc in baselines.values()
              for key, label, style in [("seen_test", "seen users", ":"), ("unseen_test", "unseen users", "--")]}
    write_report(out_dir, name, {"config": config, "results": results,
                                 **({"baselines": baselines} if baselines else {}), "summary": summary,
                                 **({"selection": selection} if selection else {}), **(extra or {})},
                 lambda p: save_plot(p, list(range(len(K_list))), series, "K (0 = reference head, 1 = BT)",
                                     "test accuracy", f"{title}: accuracy vs rank", xticks=K_list, hlines=hlines))
    return results


def write_report(out_dir, name, payload, plot):
    """Write out_dir/`name`.json (payload) and `name`.png (plot(path) draws it), never losing the numbers:
    when a file cannot be written it goes to a fallback folder in the system temp dir (save_or_fallback),
    and when the JSON is not where it was asked for, the payload is also printed in full."""
    path = Path(out_dir) / f"{name}.json"
    json_path = save_or_fallback(path, lambda p: save_json(p, payload))
    if json_path != path:
        print(f"results in full ({name}.json):\n" + json.dumps(_jsonable(payload), indent=2), flush=True)
    png_path = save_or_fallback(Path(out_dir) / f"{name}.png", plot)
    print(f"wrote {json_path} and {png_path}")


def report_shots(res, num_shots, config, out_dir, name, title, K, alpha=None, skipped=None, extra=None,
                 xlabel="few-shot pairs per user", baselines=None):
    """Print and save (JSON, PNG) a run_few_shot_vary_shots result for one K (and alpha).

    res: its 4 arrays [len(num_shots)] (one alpha and one K), or with a list of shot_selection rules its dict
    {rule: 4 arrays, "full_pool": 4 arrays [1]}: then one table column, JSON entry ("results_by_selection") and
    curve per rule, the whole-pool accuracy as a line, and per rule the fewest shots whose mean unseen-test accuracy
    reaches 95% and 99% of it ("shots_to_95pct_of_full_pool", ...); "results" holds the first rule's entries.
    baselines: baselines.run_baselines_vary_shots'
    {method: {"label", "settings", "seconds", "accuracies": 4 arrays [len(num_shots)] in the same layout}}:
    extra table columns (unseen test), the JSON's "baselines" (each method under its name, its accuracies as
    "results") and extra curves in the plot.
    """
    by_rule = dict(res) if isinstance(res, dict) else {"random": res}
    full = [float(np.asarray(x).reshape(-1)[0]) for x in by_rule.pop("full_pool", [])]
    rules = {rule: [np.asarray(r).reshape(-1) for r in v[:4]] for rule, v in by_rule.items()}
    one = len(rules) == 1
    fs_m, fs_s, ts_m, ts_s = next(iter(rules.values()))
    skipped = skipped or [0] * len(num_shots)
    baselines = baselines or {}
    curves = {m: [np.asarray(r).reshape(-1) for r in b["accuracies"][:4]] for m, b in baselines.items()}
    rows = [[s] + ([f"{fs_m[j]:.4f} ± {fs_s[j]:.4f}", f"{ts_m[j]:.4f} ± {ts_s[j]:.4f}"] if one else
                   [f"{c[2][j]:.4f} ± {c[3][j]:.4f}" for c in rules.values()]) +
            [f"{c[2][j]:.4f} ± {c[3][j]:.4f}" for c in curves.values()] + [skipped[j]]
            for j, s in enumerate(num_shots)]
    print(f"\n{title}: K = {K}, accuracy mean ± std over trials"
          + ("" if set(rules) == {"random"} else " (uncertainty and active shots: one deterministic run)"))
    print_table(["shots"] + (["few-shot train", "unseen test"] if one else [f"unseen test, {r} shots" for r in rules])
                + [f"{b['label']} unseen test" for b in baselines.values()] + ["users skipped"], rows)

    def entries(fs_m, fs_s, ts_m, ts_s):
        return [{"shots": s, "fewshot_train": {"mean": fs_m[j], "std": fs_s[j]},
                 "unseen_test": {"mean": ts_m[j], "std": ts_s[j]}, "users_skipped": skipped[j]}
                for j, s in enumerate(num_shots)]
    results = entries(fs_m, fs_s, ts_m, ts_s)
    series = ({f"LoRe K = {K}, unseen users, test": (ts_m, ts_s),
               f"LoRe K = {K}, unseen users, few-shot train": (fs_m, fs_s)} if one else
              {f"LoRe K = {K}, {r} shots, unseen users, test": (c[2], c[3]) for r, c in rules.items()})
    series.update({f"{b['label']}, unseen users, test": (curves[m][2], curves[m][3]) for m, b in baselines.items()})
    json_baselines = {m: {**{k: v for k, v in b.items() if k != "accuracies"}, "results": entries(*curves[m])}
                      for m, b in baselines.items()}
    more = {} if one else {"results_by_selection": {r: entries(*c) for r, c in rules.items()}}
    if full:
        more["full_pool"] = {"fewshot_train": {"mean": full[0], "std": full[1]},
                             "unseen_test": {"mean": full[2], "std": full[3]}, "std_over": "users"}
        print(f"w fit on each user's whole few-shot pool: unseen test {full[2]:.4f} ± {full[3]:.4f} (std over users)")
        for pct in (95, 99):
            more[f"shots_to_{pct}pct_of_full_pool"] = reach = {
                r: next((s for s, m in zip(num_shots, c[2]) if m >= pct / 100 * full[2]), None)
                for r, c in rules.items()}
            print(f"{pct}% of it ({pct / 100 * full[2]:.4f}) first reached at: " + ", ".join(
                f"{r} {'not within ' + str(max(num_shots)) if s is None else s} shots" for r, s in reach.items()))
    write_report(out_dir, name, {"config": config, "K": K, "alpha": alpha, "results": results, **more,
                                 **({"baselines": json_baselines} if baselines else {}), **(extra or {})},
                 lambda p: save_plot(p, list(num_shots), series, xlabel, "accuracy",
                                     f"{title}: accuracy vs shots (K = {K})",
                                     hlines={"LoRe, whole few-shot pool": (full[2], "--")} if full else None))
    return results


# ----------------------------------------------------------------------------------------
# 4. Preference pairs of many users
# ----------------------------------------------------------------------------------------

def matmul_f32(X, V, block_floats=2**22):
    """X [n, F] @ V [F, K] -> [n, K] with float32 accumulation, V kept in float32: a half-precision X (bf16 pairs or
    embeddings) is widened a block of about block_floats values at a time, never all at once."""
    if X.dtype in (torch.float32, torch.float64):
        return X @ V.to(X.device, X.dtype)
    V = V.to(X.device, torch.float32)
    block = max(1, block_floats // max(1, X.shape[1]))
    if V.requires_grad and torch.is_grad_enabled():
        return torch.cat([X[i:i + block].float() @ V for i in range(0, len(X), block)] or [X[:0].float() @ V])
    out = torch.empty(len(X), V.shape[1], device=X.device)
    buf = torch.empty(min(block, len(X)), X.shape[1], device=X.device)  # one float32 block, reused: no heap growth
    for i in range(0, len(X), block):
        n = min(block, len(X) - i)
        buf[:n].copy_(X[i:i + n])
        torch.mm(buf[:n], V, out=out[i:i + n])
    return out


class Pairs:
    """The comparisons of C users, packed: pair j belongs to user `user[j]`.

    Either dense differences `diffs` [M, F] (d = e_chosen - e_rejected), or indices into an
    embedding table `table` [R, F] (`chosen`, `rejected` [M]) so that many users sharing the
    same responses never materialise [M, F]. `user` [M] long; pairs of a user are contiguous.
    Behaves like the published list of per-user tensors: len(pairs) = C, pairs[i] -> [m_i, F].
    """

    def __init__(self, user, num_users, diffs=None, table=None, chosen=None, rejected=None):
        self.user = torch.as_tensor(user, dtype=torch.long)
        self.num_users = int(num_users)
        self.diffs, self.table = diffs, table
        self.chosen = None if chosen is None else torch.as_tensor(chosen, dtype=torch.long)
        self.rejected = None if rejected is None else torch.as_tensor(rejected, dtype=torch.long)
        if (diffs is None) == (table is None):
            raise ValueError("Pairs needs either diffs [M, F] or table [R, F] with chosen/rejected")
        m = len(self.user)
        if diffs is not None and diffs.shape[0] != m:
            raise ValueError(f"diffs has {diffs.shape[0]} rows but user has {m}")
        if table is not None and not (len(self.chosen) == len(self.rejected) == m):
            raise ValueError("chosen, rejected and user must have the same length")
        if m and (self.user.min() < 0 or self.user.max() >= self.num_users):
            raise ValueError(f"user ids must lie in [0, {self.num_users})")

    @classmethod
    def from_list(cls, tensors):
        """From the published format: a list of C tensors [m_i, F] of differences."""
        tensors = list(tensors)
        if not tensors:
            raise InputError("no users given")
        counts = [len(t) for t in tensors]
        user = torch.repeat_interleave(torch.arange(len(tensors)), torch.tensor(counts))
        diffs = torch.cat([torch.as_tensor(t, dtype=torch.float32) for t in tensors])
        return cls(user, len(tensors), diffs=diffs)

    @classmethod
    def from_indices(cls, table, chosen_list, rejected_list):
        """From per-user index arrays into `table` [R, F]: lists of C arrays [m_i]."""
        counts = [len(c) for c in chosen_list]
        user = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        chosen = torch.cat([torch.as_tensor(np.asarray(c), dtype=torch.long) for c in chosen_list])
        rejected = torch.cat([torch.as_tensor(np.asarray(r), dtype=torch.long) for r in rejected_list])
        return cls(user, len(counts), table=table, chosen=chosen, rejected=rejected)

    @property
    def num_features(self):
        return (self.diffs if self.diffs is not None else self.table).shape[1]

    def counts(self):
        """[C] number of pairs of each user."""
        return torch.bincount(self.user, minlength=self.num_users)

    def dense(self, block_rows=2048):
        """[M, F] differences (materialised from the table if needed, in the table's dtype, a block of rows at a
        time: no [M, F] temporaries beside the result)."""
        if self.diffs is not None:
            return self.diffs
        if self.table.requires_grad:
            return self.table[self.chosen] - self.table[self.rejected]
        out = self.table.new_empty((len(self.chosen), self.table.shape[1]))
        a, b = (self.table.new_empty((min(block_rows, len(out)), self.table.shape[1])) for _ in range(2))  # reused
        for i in range(0, len(out), block_rows):
            j = min(i + block_rows, len(out))
            torch.index_select(self.table, 0, self.chosen[i:j], out=a[:j - i])
            torch.index_select(self.table, 0, self.rejected[i:j], out=b[:j - i])
            torch.sub(a[:j - i], b[:j - i], out=out[i:j])
        return out

    def sides(self):
        """(table [R, F], chosen [M], rejected [M]): both embeddings of every pair, without a copy.
        Methods that score each side on its own (VPL, PAL) need them; difference pairs cannot give them."""
        if self.table is None:
            raise InputError("this method needs the chosen and rejected embeddings separately, but these pairs hold "
                             "only differences d = e_chosen - e_rejected; build them from an embedding table with "
                             "Pairs.from_indices(table, chosen, rejected) or Pairs(user, C, table=, chosen=, "
                             "rejected=)")
        return self.table, self.chosen, self.rejected

    def project(self, V):
        """[M, K] = d^T V for every pair (float32 accumulation for bf16 pairs), without materialising [M, F] for
        table pairs."""
        if self.diffs is not None:
            return matmul_f32(self.diffs, V)
        S = matmul_f32(self.table, V)  # [R, K]
        return S[self.chosen] - S[self.rejected]

    @property
    def dtype(self):
        return (self.diffs if self.diffs is not None else self.table).dtype

    def to_dtype(self, dtype):
        """These pairs with their table (or differences) in `dtype` (the same Pairs when it is already so)."""
        if self.dtype == dtype:
            return self
        if self.diffs is not None:
            return Pairs(self.user, self.num_users, diffs=self.diffs.to(dtype))
        return Pairs(self.user, self.num_users, table=self.table.to(dtype), chosen=self.chosen,
                     rejected=self.rejected)

    def select(self, idx):
        """A Pairs of the pair rows `idx` [m] (same users)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self.diffs is not None:
            return Pairs(self.user[idx], self.num_users, diffs=self.diffs[idx])
        return Pairs(self.user[idx], self.num_users, table=self.table,
                     chosen=self.chosen[idx], rejected=self.rejected[idx])

    def _rows_of(self, users):
        """Indices of the pair rows of `users` [c], user by user in that order."""
        order = torch.argsort(self.user, stable=True)
        counts = self.counts()
        starts = torch.cumsum(counts, 0) - counts
        return [order[starts[u]:starts[u] + counts[u]] for u in torch.as_tensor(users).tolist()]

    def select_users(self, users):
        """A Pairs of the users `users` [c] only, renumbered 0..c-1 in that order."""
        rows = self._rows_of(users)
        out = self.select(torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long))
        out.user = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(r) for r in rows]))
        out.num_users = len(rows)
        return out

    def __len__(self):
        return self.num_users

    def __getitem__(self, i):
        """pairs[i] -> [m_i, F] (negative i counts from the end); pairs[a:b] -> list of tensors, as published."""
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.num_users))]
        i = int(i)
        if not -self.num_users <= i < self.num_users:
            raise IndexError(f"user {i} out of range [0, {self.num_users})")
        i %= self.num_users
        return self.select(self._rows_of([i])[0]).dense()

    def __iter__(self):
        return iter(self.to_list())

    def to_list(self):
        """The published format: list of C tensors [m_i, F]."""
        return [self.select(r).dense() for r in self._rows_of(range(self.num_users))]


def as_pairs(features):
    """Pairs from a Pairs or from a list of per-user tensors [m_i, F]."""
    return features if isinstance(features, Pairs) else Pairs.from_list(features)


def check_counts(counts):
    """Raise unless every user has a pair: counts [C] from Pairs.counts()."""
    if (counts == 0).any():
        raise InputError(f"{int((counts == 0).sum())} user(s) have no pairs")


@dataclasses.dataclass
class PreferenceData:
    """What every dataset's `load(...)` returns: the four pair sets of the protocol, the reference
    head and the rest by name.

    seen_train, seen_test: Pairs of the N seen users (users 0..N-1); unseen_fewshot, unseen_test:
    Pairs of the N_unseen unseen users (renumbered 0..N_unseen-1); head [F, 1]: the reward model's
    own head. info: user counts ("N", "N_unseen", filled in here) and dataset details (protocol,
    worker lists, few-shot dialogs, ...).
    """
    seen_train: Pairs
    seen_test: Pairs
    unseen_fewshot: Pairs
    unseen_test: Pairs
    head: torch.Tensor
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name, pairs, other in [("seen_test", self.seen_test, self.seen_train),
                                   ("unseen_test", self.unseen_test, self.unseen_fewshot)]:
            if len(pairs) != len(other):
                raise InputError(f"{name} has {len(pairs)} users, but its train / few-shot pairs have {len(other)}")
        F = self.seen_train.num_features
        if self.head.shape != (F, 1):
            raise InputError(f"head has shape {tuple(self.head.shape)}, expected ({F}, 1)")
        self.info = {"N": self.N, "N_unseen": self.N_unseen, **self.info}

    @property
    def N(self):
        """Number of seen users."""
        return len(self.seen_train)

    @property
    def N_unseen(self):
        """Number of unseen users."""
        return len(self.unseen_fewshot)

    @property
    def features(self):
        """(seen_train, seen_test, unseen_fewshot, unseen_test): the pair arguments of run / run_regularized."""
        return self.seen_train, self.seen_test, self.unseen_fewshot, self.unseen_test

    def with_dtype(self, pairs_dtype="auto"):
        """This data with its pairs' tables in `pairs_dtype`: "auto" keeps the prepared file's dtype, "float32" or
        "bfloat16" converts them (a table shared by several pair sets is converted once); info["pairs_dtype"]."""
        check_value("pairs_dtype", pairs_dtype)
        out = dataclasses.replace(self, info=dict(self.info))  # __post_init__ checks it again
        if pairs_dtype != "auto" and getattr(torch, pairs_dtype) != self.seen_train.dtype:
            print(f"pairs converted to {pairs_dtype} (the prepared files hold "
                  f"{str(self.seen_train.dtype).removeprefix('torch.')})")
            dtype, done = getattr(torch, pairs_dtype), {}
            for name in ("seen_train", "seen_test", "unseen_fewshot", "unseen_test"):
                p = getattr(out, name)
                t = p.diffs if p.diffs is not None else p.table
                done.setdefault(id(t), t.to(dtype))
                setattr(out, name, Pairs(p.user, p.num_users, diffs=done[id(t)]) if p.diffs is not None else
                        Pairs(p.user, p.num_users, table=done[id(t)], chosen=p.chosen, rejected=p.rejected))
        out.info["pairs_dtype"] = str(out.seen_train.dtype).removeprefix("torch.")
        return out


# ----------------------------------------------------------------------------------------
# 5. Population simulation (the PersonalLLM protocol, without [N, P, F])
# ----------------------------------------------------------------------------------------

def sample_population_pairs(reward_tensor, embeddings, W, sample_percentage, rng=None):
    """Memory-lean simulate_population + create_sparse_tensor: a table Pairs.

    Each user first draws int(sample_percentage * P) prompts without replacement (all of them,
    in order, when sample_percentage == 1), then takes its highest- vs lowest-scored response
    on those prompts only. Nothing of size [N, P, F] is built.
    reward_tensor [P, R, M]; embeddings [P * R, F] prompt-major; W [N, M]. Returns Pairs
    indexing `embeddings`.
    """
    rng = np.random if rng is None else rng
    reward_tensor = np.asarray(reward_tensor, dtype=np.float64)
    P, R, _ = reward_tensor.shape
    if embeddings.shape[0] != P * R:
        raise InputError(f"embeddings has {embeddings.shape[0]} rows, expected P*R = {P}*{R} = {P * R}")
    m = int(sample_percentage * P)
    chosen, rejected = [], []
    for w in np.asarray(W, dtype=np.float64):
        prompts = np.arange(P) if m == P else rng.choice(P, m, replace=False)
        scores = reward_tensor[prompts] @ w  # [m, R]
        chosen.append(prompts * R + scores.argmax(1))
        rejected.append(prompts * R + scores.argmin(1))
    return Pairs.from_indices(embeddings, chosen, rejected)


# ----------------------------------------------------------------------------------------
# 6. Evaluation
# ----------------------------------------------------------------------------------------

def accuracy_by_user(margins, user, num_users):
    """[C] per-user fraction of positive margins (a tie is wrong): margins [M], user [M]."""
    margins, user = margins.detach().float().cpu(), user.cpu()
    counts = torch.bincount(user, minlength=num_users).float()
    correct = torch.zeros(num_users).index_add_(0, user, (margins > 0).float())
    return (correct / counts).numpy()


def user_accuracies(pairs, V, W):
    """[C] accuracy of each user on its pairs: W [C, K] (or [K], shared) and V [F, K]."""
    pairs = as_pairs(pairs)
    XV = pairs.project(torch.as_tensor(V, dtype=torch.float32)).float()
    W = torch.as_tensor(W, dtype=torch.float32).to(XV.device)
    W = W.expand(pairs.num_users, -1) if W.dim() == 1 else W
    return accuracy_by_user((XV * W[pairs.user.to(XV.device)]).sum(1), pairs.user, pairs.num_users)


# ----------------------------------------------------------------------------------------
# 7. Fast kernels (numba on CPU) and thin products
# ----------------------------------------------------------------------------------------

class _ThinMatmul(torch.autograd.Function):
    """X [M, F] @ V [F, K] for a tall X and a thin V; X gets no gradient.

    On CPU (MKL) both products are memory-bound, and the layout matters: the forward reads V
    column-major (2-3x faster than row-major), and dV = (G^T X)^T is accumulated over blocks
    of rows (autograd's X^T G is ~12x slower)."""

    @staticmethod
    def forward(ctx, X, V):
        ctx.save_for_backward(X)
        if X.dtype != torch.float32:  # bf16 pairs: float32 accumulation, a block of rows widened at a time
            return matmul_f32(X, V)
        if X.is_cuda:
            return X @ V
        return X @ V.t().contiguous().t()

    @staticmethod
    def backward(ctx, G):
        (X,) = ctx.saved_tensors
        if X.is_cuda and X.dtype == torch.float32:
            return None, (G.t() @ X).t()
        Gt = G.t().contiguous().float()  # [K, M]
        dV = torch.zeros(G.shape[1], X.shape[1], dtype=torch.float32, device=X.device)
        block = max(256, 2**20 // X.shape[1])  # rows per block: about 1M floats of X
        buf = None if X.dtype == torch.float32 else torch.empty(min(block, len(X)), X.shape[1], device=X.device)
        for i in range(0, X.shape[0], block):
            x = X[i:i + block] if buf is None else buf[:min(block, len(X) - i)].copy_(X[i:i + block])
            dV.addmm_(Gt[:, i:i + block], x)
        return None, dV.t()


class _Kernel:
    """A numba kernel, called like the function it compiles.

    Its on-disk cache is used only when its module is imported under its own file name (`utils`, `baselines`):
    numba's cache refers to the module by name, so an entry written under another name (importlib, `from LoRe
    import utils`) would break every later import. When loading or writing the cache fails at a call (a broken
    or foreign cache file, an unwritable folder), it is compiled again without the cache. PyTorch's thread count
    is put back after every call: numba's OpenMP layer sets it process-wide, and every later PyTorch op would
    run with more threads than asked for."""

    def __init__(self, py_func, parallel):
        self.py_func, self.options = py_func, dict(parallel=parallel, fastmath=True)
        self.dispatcher = None
        if py_func.__module__ == Path(inspect.getfile(py_func)).stem:
            with contextlib.suppress(Exception):  # e.g. no writable cache location
                self.dispatcher = numba.njit(cache=True, **self.options)(py_func)
        if self.dispatcher is None:
            self.dispatcher = numba.njit(**self.options)(py_func)

    def __call__(self, *args):
        threads = torch.get_num_threads()
        try:
            return self.dispatcher(*args)
        except Exception:
            if isinstance(self.dispatcher._cache, numba.core.caching.NullCache):  # no cache: a real error
                raise
            self.dispatcher = numba.njit(**self.options)(self.py_func)
            return self.dispatcher(*args)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)


def cpu_kernel(py_func=None, *, parallel=True):
    """Decorator: compile a function with numba (fastmath; numba.prange loops in parallel) -> a _Kernel.
    Use it under `if numba is not None:`."""
    if py_func is None:  # @cpu_kernel(parallel=False)
        return lambda f: _Kernel(f, parallel)
    return _Kernel(py_func, parallel)


if numba is not None:
    @numba.njit(inline="always", fastmath=True)
    def _softplus_and_grad(z, pw, scale):
        """(pw softplus(-z), d/dz' of it for z = z' / scale: -pw sigmoid(-z) / scale), stable for any z."""
        e = np.exp(-abs(z))
        sig = e / (1.0 + e) if z > 0 else 1.0 / (1.0 + e)
        return pw * (np.log1p(e) + max(-z, 0.0)), -sig * pw / scale


    @cpu_kernel
    def _bt_loss_kernel(X, Vt, Wu, pw, scale):
        """One pass over X [M, F]: loss = sum_m pw_m softplus(-z_m), z_m = x_m^T V wu_m / scale,
        with dL/dV^T [K, F] and XV [M, K], g [M] (dL/dXV_m = g_m wu_m). Vt [K, F], Wu [M, K]."""
        M, F = X.shape
        K = Vt.shape[0]
        nblocks = 16  # fixed, so that the sums do not depend on the number of threads
        dVs = np.zeros((nblocks, K, F), np.float32)
        losses = np.zeros(nblocks)
        XV = np.empty((M, K), np.float32)
        g = np.empty(M, np.float32)
        for b in numba.prange(nblocks):
            for m in range(b * M // nblocks, (b + 1) * M // nblocks):
                z = 0.0
                for k in range(K):
                    s = np.float32(0.0)
                    for f in range(F):
                        s += X[m, f] * Vt[k, f]
                    XV[m, k] = s
                    z += s * Wu[m, k]
                loss, g[m] = _softplus_and_grad(z / scale, pw[m], scale)
                losses[b] += loss
                for k in range(K):
                    gk = np.float32(g[m] * Wu[m, k])
                    for f in range(F):
                        dVs[b, k, f] += gk * X[m, f]
        dVt = np.zeros((K, F), np.float32)
        for b in range(nblocks):
            dVt += dVs[b]
        return losses.sum(), dVt, XV, g


# The bf16 kernel: numba has no bfloat16 type, so a bf16 X is read as its uint16 bits and each value widened exactly
# (bits << 16 is the float32 of the same value) in registers as it is loaded. Rows go in groups of 4 against 3
# columns of V at a time (register blocking), over tiles of 512 columns that prefetch their share of the group two
# ahead (a plain numba loop reads memory far below the bandwidth). The 16 blocks are summed in order at the end:
# the same outputs for any number of threads.
if numba is not None:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    _ROWS, _TILE, _AHEAD = 4, 512, 2  # rows per group, columns per tile, groups prefetched ahead

    @intrinsic
    def _f32_from_bits(typingctx, u):
        """uint32 -> float32 with the same bits (an LLVM bitcast)."""
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))
        return types.float32(types.uint32), codegen


    @intrinsic
    def _prefetch(typingctx, addr):
        """Prefetch the cache line at byte address `addr` (intp) into all cache levels (llvm.prefetch: read,
        locality 3, data). A hint: it never faults."""
        def codegen(context, builder, sig, args):
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                "llvm.prefetch.p0")
            builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                              ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return types.void(types.intp), codegen


    @numba.njit(inline="always")
    def _widen(h):
        """bfloat16 bits (uint16) -> float32, exactly."""
        return _f32_from_bits(np.uint32(h) << np.uint32(16))


    @numba.njit(inline="always")
    def _prefetch_range(addr, nbytes):
        for o in range(0, nbytes, 64):
            _prefetch(addr + o)


    # The inner loops: 4 rows x c columns of V (c = 3, 2, 1), all accumulators in registers. x* are bf16 rows
    # (uint16 [T]), v*/d* float32 [T] (a tile of V^T's and dV^T's rows), g_rk = g_r wu_rk.

    @numba.njit(inline="always", fastmath=True)
    def _dot4x3(x0, x1, x2, x3, v0, v1, v2):
        """-> the 12 dot products x_r . v_k, r-major."""
        a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = a30 = a31 = a32 = np.float32(0.0)
        for j in range(v0.shape[0]):
            w0, w1, w2 = v0[j], v1[j], v2[j]
            y = _widen(x0[j])
            a00 += y * w0
            a01 += y * w1
            a02 += y * w2
            y = _widen(x1[j])
            a10 += y * w0
            a11 += y * w1
            a12 += y * w2
            y = _widen(x2[j])
            a20 += y * w0
            a21 += y * w1
            a22 += y * w2
            y = _widen(x3[j])
            a30 += y * w0
            a31 += y * w1
            a32 += y * w2
        return a00, a01, a02, a10, a11, a12, a20, a21, a22, a30, a31, a32


    @numba.njit(inline="always", fastmath=True)
    def _dot4x2(x0, x1, x2, x3, v0, v1):
        a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = np.float32(0.0)
        for j in range(v0.shape[0]):
            w0, w1 = v0[j], v1[j]
            y = _widen(x0[j])
            a00 += y * w0
            a01 += y * w1
            y = _widen(x1[j])
            a10 += y * w0
            a11 += y * w1
            y = _widen(x2[j])
            a20 += y * w0
            a21 += y * w1
            y = _widen(x3[j])
            a30 += y * w0
            a31 += y * w1
        return a00, a01, a10, a11, a20, a21, a30, a31


    @numba.njit(inline="always", fastmath=True)
    def _dot4x1(x0, x1, x2, x3, v0):
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for j in range(v0.shape[0]):
            w0 = v0[j]
            a0 += _widen(x0[j]) * w0
            a1 += _widen(x1[j]) * w0
            a2 += _widen(x2[j]) * w0
            a3 += _widen(x3[j]) * w0
        return a0, a1, a2, a3


    @numba.njit(inline="always", fastmath=True)
    def _axpy4x3(d0, d1, d2, x0, x1, x2, x3, g00, g01, g02, g10, g11, g12, g20, g21, g22, g30, g31, g32):
        """d_k += sum_r g_rk x_r, k < 3."""
        for j in range(d0.shape[0]):
            y0, y1, y2, y3 = _widen(x0[j]), _widen(x1[j]), _widen(x2[j]), _widen(x3[j])
            d0[j] += g00 * y0 + g10 * y1 + g20 * y2 + g30 * y3
            d1[j] += g01 * y0 + g11 * y1 + g21 * y2 + g31 * y3
            d2[j] += g02 * y0 + g12 * y1 + g22 * y2 + g32 * y3


    @numba.njit(inline="always", fastmath=True)
    def _axpy4x2(d0, d1, x0, x1, x2, x3, g00, g01, g10, g11, g20, g21, g30, g31):
        for j in range(d0.shape[0]):
            y0, y1, y2, y3 = _widen(x0[j]), _widen(x1[j]), _widen(x2[j]), _widen(x3[j])
            d0[j] += g00 * y0 + g10 * y1 + g20 * y2 + g30 * y3
            d1[j] += g01 * y0 + g11 * y1 + g21 * y2 + g31 * y3


    @numba.njit(inline="always", fastmath=True)
    def _axpy4x1(d0, x0, x1, x2, x3, g0, g1, g2, g3):
        for j in range(d0.shape[0]):
            d0[j] += g0 * _widen(x0[j]) + g1 * _widen(x1[j]) + g2 * _widen(x2[j]) + g3 * _widen(x3[j])


    @cpu_kernel
    def _bt_loss_kernel_bf16(Xu16, Vt, Wu, pw, scale):
        """_bt_loss_kernel for a bf16 X given as its bits Xu16 [M, F] (uint16): one pass over X -> loss =
        sum_m pw_m softplus(-z_m), z_m = x_m^T V wu_m / scale, with dL/dV^T [K, F], XV [M, K] and g [M]
        (dL/dXV_m = g_m wu_m). Vt [K, F], Wu [M, K] float32, pw [M]. All products accumulate in float32."""
        M, F = Xu16.shape
        K = Vt.shape[0]
        nblocks = 16  # fixed, so that the sums do not depend on the number of threads
        # np.empty, not np.zeros, and plain loops outside the prange: in a parallel function np.zeros and array
        # expressions are parallel regions too, each with a barrier, and on a loaded machine every barrier can
        # wait a scheduler time slice (the float32 kernel's 16 `dVt += dVs[b]` cost ~100 ms there).
        dVs = np.empty((nblocks, K, F), np.float32)
        losses = np.empty(nblocks)
        XV = np.empty((M, K), np.float32)
        g = np.empty(M, np.float32)
        zero = np.empty((1, F), np.uint16)  # stands in for the missing rows of a block's last group
        for f in range(F):
            zero[0, f] = 0
        base = Xu16.ctypes.data
        ntiles = 2 * ((F + _TILE - 1) // _TILE)  # per group: both passes
        tile_bytes = (_ROWS * 2 * F + ntiles - 1) // ntiles  # prefetched per tile: a group's rows are contiguous
        for b in numba.prange(nblocks):
            dV = dVs[b]
            dV[:] = 0.0
            losses[b] = 0.0
            s = np.zeros((_ROWS, K), np.float32)  # the group's x_r . v_k
            gw = np.zeros((_ROWS, K), np.float32)  # g_r wu_rk
            lo, hi = b * M // nblocks, (b + 1) * M // nblocks
            for m0 in range(lo, hi, _ROWS):
                n = min(_ROWS, hi - m0)
                x0 = Xu16[m0]
                x1 = Xu16[m0 + 1] if n > 1 else zero[0]
                x2 = Xu16[m0 + 2] if n > 2 else zero[0]
                x3 = Xu16[m0 + 3] if n > 3 else zero[0]
                ahead = min(m0 + _AHEAD * _ROWS, M)  # the group prefetched while this one is worked on
                pf, pf_end = base + 2 * F * ahead, base + 2 * F * min(ahead + _ROWS, M)
                s[:] = 0.0
                for t0 in range(0, F, _TILE):  # (1) the dot products x_r . v_k
                    t1 = min(t0 + _TILE, F)
                    _prefetch_range(pf, min(tile_bytes, pf_end - pf))
                    pf += tile_bytes
                    y0, y1, y2, y3 = x0[t0:t1], x1[t0:t1], x2[t0:t1], x3[t0:t1]
                    k = 0
                    while k < K:
                        if K - k >= 3:
                            a = _dot4x3(y0, y1, y2, y3, Vt[k, t0:t1], Vt[k + 1, t0:t1], Vt[k + 2, t0:t1])
                            for r in range(_ROWS):
                                s[r, k] += a[3 * r]
                                s[r, k + 1] += a[3 * r + 1]
                                s[r, k + 2] += a[3 * r + 2]
                            k += 3
                        elif K - k == 2:
                            c = _dot4x2(y0, y1, y2, y3, Vt[k, t0:t1], Vt[k + 1, t0:t1])
                            for r in range(_ROWS):
                                s[r, k] += c[2 * r]
                                s[r, k + 1] += c[2 * r + 1]
                            k += 2
                        else:
                            e = _dot4x1(y0, y1, y2, y3, Vt[k, t0:t1])
                            for r in range(_ROWS):
                                s[r, k] += e[r]
                            k += 1
                for r in range(_ROWS):  # (2) the loss and g of the group's rows, as in _bt_loss_kernel
                    gw[r, :] = 0.0
                    if r >= n:
                        continue
                    m = m0 + r
                    z = 0.0
                    for k in range(K):
                        XV[m, k] = s[r, k]
                        z += s[r, k] * Wu[m, k]
                    loss, g[m] = _softplus_and_grad(z / scale, pw[m], scale)
                    losses[b] += loss
                    for k in range(K):
                        gw[r, k] = np.float32(g[m] * Wu[m, k])
                for t0 in range(0, F, _TILE):  # (3) dV_k += sum_r g_r wu_rk x_r
                    t1 = min(t0 + _TILE, F)
                    _prefetch_range(pf, min(tile_bytes, pf_end - pf))
                    pf += tile_bytes
                    y0, y1, y2, y3 = x0[t0:t1], x1[t0:t1], x2[t0:t1], x3[t0:t1]
                    k = 0
                    while k < K:
                        if K - k >= 3:
                            _axpy4x3(dV[k, t0:t1], dV[k + 1, t0:t1], dV[k + 2, t0:t1], y0, y1, y2, y3,
                                     gw[0, k], gw[0, k + 1], gw[0, k + 2], gw[1, k], gw[1, k + 1], gw[1, k + 2],
                                     gw[2, k], gw[2, k + 1], gw[2, k + 2], gw[3, k], gw[3, k + 1], gw[3, k + 2])
                            k += 3
                        elif K - k == 2:
                            _axpy4x2(dV[k, t0:t1], dV[k + 1, t0:t1], y0, y1, y2, y3,
                                     gw[0, k], gw[0, k + 1], gw[1, k], gw[1, k + 1],
                                     gw[2, k], gw[2, k + 1], gw[3, k], gw[3, k + 1])
                            k += 2
                        else:
                            _axpy4x1(dV[k, t0:t1], y0, y1, y2, y3, gw[0, k], gw[1, k], gw[2, k], gw[3, k])
                            k += 1
        dVt = np.empty((K, F), np.float32)
        loss = 0.0
        for b in range(nblocks):  # in order (losses.sum() would be a parallel reduction, its order the schedule's)
            loss += losses[b]
            for k in range(K):
                for f in range(F):
                    dVt[k, f] = dVs[b, k, f] if b == 0 else dVt[k, f] + dVs[b, k, f]
        return loss, dVt, XV, g


class _FusedBTLoss(torch.autograd.Function):
    """sum_m pw_m softplus(-x_m^T V wu_m / 100) and its gradients in one pass over X (CPU, numba); a bf16 X goes
    through _bt_loss_kernel_bf16 (its bits as uint16), every product accumulated in float32."""

    @staticmethod
    def forward(ctx, X, V, Wu, pw):
        kernel, Xn = ((_bt_loss_kernel_bf16, X.view(torch.int16).numpy().view(np.uint16))
                      if X.dtype == torch.bfloat16 else (_bt_loss_kernel, X.numpy()))
        loss, dVt, XV, g = kernel(Xn, V.detach().t().contiguous().numpy(), Wu.detach().contiguous().numpy(),
                                  pw.contiguous().numpy(), LOGIT_SCALE)
        XV, g = torch.from_numpy(XV), torch.from_numpy(g)
        ctx.save_for_backward(torch.from_numpy(dVt).t(), g[:, None] * XV)
        return torch.tensor(loss, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        dV, dWu = ctx.saved_tensors
        return None, grad * dV, grad * dWu, None


def _bt_loss(X, V, Wu, pw):
    """sum_m pw_m * softplus(-x_m^T V wu_m / 100) for X [M, F] (float32 or bf16), V [F, K], Wu [M, K], pw [M].

    On CPU with numba installed, one fused pass over X computes the loss and both gradients
    (the memory-bandwidth floor); otherwise forward and backward are two thin products."""
    if numba is not None and not X.is_cuda and X.dtype in (torch.float32, torch.bfloat16) and X.is_contiguous():
        return _FusedBTLoss.apply(X, V, Wu, pw)
    z = (_ThinMatmul.apply(X, V) * Wu).sum(1) / LOGIT_SCALE
    return (F_nn.softplus(-z) * pw).sum()


# ----------------------------------------------------------------------------------------
# 8. Models: LoRe, LoRe_regularized, PersonalizeBatch, PerUserBT
# ----------------------------------------------------------------------------------------

def _pack(X, device):
    """(diffs [M, F], user [M], counts [C]) on `device` from a list of tensors or a Pairs. Half-precision pairs
    (bf16) stay so: d = e_c - e_r is computed in float32 from the table rows and rounded once; every product with
    them accumulates in float32 (matmul_f32, the bf16 kernel)."""
    pairs = as_pairs(X)
    dtype = pairs.dtype if pairs.dtype in (torch.bfloat16, torch.float16) else torch.float32
    return pairs.dense().to(device, dtype), pairs.user.to(device), pairs.counts().to(device)


def _user_logits(XV, W, user):
    """[M] logits d^T V w_user / 100 from XV [M, K] and simplex weights W [C, K]."""
    return (XV * W[user]).sum(1) / LOGIT_SCALE


def _train_mode_call(X):
    """Keep nn.Module.train(mode) working: .train(), .train(True/False) -> PyTorch semantics."""
    return X is None or isinstance(X, bool)


class LoRe(nn.Module):
    """Joint fit of the basis V [F, K] and user weights W [C, K] (published `run` variant).

    Loss: sum over users of that user's mean -log sigmoid(d^T V w_i / 100), plus
    alpha * sum_j ||V_j - V_sft||^2. Init V ~ randn(F, K), W logits ~ randn(C, K); one Adam
    over both. `.train(X)` fits and returns (W [C, K] on the simplex, V [F, K]).
    """

    def __init__(self, V_sft, alpha, num_classes, num_features, num_basis_vectors,
                 num_iterations=1000, learning_rate=0.5):
        super().__init__()
        check_values(dict(alpha=alpha, num_classes=num_classes, num_features=num_features,
                          num_basis_vectors=num_basis_vectors, num_iterations=num_iterations,
                          learning_rate=learning_rate))
        self.V_sft = None if V_sft is None else torch.as_tensor(V_sft, dtype=torch.float32).reshape(num_features, -1)
        self.alpha, self.num_classes = float(alpha), num_classes
        self.num_features, self.K = num_features, num_basis_vectors
        self.num_iterations, self.learning_rate = num_iterations, learning_rate
        self.V = nn.Parameter(torch.randn(num_features, num_basis_vectors))
        self.W = nn.Parameter(self._init_logits(num_classes, num_basis_vectors))
        self.losses = []

    @staticmethod
    def _init_logits(C, K):
        return torch.randn(C, K)

    def weights(self):
        """[C, K] user weights on the simplex."""
        return torch.softmax(self.W, dim=1)

    def forward(self, X, user=None):
        """Packed: forward(diffs [M, F], user [M]) -> [M] logits d^T V w_user / 100.
        Published: forward(X), X a list of C per-user tensors [m_i, F] (or Pairs) -> (nll, reg), the two loss
        terms: the sum over users of their mean -log sigmoid, and alpha * sum_j ||V_j - V_sft||^2."""
        if user is not None:
            return _user_logits(_ThinMatmul.apply(X, self.V), self.weights(), user)
        diffs, user, counts = _pack(X, self.V.device)
        return (F_nn.softplus(-self.forward(diffs, user)) / counts[user]).sum(), self.penalty()

    def penalty(self):
        """alpha * sum_j ||V_j - V_sft||^2 (each column against V_sft [F, 1]); 0 without alpha or V_sft."""
        if not self.alpha or self.V_sft is None:
            return torch.zeros((), device=self.V.device)
        return self.alpha * ((self.V - self.V_sft.to(self.V.device)) ** 2).sum()

    def loss(self, diffs, user, counts):
        """Scalar training loss (packed, no loop over users)."""
        return _bt_loss(diffs, self.V, self.weights()[user], 1.0 / counts[user]) + self.penalty()

    def train(self, X=None, device=None):
        """Fit on X (list of C tensors [m_i, F] or Pairs) -> (W [C, K], V [F, K]).
        With no data (or a bool) this is nn.Module.train(mode)."""
        if _train_mode_call(X):
            return super().train(True if X is None else X)
        device = get_device(device)
        diffs, user, counts = _pack(X, device)
        self._check(diffs, counts)
        self.to(device)
        opt = torch.optim.Adam(self.parameters(), lr=self.learning_rate)
        bar = tqdm(range(self.num_iterations), desc=f"LoRe K={self.K}", leave=False, disable=None)
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            loss = self.loss(diffs, user, counts)
            loss.backward()
            opt.step()
            self.losses.append(loss.item())
        return self.weights().detach(), self.V.detach()

    def _check(self, diffs, counts):
        if diffs.shape[1] != self.num_features:
            raise InputError(f"pairs have {diffs.shape[1]} features, the model expects {self.num_features}")
        if len(counts) != self.num_classes:
            raise InputError(f"got {len(counts)} users, the model was built for num_classes={self.num_classes}")
        check_counts(counts)
        if not all_finite(diffs):
            raise InputError("pairs contain NaN or inf")


class LoRe_regularized(LoRe):
    """Joint fit with a cosine pull towards the reference head (published `run_regularized`).

    Loss: mean -log sigmoid over all pairs pooled. Init V ~ randn, W logits ~ U[0, 1).
    Each iteration: an Adam step on W with V frozen (no regulariser), then an Adam step on V
    with alpha_t * mean_j (1 - cos(V_j, V_sft)); alpha_t is 0 for the first 20% of steps,
    ramps linearly to alpha by 80%, then stays. Afterwards basis j is kept only if some user
    puts weight >= 1e-2 on it; `.train(X)` returns (W [C, K'] renormalised, V [F, K']).
    """
    keep_threshold = 1e-2

    @staticmethod
    def _init_logits(C, K):
        return torch.rand(C, K)

    def alpha_at(self, t):
        """Regulariser weight at iteration t."""
        frac = t / max(self.num_iterations, 1)
        return self.alpha * min(max((frac - 0.2) / 0.6, 0.0), 1.0)

    def regulariser(self):
        """mean_j (1 - cos(V_j, V_sft))."""
        v = self.V_sft.to(self.V.device).expand_as(self.V)
        return (1 - F_nn.cosine_similarity(self.V, v, dim=0)).mean()

    def forward(self, X, alpha_curr=None):
        """Packed: forward(diffs [M, F], user [M] long) -> [M] logits.
        Published: forward(X, alpha_curr), X a list of per-user tensors [m_i, F] (or Pairs) -> (nll, reg): the mean
        -log sigmoid over all pairs pooled, and alpha_curr * mean_j (1 - cos(V_j, V_sft)) (alpha_curr None: alpha)."""
        if isinstance(alpha_curr, torch.Tensor) and alpha_curr.dim() == 1 and not alpha_curr.is_floating_point():
            return super().forward(X, alpha_curr)
        diffs, user, _ = _pack(X, self.V.device)
        nll = F_nn.softplus(-super().forward(diffs, user)).mean()
        alpha_curr = self.alpha if alpha_curr is None else alpha_curr
        reg = alpha_curr * self.regulariser() if self.V_sft is not None else torch.zeros((), device=self.V.device)
        return nll, reg

    def train(self, X=None, device=None):
        if _train_mode_call(X):
            return nn.Module.train(self, True if X is None else X)
        device = get_device(device)
        diffs, user, counts = _pack(X, device)
        self._check(diffs, counts)
        self.to(device)
        opt_W = torch.optim.Adam([self.W], lr=self.learning_rate)
        opt_V = torch.optim.Adam([self.V], lr=self.learning_rate)
        use_reg = self.alpha > 0 and self.V_sft is not None
        pooled = torch.full((len(user),), 1.0 / len(user), device=device)  # mean over all pairs
        bar = tqdm(range(self.num_iterations), desc=f"LoRe_regularized K={self.K}", leave=False, disable=None)
        for t in bar:
            with torch.no_grad():
                XV = _ThinMatmul.apply(diffs, self.V)  # [M, K]
            opt_W.zero_grad(set_to_none=True)
            F_nn.softplus(-_user_logits(XV, self.weights(), user)).mean().backward()
            opt_W.step()
            opt_V.zero_grad(set_to_none=True)
            loss = _bt_loss(diffs, self.V, self.weights().detach()[user], pooled)
            if use_reg:
                loss = loss + self.alpha_at(t) * self.regulariser()
            loss.backward()
            opt_V.step()
            self.losses.append(loss.item())
        W = self.weights().detach()
        keep = W.max(0).values >= self.keep_threshold
        self.kept = keep.cpu()
        W = W[:, keep]
        return W / W.sum(1, keepdim=True), self.V.detach()[:, keep]


class PersonalizeBatch(nn.Module):
    """Few-shot weights of C new users on a frozen basis V [F, K].

    Logits start at 0 (uniform w); loss is the sum over users of their mean -log sigmoid,
    so every user's weights follow their own Adam trajectory. `.train(X, V)` returns a list
    of C simplex weight vectors [K].
    """

    def __init__(self, num_classes, num_features, num_basis_vectors, num_iterations=500, learning_rate=0.1):
        super().__init__()
        check_values(dict(num_classes=num_classes, num_features=num_features, num_basis_vectors=num_basis_vectors))
        check_value("num_iterations", num_iterations, RULES["fewshot_iterations"])  # 0: uniform weights
        check_value("learning_rate", learning_rate, RULES["fewshot_learning_rate"])
        self.num_classes, self.num_features, self.K = num_classes, num_features, num_basis_vectors
        self.num_iterations, self.learning_rate = num_iterations, learning_rate
        self.W = nn.Parameter(torch.zeros(num_classes, num_basis_vectors))
        self.losses = []

    def weights(self):
        """[C, K] weights on the simplex."""
        return torch.softmax(self.W, dim=1)

    def _project(self, X, V):
        """(Pairs of X, XV [M, K] = d^T V): V is frozen, so project once."""
        pairs = as_pairs(X)
        if len(pairs) != self.num_classes:
            raise InputError(f"got {len(pairs)} users, expected num_classes={self.num_classes}")
        V = torch.as_tensor(V, dtype=torch.float32)
        if V.shape != (self.num_features, self.K):
            raise InputError(f"V has shape {tuple(V.shape)}, expected ({self.num_features}, {self.K})")
        return pairs, pairs.project(V).float()

    def forward(self, X, V):
        """Loss at the current weights: the sum over users of their mean -log sigmoid(d^T V w_i / 100).
        X: list of C per-user tensors [m_i, F] (or Pairs); V [F, K] frozen."""
        pairs, XV = self._project(X, V)
        XV, user, counts = XV.to(self.W.device), pairs.user.to(self.W.device), pairs.counts().to(self.W.device)
        return (F_nn.softplus(-_user_logits(XV, self.weights(), user)) / counts[user]).sum()

    def train(self, X=None, V=None, device=None):
        if _train_mode_call(X):
            return super().train(True if X is None else X)
        if V is None:
            raise InputError("PersonalizeBatch.train(X, V) needs the basis V [F, K]")
        pairs, XV = self._project(X, V)
        counts = pairs.counts()
        check_counts(counts)
        return self._fit(XV, pairs.user, 1.0 / counts[pairs.user].float(), device)

    def _fit(self, XV, user, pw, device=None):
        """Minimise sum_m pw_m softplus(-XV_m w_user_m / 100) over the weights -> list of C simplex vectors [K]."""
        device = get_device(device)
        XV, user, pw = XV.to(device), user.to(device), pw.to(device, torch.float32)
        self.to(device)
        opt = torch.optim.Adam([self.W], lr=self.learning_rate)
        for _ in range(self.num_iterations):
            opt.zero_grad(set_to_none=True)
            loss = (F_nn.softplus(-_user_logits(XV, self.weights(), user)) * pw).sum()
            loss.backward()
            opt.step()
            self.losses.append(loss.item())
        return list(self.weights().detach())


def personalize_users(pairs, V, num_iterations=500, learning_rate=0.1, device=None):
    """[C, K] few-shot simplex weights of the users of `pairs` on a frozen basis V [F, K] (PersonalizeBatch)."""
    pairs = as_pairs(pairs)
    V = torch.as_tensor(V)
    model = PersonalizeBatch(len(pairs), V.shape[0], V.shape[1], num_iterations, learning_rate)
    return torch.stack(model.train(pairs, V, device=device))


# --- which comparisons to ask a new user (the published protocol draws them at random) ---
# With V frozen a new user is K numbers, so a candidate matters only through x = (e_a - e_b)^T V [K] (the pool is
# projected once). The rules see x in either orientation and the answers so far, never those of unasked candidates.

PRIOR_SCALE = 3.0  # s: the prior N(0, s^2 I) of a new user's K logits u (w = softmax(u)) in laplace_posterior


def _sigmoid_np(z):
    return np.exp(-np.logaddexp(0.0, -z))


def _entropy_np(p):  # binary entropy h(p) = -p log p - (1 - p) log(1 - p), nats
    return -(p * np.log(np.maximum(p, 1e-300)) + (1 - p) * np.log1p(-p))


def _logits_and_grads(X, u):
    """(w = softmax(u) [K], z = X w / 100 [n], G [n, K] rows g = dz/du = w * (x - x^T w) / 100) for rows X [n, K]."""
    w = np.exp(u - u.max())
    w /= w.sum()
    z = X @ w / LOGIT_SCALE
    return w, z, w * (X / LOGIT_SCALE - z[:, None])


def _posterior_terms(u, X, prior_prec):
    """(-log posterior, gradient, Gauss-Newton Hessian, exact Hessian) of laplace_posterior at u [K], prior_prec =
    I / s^2. The exact Hessian adds -sum_i sigmoid(-z_i) d2z_i/du2, where d2z_i/du2 = diag(g_i) - g_i w^T - w g_i^T."""
    w, z, G = _logits_and_grads(X, u)
    rg = _sigmoid_np(-z) @ G
    H_gn = (G * (_sigmoid_np(-z) * _sigmoid_np(z))[:, None]).T @ G + prior_prec
    H = H_gn - np.diag(rg) + rg[:, None] * w + w[:, None] * rg
    return np.logaddexp(0.0, -z).sum() + 0.5 * u @ prior_prec @ u, prior_prec @ u - rg, H_gn, H


def laplace_posterior(X, prior_scale=PRIOR_SCALE, max_steps=100):
    """Laplace posterior N(u_map, Sigma) of a new user's logits u [K] (w = softmax(u)) -> (u_map [K], Sigma [K, K])
    from the comparisons answered so far, X [m, K] rows d^T V oriented preferred minus other (m = 0: the prior).
    Model: u ~ N(0, s^2 I), P(answer | u) = sigmoid(z), z = x^T softmax(u) / 100 (the few-shot fit's likelihood).
    u_map: damped Newton from u = 0 (exact Hessian where positive definite, else Gauss-Newton; Armijo steps).
    Sigma = (I / s^2 + sum_i lam_i g_i g_i^T)^-1 at u_map, the Gauss-Newton precision, with g_i = dz_i/du =
    w * (x_i - x_i^T w) / 100 and lam_i = sigmoid(z_i) sigmoid(-z_i)."""
    X = np.asarray(X, dtype=np.float64).reshape(-1, np.shape(X)[-1])
    u, prior_prec = np.zeros(X.shape[1]), np.eye(X.shape[1]) / prior_scale ** 2
    loss, grad, H_gn, H = _posterior_terms(u, X, prior_prec)
    for _ in range(max_steps if len(X) else 0):
        try:
            np.linalg.cholesky(H)
        except np.linalg.LinAlgError:
            H = H_gn  # the exact Hessian is not positive definite here: a Gauss-Newton step
        step, t = np.linalg.solve(H, grad), 1.0
        while (new := _posterior_terms(u - t * step, X, prior_prec))[0] > loss - 1e-4 * t * (grad @ step):
            t /= 2  # Armijo backtracking; no decrease along the step: at the optimum up to round-off
            if t < 1e-10:
                return u, np.linalg.inv(H_gn)
        u, (loss, grad, H_gn, H) = u - t * step, new
        if np.abs(t * step).max() < 1e-8:
            break
    return u, np.linalg.inv(H_gn)


def _logistic_mixture(J=10):
    """(a [J], b [J]): sigmoid'(z) ~ sum_j a_j b_j phi(b_j z), a scale mixture of normal densities fit by least
    squares on z in [-60, 60] (b_j geometric in [0.2, 1.5], sum(a) = 1). Integrating, sigmoid(z) ~ sum_j a_j Phi(b_j z)
    and, as d h(sigmoid(z))/dz = -z sigmoid'(z), h(sigmoid(z)) ~ sum_j (a_j / b_j) phi(b_j z), both within 1e-6."""
    b, z = np.geomspace(0.2, 1.5, J), np.linspace(-60.0, 60.0, 24001)
    a = np.linalg.lstsq(np.exp(-0.5 * np.outer(z, b) ** 2) * b / np.sqrt(2 * np.pi),
                        _sigmoid_np(z) * _sigmoid_np(-z), rcond=None)[0]
    return a / a.sum(), b


_MIX_A, _MIX_B = _logistic_mixture()


def expected_information(mu, var):
    """[n] mutual information I(y; z) = h(E[sigmoid(z)]) - E[h(sigmoid(z))] (nats) between y ~ Bernoulli(sigmoid(z))
    and z ~ N(mu, var), mu, var [n]; in closed form through _logistic_mixture, with c_j = (1 + b_j^2 var)^-1/2:
    E[sigmoid(z)] = sum_j a_j Phi(b_j c_j mu) and E[h(sigmoid(z))] = sum_j (a_j / b_j) c_j phi(b_j c_j mu)."""
    c = 1.0 / np.sqrt(1.0 + np.outer(var, _MIX_B ** 2))
    x = c * np.outer(np.abs(mu), _MIX_B)  # h is symmetric, so |mu|: Phi(-x) is the smaller side, no cancellation
    p = torch.special.ndtr(torch.from_numpy(-x)).numpy() @ _MIX_A
    return np.maximum(_entropy_np(p) - (c * np.exp(-0.5 * x ** 2)) @ (_MIX_A / _MIX_B) / np.sqrt(2 * np.pi), 0.0)


def comparison_scores(X, u, Sigma, rule="active"):
    """[n] value of asking each candidate X [n, K] (rows x = d^T V, either orientation: both scores are even in x)
    under the posterior N(u, Sigma) of laplace_posterior, with w = softmax(u) and z = x^T w / 100:
      "uncertainty": h(sigmoid(z)), the entropy of the predicted answer: largest where it is nearest 0.5;
      "active": the expected information gain of the answer about u (BALD), with z linearised around u so that
          z ~ N(x^T w / 100, g^T Sigma g), g = w * (x - x^T w) / 100:  I = h(E[sigmoid(z)]) - E[h(sigmoid(z))]."""
    _, z, G = _logits_and_grads(X, u)
    if rule == "uncertainty":
        return _entropy_np(_sigmoid_np(-np.abs(z)))
    return expected_information(z, np.maximum(((G @ Sigma) * G).sum(1), 0.0))


def select_comparisons(X, k=1, *, rule="active", known=None, exclude=(), groups=None, prior_scale=PRIOR_SCALE):
    """The k candidates to ask next, best first -> list of k candidate (unit) indices.
    X [n, K]: the candidates projected once, x = (e_a - e_b)^T V, in either orientation. groups [n]: the unit of each
    row, 0..U-1 (e.g. a dialog, whose answer reveals all its pairs; None: each row its own), scored by the sum over
    its rows. known [m, K]: the answers so far, rows preferred minus other; exclude: units already asked (never
    returned). Scores: comparison_scores under laplace_posterior(known); ties go to the lowest index. k > 1 with
    "active" is greedy: after each pick Sigma^-1 gains the unit's expected Fisher information sum_i lam_i g_i g_i^T
    (it does not depend on the answers) and the rest are rescored."""
    check_value("selection", rule)
    X = np.asarray(X, dtype=np.float64)
    groups = np.arange(len(X)) if groups is None else np.asarray(groups)
    if X.ndim != 2 or not np.isfinite(X).all() or groups.shape != (len(X),):
        raise InputError(f"candidates must be a finite [n, K] array with one group id per row, got {X.shape}")
    free = np.ones(int(groups.max()) + 1 if len(groups) else 0, dtype=bool)
    free[np.asarray(list(exclude), dtype=np.int64)] = False
    if not 1 <= k <= free.sum():
        raise InputError(f"k={k}: must lie in [1, {free.sum()}], the candidates not yet asked")
    u, Sigma = laplace_posterior(np.zeros((0, X.shape[1])) if known is None else known, prior_scale)
    picks = []
    for _ in range(k):
        score = np.where(free, np.bincount(groups, comparison_scores(X, u, Sigma, rule), len(free)), -np.inf)
        picks.append(int(np.argmax(score)))
        free[picks[-1]] = False
        if rule == "active" and len(picks) < k:
            _, z, G = _logits_and_grads(X[groups == picks[-1]], u)
            Sigma = np.linalg.inv(np.linalg.inv(Sigma) + (G * (_sigmoid_np(z) * _sigmoid_np(-z))[:, None]).T @ G)
    return picks


def choose_shots(X, shots, answer, rule="active", *, groups=None, prior_scale=PRIOR_SCALE):
    """Ask `shots` units one at a time (select_comparisons, the posterior refit after each answer) -> the unit indices
    in the order asked; X, groups as there. answer(rows) -> [len(rows)] +1 (side a preferred) or -1, called with the
    rows of the unit just asked only. The first n choices do not depend on `shots` (a larger count extends them)."""
    X = np.asarray(X, dtype=np.float64)
    groups = np.arange(len(X)) if groups is None else np.asarray(groups)
    asked, known = [], np.zeros((0, X.shape[1]))
    for _ in range(shots):
        asked += select_comparisons(X, 1, rule=rule, known=known, exclude=asked, groups=groups,
                                    prior_scale=prior_scale)
        rows = np.flatnonzero(groups == asked[-1])
        y = np.asarray(answer(rows), dtype=np.float64).reshape(-1)
        if y.shape != rows.shape or not np.isin(y, (-1, 1)).all():
            raise InputError(f"answer(rows) must give one +1 or -1 per row ({len(rows)}), got {y!r:.100}")
        known = np.concatenate([known, X[rows] * y[:, None]])
    return asked


if numba is not None:
    @cpu_kernel
    def _per_user_bt_kernel(table, chosen, rejected, two_sided, order, starts, counts, iterations, lr, scale):
        """[c, F] per-user BT rewards: user u's pairs are rows order[starts[u]:starts[u] + counts[u]], with
        d = table[chosen] - table[rejected] (two_sided) or table[chosen]; full-batch Adam (PyTorch's update,
        betas 0.9, 0.999, eps 1e-8) on mean softplus(-d^T v / scale), from v = 0."""
        c, F = len(starts), table.shape[1]
        V = np.zeros((c, F), np.float32)
        for u in numba.prange(c):
            m = counts[u]
            D = np.empty((m, F), np.float32)
            for j in range(m):
                r = order[starts[u] + j]
                if two_sided:
                    D[j] = table[chosen[r]] - table[rejected[r]]
                else:
                    D[j] = table[chosen[r]]
            v = np.zeros(F, np.float32)
            m1 = np.zeros(F, np.float32)
            m2 = np.zeros(F, np.float32)
            g = np.empty(m, np.float32)
            grad = np.empty(F, np.float32)
            for t in range(1, iterations + 1):
                for j in range(m):
                    z = np.float32(0.0)
                    for f in range(F):
                        z += D[j, f] * v[f]
                    g[j] = -1.0 / (1.0 + np.exp(z / scale)) / (m * scale)  # -sigmoid(-z / scale) / (m scale)
                grad[:] = 0.0
                for j in range(m):
                    for f in range(F):
                        grad[f] += g[j] * D[j, f]
                step = lr / (1.0 - 0.9 ** t)
                root_bc2 = np.sqrt(1.0 - 0.999 ** t)
                for f in range(F):
                    m1[f] = 0.9 * m1[f] + 0.1 * grad[f]
                    m2[f] = 0.999 * m2[f] + 0.001 * grad[f] * grad[f]
                    v[f] -= step * m1[f] / (np.sqrt(m2[f]) / root_bc2 + 1e-8)
            V[u] = v
        return V

    @cpu_kernel
    def _per_user_margins_kernel(table, chosen, rejected, user, V):
        """[M] (table[chosen] - table[rejected]) . V[user], one pass over the pairs."""
        M, F = len(user), table.shape[1]
        out = np.empty(M, np.float32)
        for j in numba.prange(M):
            c, r, u = chosen[j], rejected[j], user[j]
            s = np.float32(0.0)
            for f in range(F):
                s += (table[c, f] - table[r, f]) * V[u, f]
            out[j] = s
        return out


class PerUserBT(nn.Module):
    """One independent Bradley-Terry reward per user, r_i(x) = e(x)^T v_i with v_i [F]: the published
    `learn_multiple`, and the per-user baseline of the paper's tables (baselines.py lists it with VPL and PAL).

    Loss of user i: mean over its pairs of softplus(-d^T v_i / logit_scale); v_i starts at 0
    (the loss is convex; a random start would leave noise in the directions no pair touches);
    full-batch Adam (PyTorch's update). Users share nothing and Adam is per coordinate, so
    fitting users together equals fitting them one by one. On CPU with numba, one kernel fits
    each user's whole Adam run on its [m_i, F] pairs while they sit in cache (users in
    parallel); otherwise (GPU, or no numba) users are fit in padded chunks [c, m_max, F] of
    about `chunk_floats` values. Table pairs are gathered user by user: no [M, F] copy.
    num_features (checked against the pairs when given) and seed (nothing here is random) make the
    constructor the same as every baseline's. After `fit`, V [C, F].
    """
    label = "per-user BT"
    rules = {"num_iterations": "int >= 1", "learning_rate": "> 0", "logit_scale": "> 0", "chunk_floats": "int >= 1"}

    def __init__(self, num_features=None, num_iterations=1000, learning_rate=0.01, logit_scale=LOGIT_SCALE,
                 chunk_floats=2**26, seed=0):
        super().__init__()
        check_values(locals(), self.rules)
        self.num_features, self.num_iterations, self.learning_rate = num_features, num_iterations, learning_rate
        self.logit_scale, self.chunk_floats = logit_scale, chunk_floats
        self.V = None

    def _fit(self, pairs, device):
        """[C, F] rewards fit on `pairs`, one per user."""
        pairs = as_pairs(pairs)
        if self.num_features is not None and pairs.num_features != self.num_features:
            raise InputError(f"pairs have {pairs.num_features} features, the model expects {self.num_features}")
        device = get_device(device)
        counts = pairs.counts()
        check_counts(counts)
        if numba is not None and device.type == "cpu":
            V = self._fit_kernel(pairs, counts)
        else:
            V = self._fit_chunks(pairs, counts, device)
        if not torch.isfinite(V).all():  # checked on the result: no [R, F] mask of a large table
            raise InputError("pairs contain NaN or inf: the fitted rewards are not finite")
        return V

    def _fit_kernel(self, pairs, counts):
        """The numba path: users in parallel, each user's pairs gathered once into a [m_i, F] buffer."""
        if pairs.table is not None:
            table, chosen, rejected, two_sided = pairs.table, pairs.chosen, pairs.rejected, True
        else:
            table, chosen, two_sided = pairs.diffs, torch.arange(len(pairs.user)), False
            rejected = chosen
        table = table.float().contiguous().numpy()
        order = torch.argsort(pairs.user, stable=True).numpy()
        starts = (torch.cumsum(counts, 0) - counts).numpy()
        counts = counts.numpy()
        V = torch.zeros(pairs.num_users, pairs.num_features)
        step = 64  # users per kernel call: a progress bar without a visible cost
        bar = tqdm(total=pairs.num_users, desc="per-user BT", leave=False, disable=None)
        for s in range(0, pairs.num_users, step):
            V[s:s + step] = torch.from_numpy(_per_user_bt_kernel(
                table, chosen.numpy(), rejected.numpy(), two_sided, order, starts[s:s + step], counts[s:s + step],
                self.num_iterations, self.learning_rate, self.logit_scale))
            bar.update(len(counts[s:s + step]))
        bar.close()
        return V

    def _fit_chunks(self, pairs, counts, device):
        """The PyTorch path: chunks of users sorted by pair count, padded to [c, m_max, F]; one Adam per chunk."""
        rows = pairs._rows_of(range(pairs.num_users))
        F = pairs.num_features
        chunks, cur = [], []
        for u in torch.argsort(counts, stable=True).tolist():  # ascending: padded size (len + 1) * counts[u] * F
            if cur and (len(cur) + 1) * int(counts[u]) * F > self.chunk_floats:
                chunks.append(cur)
                cur = []
            cur.append(u)
        chunks.append(cur)
        V = torch.zeros(pairs.num_users, F)
        bar = tqdm(total=len(chunks) * self.num_iterations, desc="per-user BT", leave=False, disable=None)
        for users in chunks:
            m = int(counts[users].max())
            D = torch.zeros(len(users), m, F)
            w = torch.zeros(len(users), m)
            for i, u in enumerate(users):
                D[i, :len(rows[u])] = pairs.select(rows[u]).dense().float()
                w[i, :len(rows[u])] = 1.0 / len(rows[u])
            D, w = D.to(device), w.to(device)
            v = torch.zeros(len(users), F, device=device, requires_grad=True)
            opt = torch.optim.Adam([v], lr=self.learning_rate)
            for _ in range(self.num_iterations):
                with torch.no_grad():  # the gradient by hand: twice as fast as autograd through bmm
                    z = torch.bmm(D, v[:, :, None])[:, :, 0] / self.logit_scale  # [c, m]
                    g = -torch.sigmoid(-z) * w / self.logit_scale  # d/dz of sum_u mean_j softplus(-z_uj)
                    v.grad = torch.bmm(g[:, None, :], D)[:, 0]
                opt.step()
                bar.update(1)
            V[users] = v.detach().cpu()
        bar.close()
        return V

    def fit(self, pairs, device=None):
        """Fit every seen user's reward on its pairs -> self (V [C, F])."""
        self.V = self._fit(pairs, device)
        return self

    def personalize(self, pairs, device=None):
        """New users' rewards [C', F], each fit on its own few-shot pairs with the same settings."""
        return self._fit(pairs, device)

    @torch.no_grad()
    def margins(self, pairs, V=None, device=None, chunk=8192):
        """[M] d^T v_user for every pair; V [C, F] (default: the seen users' fit). With numba one parallel
        pass reads each pair's rows once; otherwise chunks of `chunk` pairs."""
        pairs = as_pairs(pairs)
        V = self.V if V is None else torch.as_tensor(V, dtype=torch.float32)
        if V is None:
            raise InputError("call fit(pairs) first, or pass V")
        if V.shape != (pairs.num_users, pairs.num_features):
            raise InputError(f"V has shape {tuple(V.shape)}, expected ({pairs.num_users}, {pairs.num_features})")
        if numba is not None and pairs.table is not None:
            return torch.from_numpy(_per_user_margins_kernel(
                pairs.table.float().contiguous().numpy(), pairs.chosen.numpy(), pairs.rejected.numpy(),
                pairs.user.numpy(), V.contiguous().numpy()))
        out = []
        for s in range(0, len(pairs.user), chunk):
            idx = torch.arange(s, min(s + chunk, len(pairs.user)))
            out.append((pairs.select(idx).dense().float() * V[pairs.user[idx]]).sum(1))
        return torch.cat(out) if out else torch.zeros(0)

    def weights_and_bases(self, V=None):
        """The published learn_multiple layout: (W_list of C tensors [1], V_list of C tensors [F, 1])."""
        V = self.V if V is None else V
        return [torch.ones(1) for _ in range(len(V))], [v.reshape(-1, 1) for v in V]

    def accuracies(self, pairs, V=None, device=None):
        """[C] accuracy of each user of `pairs`; V: new users' rewards from `personalize` (None: seen users)."""
        pairs = as_pairs(pairs)
        return accuracy_by_user(self.margins(pairs, V, device), pairs.user, pairs.num_users)


# ----------------------------------------------------------------------------------------
# 9. Pipelines: run, run_regularized, run_few_shot_vary_shots
# ----------------------------------------------------------------------------------------

def _fit_basis(model_cls, K, V_final, alpha, pairs, *, num_iterations, learning_rate, device):
    """(W [C, K'], V [F, K']) for rank K: K = 0 is the reference head V_final with w = [1]."""
    if K == 0:
        V = torch.as_tensor(V_final, dtype=torch.float32).reshape(-1, 1)
        return torch.ones(len(pairs), 1), V
    model = model_cls(V_final, alpha, len(pairs), pairs.num_features, K, num_iterations, learning_rate)
    return model.train(pairs, device=device)


def _check_pipeline_args(**settings):
    """InputError naming the argument for the range errors of run / run_regularized / run_few_shot_vary_shots;
    says so when fewshot_iterations=0 (unseen users keep uniform weights over the basis)."""
    check_values(settings)
    if settings["fewshot_iterations"] == 0:
        print("fewshot_iterations=0: no few-shot fit, unseen users keep uniform weights over the basis")


def check_users(named_pairs):
    """Raise when a Pairs has another number of users than expected: named_pairs [(name, pairs, n)]."""
    for name, pairs, n in named_pairs:
        if len(pairs) != n:
            raise InputError(f"{name} has {len(pairs)} users, expected {n}")


def _run(model_cls, K_list, alpha_list, V_final, features, N, N_unseen, device, *, num_iterations, learning_rate,
         fewshot_iterations, fewshot_learning_rate, seed, return_models):
    """run / run_regularized with the model class `model_cls`; features: the four pair sets of `run`."""
    _check_pipeline_args(K_list=K_list, alpha_list=alpha_list, N=N, N_unseen=N_unseen, num_iterations=num_iterations,
                         learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
                         fewshot_learning_rate=fewshot_learning_rate)
    train, test, train_u, test_u = (as_pairs(x) for x in features)
    check_users([("train_features", train, N), ("test_features_sparse", test, N),
                  ("train_features_unseen", train_u, N_unseen), ("test_features_sparse_unseen", test_u, N_unseen)])
    shape = (len(alpha_list), len(K_list))
    means, stds = np.zeros((4,) + shape), np.zeros((4,) + shape)
    models = {}
    for a, alpha in enumerate(alpha_list):
        for k, K in enumerate(K_list):
            set_seed(seed)
            t0 = time.time()
            W, V = _fit_basis(model_cls, K, V_final, alpha, train, num_iterations=num_iterations,
                              learning_rate=learning_rate, device=device)
            if K <= 1:  # reference head or a single BT reward: everyone gets w = [1]
                W_u = torch.ones(N_unseen, V.shape[1])
            else:
                W_u = personalize_users(train_u, V, fewshot_iterations, fewshot_learning_rate, device)
            V, W, W_u = V.cpu(), W.cpu(), W_u.cpu()
            accs = [user_accuracies(train, V, W), user_accuracies(test, V, W),
                    user_accuracies(train_u, V, W_u), user_accuracies(test_u, V, W_u)]
            for r, acc in enumerate(accs):
                means[r, a, k], stds[r, a, k] = acc.mean(), acc.std()
            note_finished(f"alpha={alpha:g} K={K}")
            print(f"alpha={alpha:g} K={K} (kept {V.shape[1]}): " + ", ".join(
                f"{n} {m:.4f}" for n, m in zip(RESULT_NAMES, means[:, a, k])) + f"  [{time.time() - t0:.1f}s]")
            models[(alpha, K)] = {"V": V, "W": W, "W_unseen": W_u}
    out = tuple(x.reshape(-1) for x in (*means, *stds))  # the published layout: flat, alpha-major
    return out + (models,) if return_models else out


def run(K_list, alpha_list, V_final, train_features, test_features_sparse, train_features_unseen,
        test_features_sparse_unseen, N, N_unseen, device, *, num_iterations=1000, learning_rate=0.5,
        fewshot_iterations=500, fewshot_learning_rate=0.1, seed=0, return_models=False):
    """The LoRe pipeline for every alpha and K: fit the basis on seen users, evaluate them on
    their train pairs and on unseen prompts, fit few-shot weights of unseen users, evaluate them.

    K = 0: reference head V_final [F, 1], w = [1]; K = 1: one Bradley-Terry reward, w = [1],
    no few-shot step; K >= 2: LoRe. Features: lists of per-user tensors [m_i, F] or Pairs.
    Returns 8 one-dimensional arrays [len(alpha_list) * len(K_list)], alpha-major (all K of the
    first alpha, then the next), as published: mean accuracy over users for (seen train, seen test,
    unseen few-shot train, unseen test), then their std over users (the true std; the published
    code multiplied it by 0.25); with return_models=True also {(alpha, K): {"V", "W", "W_unseen"}}.
    """
    features = (train_features, test_features_sparse, train_features_unseen, test_features_sparse_unseen)
    return _run(LoRe, K_list, alpha_list, V_final, features, N, N_unseen, device, num_iterations=num_iterations,
                learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
                fewshot_learning_rate=fewshot_learning_rate, seed=seed, return_models=return_models)


def run_regularized(K_list, alpha_list, V_final, train_features, test_features_sparse, train_features_unseen,
                    test_features_sparse_unseen, N, N_unseen, device, *, num_iterations=20000, learning_rate=0.5,
                    fewshot_iterations=500, fewshot_learning_rate=0.5, seed=0, return_models=False):
    """`run` with LoRe_regularized (pooled loss, cosine pull to V_final, alternating steps)."""
    features = (train_features, test_features_sparse, train_features_unseen, test_features_sparse_unseen)
    return _run(LoRe_regularized, K_list, alpha_list, V_final, features, N, N_unseen, device,
                num_iterations=num_iterations, learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
                fewshot_learning_rate=fewshot_learning_rate, seed=seed, return_models=return_models)


def holdout_pairs(pairs, fraction, seed=0):
    """(fit, held_out): Pairs of the same users splitting `pairs`. A user with m >= 2 pairs holds out
    min(m - 1, max(1, round(fraction * m))) of them (drawn with np.random.RandomState(seed)); one with a single
    pair keeps it for the fit (its held-out accuracy is NaN: use np.nanmean)."""
    pairs = as_pairs(pairs)
    rng = np.random.RandomState(seed)
    held = [torch.zeros(0, dtype=torch.long)]
    for rows in pairs._rows_of(range(len(pairs))):
        k = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if len(rows) >= 2 else 0
        held.append(rows[torch.as_tensor(rng.choice(len(rows), k, replace=False), dtype=torch.long)])
    out = torch.zeros(len(pairs.user), dtype=torch.bool)
    out[torch.cat(held)] = True
    return pairs.select(torch.nonzero(~out).flatten()), pairs.select(torch.nonzero(out).flatten())


def select_rank(K_list, alpha_list, V_final, train_features, device=None, *, regularized=False,
                validation_fraction=0.1, num_iterations=1000, learning_rate=0.5, seed=0):
    """LoRe's (alpha, K), K >= 2, chosen on held-out pairs of the seen users' training data, never on test pairs:
    each user's validation_fraction of its training pairs is held out (holdout_pairs), LoRe (regularized:
    LoRe_regularized) is fit on the rest for every (alpha, K >= 2) as in run, and the one of best mean held-out
    accuracy over users wins (the first on a tie). -> {"alpha", "K", "validation": {"alpha=.. K=..": accuracy}},
    or None when there is nothing to choose (fewer than two candidates, or validation_fraction = 0)."""
    check_value("validation_fraction", validation_fraction)
    candidates = [(a, K) for a in alpha_list for K in K_list if K >= 2]
    if len(candidates) < 2 or validation_fraction == 0:
        return None
    fit, held = holdout_pairs(train_features, validation_fraction, seed)
    scores = {}
    for alpha, K in candidates:
        set_seed(seed)
        W, V = _fit_basis(LoRe_regularized if regularized else LoRe, K, V_final, alpha, fit,
                          num_iterations=num_iterations, learning_rate=learning_rate, device=device)
        scores[(alpha, K)] = float(np.nanmean(user_accuracies(held, V.cpu(), W.cpu())))
        print(f"model choice: alpha={alpha:g} K={K}: held-out seen-user training pairs {scores[(alpha, K)]:.4f}")
    alpha, K = max(scores, key=scores.get)
    return {"alpha": alpha, "K": K, "validation": {f"alpha={a:g} K={k}": v for (a, k), v in scores.items()}}


def shot_units(pool, shot_groups=None):
    """Each user's few-shot examples: per user of `pool` (Pairs), a list of tensors of pair rows of `pool`,
    one per example: a single pair, or with shot_groups ([m] group id of every pair) all pairs of a group."""
    units = []
    for rows in pool._rows_of(range(len(pool))):
        if shot_groups is None:
            units.append(list(rows.split(1)))
        else:
            groups = torch.as_tensor(shot_groups)[rows]
            units.append([rows[groups == g] for g in torch.unique(groups)])
    return units


def stack_trials(pool, units, users, shots, trials, seed, chosen=None):
    """`shots` random examples of each of `users` in every trial, all in one Pairs of rows of `pool`:
    user t * len(users) + i is users[i] in trial t. Trial t draws with np.random.RandomState(seed * 100003 + t).
    chosen: per user of `users` its examples in the order asked (select_shots); the first `shots` are taken instead."""
    rows, owner = [], []
    for trial in range(trials):
        rng = np.random.RandomState(seed * 100003 + trial)
        for i, u in enumerate(users):
            picks = rng.choice(len(units[u]), shots, replace=False) if chosen is None else chosen[i][:shots]
            picked = torch.cat([units[u][c] for c in picks])
            rows.append(picked)
            owner.append(torch.full((len(picked),), trial * len(users) + i))
    out = pool.select(torch.cat(rows))
    out.user, out.num_users = torch.cat(owner), trials * len(users)
    return out


def select_shots(pool, units, users, shots, rule, seed=0):
    """Per user u of `users`, its first min(shots, len(units[u])) examples asked by `rule` (choose_shots) -> lists of
    indices into units[u]. pool: rows d^T V stored chosen minus rejected, the simulated user's answers: the rule sees
    each row in a random orientation (np.random.RandomState(seed * 100003 + u)) and only asked rows are answered."""
    XV = pool.dense().double().numpy()
    out = []
    for u in users:
        rows = torch.cat(units[u]).numpy()
        flip = np.random.RandomState(seed * 100003 + u).choice([-1.0, 1.0], len(rows))
        groups = np.repeat(np.arange(len(units[u])), [len(r) for r in units[u]])
        out.append(choose_shots(XV[rows] * flip[:, None], min(shots, len(units[u])), lambda r: flip[r], rule,
                                groups=groups))
    return out


def run_few_shot_vary_shots(trials, alpha_list, K_list, num_shots, train_features, train_features_unseen,
                            test_features_sparse_unseen, V_final, N, N_unseen, device, *, regularized=False,
                            shot_groups=None, num_iterations=None, learning_rate=0.5, fewshot_iterations=500,
                            fewshot_learning_rate=None, seed=0, return_skipped=False, shot_selection="random"):
    """Unseen-user accuracy against the number of few-shot examples.

    The basis is fit once per (alpha, K) on the seen users; then for each shot count and each
    of `trials` draws, every unseen user gets `shots` random examples of its few-shot pool, its
    weights are fit and it is evaluated on its test pairs. An example is a pair, or with
    `shot_groups` ([m] group id, e.g. the dialog, of every pair of train_features_unseen) all
    pairs of one group. Users with fewer than `shots` examples are skipped for that count (the
    number is printed). All trials of a shot count are fit together in one PersonalizeBatch
    (users are independent there, so this equals fitting them one by one).
    num_iterations None: 20000 if regularized else 500 (as published);
    fewshot_learning_rate None: 0.5 if regularized else 0.1.
    shot_selection: "random" (the published draws), or "uncertainty" / "active": each user's examples are asked one
    at a time from the same pool (select_shots), and w is fit on them as above; deterministic: one trial, std 0.
    Returns 4 flat arrays [len(alpha_list) * len(K_list) * len(num_shots)] (alpha-major, then K,
    then shots: for one alpha and one K, the published sequences over num_shots): few-shot train
    accuracy mean and std over trials, unseen-user test accuracy mean and std over trials (each
    trial's value is the mean over users); with return_skipped=True also skipped counts [len(num_shots)].
    With a list of rules for shot_selection: {rule: those 4 arrays} and "full_pool": 4 arrays
    [len(alpha_list) * len(K_list)], the accuracies with w fit on each user's whole pool (mean and std over users).
    """
    model_cls = LoRe_regularized if regularized else LoRe
    if num_iterations is None:
        num_iterations = 20000 if regularized else 500
    if fewshot_learning_rate is None:
        fewshot_learning_rate = 0.5 if regularized else 0.1
    _check_pipeline_args(K_list=K_list, alpha_list=alpha_list, N=N, N_unseen=N_unseen, num_iterations=num_iterations,
                         learning_rate=learning_rate, fewshot_iterations=fewshot_iterations,
                         fewshot_learning_rate=fewshot_learning_rate, trials=trials, num_shots=num_shots,
                         shot_selection=shot_selection)
    rules = [shot_selection] if isinstance(shot_selection, str) else list(dict.fromkeys(shot_selection))
    train, pool, test_u = (as_pairs(x) for x in (train_features, train_features_unseen, test_features_sparse_unseen))
    check_users([("train_features", train, N), ("train_features_unseen", pool, N_unseen),
                  ("test_features_sparse_unseen", test_u, N_unseen)])
    units = shot_units(pool, shot_groups)
    n_units = torch.tensor([len(u) for u in units])
    unit_name = "pairs" if shot_groups is None else "groups"
    skipped = [int((n_units < s).sum()) for s in num_shots]
    for s, n in zip(num_shots, skipped):
        if n:
            print(f"shots={s}: skipping {n} of {N_unseen} unseen users with fewer than {s} {unit_name}")
    res = np.zeros((len(rules), 4, len(alpha_list), len(K_list), len(num_shots)))
    full = np.zeros((4, len(alpha_list), len(K_list)))
    for a, alpha in enumerate(alpha_list):
        for k, K in enumerate(K_list):
            set_seed(seed)
            _, V = _fit_basis(model_cls, K, V_final, alpha, train, num_iterations=num_iterations,
                              learning_rate=learning_rate, device=device)
            V = V.cpu()
            # work in the K-dim projected space: d^T V is all the few-shot step needs
            eye = torch.eye(V.shape[1])
            pool_V = Pairs(pool.user, N_unseen, diffs=pool.project(V).float())
            test_V = Pairs(test_u.user, N_unseen, diffs=test_u.project(V).float())

            def fit(shot_pairs):
                if V.shape[1] <= 1:
                    return torch.ones(shot_pairs.num_users, V.shape[1])
                return personalize_users(shot_pairs, eye, fewshot_iterations, fewshot_learning_rate, device).cpu()
            for r, rule in enumerate(rules):
                n_trials, tag, chosen = (trials, "", None) if rule == "random" else (1, f" [{rule} shots]", {})
                if rule != "random":  # sequential: the choices for the largest count, once; a count takes a prefix
                    has, t0 = torch.nonzero(n_units >= min(num_shots)).flatten().tolist(), time.time()
                    chosen = dict(zip(has, select_shots(pool_V, units, has, max(num_shots), rule, seed)))
                    print(f"alpha={alpha:g} K={K}: {rule} shots of {len(has)} users chosen in {time.time() - t0:.1f}s")
                for j, shots in enumerate(num_shots):
                    users = torch.nonzero(n_units >= shots).flatten().tolist()
                    if not users:
                        res[r, :, a, k, j] = np.nan
                        continue
                    shot_pairs = stack_trials(pool_V, units, users, shots, n_trials, seed,
                                              None if chosen is None else [chosen[u] for u in users])
                    W_u = fit(shot_pairs)
                    fs = user_accuracies(shot_pairs, eye, W_u).reshape(n_trials, len(users)).mean(1)
                    test = test_V.select_users(users)
                    ts = [user_accuracies(test, eye, W_u[t * len(users):(t + 1) * len(users)]).mean()
                          for t in range(n_trials)]
                    res[r, :, a, k, j] = np.mean(fs), np.std(fs), np.mean(ts), np.std(ts)
                    note_finished(f"alpha={alpha:g} K={K} shots={shots}{tag}")
                    print(f"alpha={alpha:g} K={K} shots={shots}{tag}: few-shot train {res[r, 0, a, k, j]:.4f}, "
                          f"unseen test {res[r, 2, a, k, j]:.4f} +- {res[r, 3, a, k, j]:.4f} "
                          f"({len(users)} users, {n_trials} trials)")
            if not isinstance(shot_selection, str):  # the reference: w fit on each user's whole few-shot pool
                users = torch.nonzero(n_units > 0).flatten().tolist()
                whole = pool_V.select_users(users)
                W_u = fit(whole)
                fs, ts = user_accuracies(whole, eye, W_u), user_accuracies(test_V.select_users(users), eye, W_u)
                full[:, a, k] = fs.mean(), fs.std(), ts.mean(), ts.std()
    if isinstance(shot_selection, str):
        out = tuple(res[0].reshape(4, -1))
        return out + (skipped,) if return_skipped else out
    out = {rule: tuple(res[r].reshape(4, -1)) for r, rule in enumerate(rules)}
    out["full_pool"] = tuple(full.reshape(4, -1))
    return (out, skipped) if return_skipped else out


# ----------------------------------------------------------------------------------------
# 10. Embedding extraction
#
# e(x, y) = final hidden state (after the final norm) of a frozen reward model at the last
# token of the chat-templated conversation. extract_embeddings() writes one safetensors file
# with the [M, F] float32 matrix (optionally split into named row blocks), the reward head
# [F, 1] and caller tensors. It resumes from shards and runs on several GPUs under torchrun.
# ----------------------------------------------------------------------------------------

_ST_DTYPES = {  # torch dtype -> safetensors dtype name
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


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


def _check_conversations(conversations):
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
    conversations = _check_conversations(conversations)
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
        if t.dtype not in _ST_DTYPES:
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
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned
    with _atomic_path(path) as tmp:
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
                    stop_after_shards, progress, embedding_dtype):
    """Embed and save the shards `todo` (indices into ranges / shard_fps) -> True when stopped early
    (stop_after_shards). shard_meta: the metadata every shard file gets, besides its own."""
    if not todo:
        return False
    tokenizer, model = load_reward_model(model_name, device=device, dtype=dtype, **model_kwargs)
    head = reward_head(model)
    shard_dir.mkdir(parents=True, exist_ok=True)
    pbar = tqdm(total=sum(ranges[k][1] - ranges[k][0] for k in todo), unit="seq", desc="embedding",
                disable=not progress or not is_main_process())
    _progress["resume"] = (f"finished shards are kept in {shard_dir}; run the same command again to resume "
                           "from them")
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


def _merge_shards(out_path, shard_dir, ranges, shard_fps, groups, extras, metadata, run_meta, keep_shards):
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
    _progress["resume"] = None
    return out_path


def _rewrite_extras(out_path, old_meta, groups, extras, metadata, extras_digest, chunk_rows):
    """Rewrite out_path with new extra tensors / metadata, streaming its embedding rows from the old file."""
    with safe_open(str(out_path), "pt") as f:
        head = f.get_tensor("head")
        chunks = (f.get_slice(name)[a:min(a + chunk_rows, n)] for name, n in groups for a in range(0, n, chunk_rows))
        final_meta = {**metadata, **{k: old_meta[k] for k in _RESERVED_METADATA if k in old_meta},
                      "extras_sha256": extras_digest}
        n_items = sum(n for _, n in groups)
        dtype = {v: k for k, v in _ST_DTYPES.items()}[f.get_slice(groups[0][0]).get_dtype()]
        _write_embeddings_file(out_path, chunks, n_items, head.shape[0], groups, {"head": head, **extras}, final_meta,
                               dtype)


def extract_embeddings(conversations, out_path, *, model_name, groups=None, extra_tensors=None, metadata=None,
                       max_tokens_per_batch=16384, max_batch_size=64, max_length=4096, truncation_side="left",
                       padding_side="right", shard_size=2048, stop_after_shards=None, device=None, dtype=None,
                       embedding_dtype=None, keep_shards=False, progress=True, tokenizer_name=None,
                       trust_remote_code=False):
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
    tokenizer_name: a tokenizer other than the model's (part of the fingerprint when given)."""
    conversations = _check_conversations(conversations)
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
    old_meta = _read_metadata(out_path)
    embeddings_current = old_meta is not None and old_meta.get("fingerprint") == fingerprint
    if embeddings_current and old_meta.get("extras_sha256") == extras_digest:
        print0(f"extract_embeddings: {out_path} is up to date (fingerprint {fingerprint[:12]}), skipping")
        return out_path

    rank, world, _ = dist_info()
    with _process_group(device):
        if embeddings_current:  # same embeddings, other extra tensors / metadata: rewrite without the model
            if rank == 0:
                print0(f"extract_embeddings: {out_path} has current embeddings but other extra tensors or "
                       "metadata, rewriting it")
                _rewrite_extras(out_path, old_meta, groups, extras, metadata, extras_digest, shard_size)
            _barrier()
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
                                  embedding_dtype=embedding_dtype,
                                  model_kwargs={"tokenizer_name": tokenizer_name,
                                                "trust_remote_code": trust_remote_code})
        if stopped:
            print0(f"extract_embeddings: stopped after {stop_after_shards} shard(s) per rank (stop_after_shards)")

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


# ----------------------------------------------------------------------------------------
# 11. Using a learned model
#
# Every train_basis.py writes what it learned for each (alpha, K) to one safetensors file
# (save_lore_model): V [F, K], W [C, K] (seen users), W_unseen [C_u, K], and metadata (each
# value JSON-encoded) with the users' ids, the reward model's name, F, the logit scale, the
# dataset and the few-shot settings. PersonalizedReward scores texts with it, fits a new
# person's w from their comparisons and exports a Hugging Face reward model of e^T V w.
# ----------------------------------------------------------------------------------------

MODEL_FORMAT = "lore-model-1"  # metadata["format"] of a learned-model file
_MODEL_REQUIRED = ("format", "model_name", "dataset", "n_features", "logit_scale", "users", "unseen_users")


def reward_model_info(path):
    """-> {"model_name", "max_length", "truncation_side"} of the reward model that embedded the file at `path`
    (the metadata extract_embeddings writes)."""
    meta = load_metadata(path)
    max_length = meta.get("max_length", "None")
    return {"model_name": meta.get("model_name"), "max_length": None if max_length == "None" else int(max_length),
            "truncation_side": meta.get("truncation_side", "left")}


def save_lore_model(path, V, W, W_unseen, *, model_name, dataset, users=None, unseen_users=None,
                    logit_scale=LOGIT_SCALE, metadata=None):
    """Write a learned model atomically: V [F, K], W [C, K] (seen users), W_unseen [C_u, K].

    model_name: the reward model whose embeddings V was fit on (None for synthetic embeddings).
    users / unseen_users: the ids (str or int) of the rows of W / W_unseen (default 0..C-1, C..C+C_u-1).
    metadata: more {name: JSON-able value} (K, alpha, few-shot settings, ...). Every metadata value is
    stored JSON-encoded; load_lore_model decodes it.
    """
    V, W, W_unseen = (torch.as_tensor(t, dtype=torch.float32).cpu() for t in (V, W, W_unseen))
    if V.dim() != 2 or W.dim() != 2 or W_unseen.dim() != 2 or W.shape[1] != V.shape[1] \
            or W_unseen.shape[1] != V.shape[1]:
        raise InputError(f"expected V [F, K], W [C, K], W_unseen [C_u, K]; got {tuple(V.shape)}, {tuple(W.shape)}, "
                         f"{tuple(W_unseen.shape)}")
    users = list(range(len(W))) if users is None else list(users)
    unseen_users = list(range(len(W), len(W) + len(W_unseen))) if unseen_users is None else list(unseen_users)
    if len(users) != len(W) or len(unseen_users) != len(W_unseen):
        raise InputError(f"{len(users)} user ids for {len(W)} rows of W, {len(unseen_users)} for {len(W_unseen)} "
                         "rows of W_unseen")
    ids = [u.item() if isinstance(u, np.generic) else u for u in users + unseen_users]
    if not all(isinstance(u, (str, int)) and not isinstance(u, bool) for u in ids):
        raise InputError("user ids must be str or int")
    if len(set(map(str, ids))) != len(ids):
        raise InputError("user ids must be unique (seen and unseen users together)")
    meta = dict(metadata or {})
    meta.update(format=MODEL_FORMAT, model_name=None if model_name is None else str(model_name), dataset=str(dataset),
                n_features=V.shape[0], logit_scale=float(logit_scale), users=ids[:len(users)],
                unseen_users=ids[len(users):])
    return save_tensors(path, {"V": V, "W": W, "W_unseen": W_unseen},
                        metadata={k: json.dumps(_jsonable(v)) for k, v in meta.items()})


def load_lore_model(path):
    """-> dict with the tensors V [F, K], W [C, K], W_unseen [C_u, K], the decoded metadata (model_name,
    dataset, n_features, logit_scale, users, unseen_users, ...) and "path". Checks shapes and ids."""
    path = Path(path)
    tensors = load_tensors(path, ("V", "W", "W_unseen"))
    try:
        meta = {k: json.loads(v) for k, v in load_metadata(path).items()}
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not a learned-model file (its metadata is not JSON: {e})") from None
    missing = [k for k in _MODEL_REQUIRED if k not in meta]
    if missing or meta.get("format") != MODEL_FORMAT:
        raise InputError(f"{path} is not a learned-model file ({MODEL_FORMAT}): its metadata lacks "
                         f"{missing or 'format'}; train_basis.py writes these under results/models/")
    V, W, W_u = tensors["V"], tensors["W"], tensors["W_unseen"]
    if V.shape[0] != meta["n_features"] or W.shape != (len(meta["users"]), V.shape[1]) \
            or W_u.shape != (len(meta["unseen_users"]), V.shape[1]):
        raise InputError(f"{path}: V {tuple(V.shape)}, W {tuple(W.shape)}, W_unseen {tuple(W_u.shape)} do not match "
                         f"F = {meta['n_features']}, {len(meta['users'])} users, {len(meta['unseen_users'])} unseen")
    return {**meta, **tensors, "path": str(path)}


def save_models(out_dir, models, data, *, dataset, fewshot_iterations, fewshot_learning_rate):
    """Write every model of run(..., return_models=True) ({(alpha, K): {"V", "W", "W_unseen"}}) trained on
    `data` (a PreferenceData; info "reward_model", "users", "unseen_users" when known) to
    out_dir/K{K}_alpha{alpha:g}.safetensors (save_lore_model; save_or_fallback when that folder cannot be
    written) -> {"K=.. alpha=..": path written}."""
    rm = data.info.get("reward_model") or {"model_name": None}
    fewshot_pairs = int(data.unseen_fewshot.counts().float().median().item())  # an unseen user's, typically
    paths = {}
    for (alpha, K), m in models.items():
        metadata = {"K": K, "alpha": alpha, "kept": m["V"].shape[1], "reference": data.info.get("reference", "head"),
                    "fewshot_iterations": fewshot_iterations,
                    "fewshot_learning_rate": fewshot_learning_rate, "fewshot_pairs": fewshot_pairs,
                    **{k: v for k, v in rm.items() if k != "model_name"}}
        path = save_or_fallback(Path(out_dir) / f"K{K}_alpha{alpha:g}.safetensors", lambda p: save_lore_model(
            p, m["V"], m["W"], m["W_unseen"], model_name=rm["model_name"], dataset=dataset,
            users=data.info.get("users"), unseen_users=data.info.get("unseen_users"), metadata=metadata))
        paths[f"K={K} alpha={alpha:g}"] = None if path is None else str(path)
    print(f"wrote the learned models (V, W, W_unseen, user ids) to {Path(out_dir)}/")
    return paths


def as_conversation(prompt, response):
    """(prompt, response) -> a message list. prompt: a string (one user turn) or a list of {'role', 'content'}
    messages; response: a string (the assistant's reply) or a list of messages appended to the prompt."""
    def messages(x, role):
        if isinstance(x, str):
            return [{"role": role, "content": x}]
        if isinstance(x, (list, tuple)) and x and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in x):
            return [{"role": m["role"], "content": m["content"]} for m in x]
        raise InputError(f"expected a string or a non-empty list of {{'role': str, 'content': str}} messages, "
                         f"got {x!r:.100}")
    return messages(prompt, "user") + messages(response, "assistant")


def read_comparisons(path, sides=("chosen", "rejected")):
    """Read a jsonl of {"prompt", "chosen", "rejected"} -> (chosen, rejected, bad).

    chosen / rejected: the conversations (message lists) of the good lines; bad: (line number, reason) of
    every other non-blank line. A prompt is a string or a list of chat messages; a reply is a string or
    a list of messages. sides: the keys of the two replies, e.g. ("a", "b") for unanswered candidates."""
    keys = ("prompt",) + tuple(sides)
    chosen, rejected, bad = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append((n, f"not valid JSON ({e.msg})"))
                continue
            if not isinstance(row, dict):
                bad.append((n, f"expected an object with {', '.join(keys)}, got {type(row).__name__}"))
                continue
            missing = [k for k in keys if k not in row]
            if missing:
                bad.append((n, f"missing {', '.join(missing)}"))
                continue
            try:
                c, r = (as_conversation(row["prompt"], row[k]) for k in sides)
            except InputError as e:
                bad.append((n, str(e)))
                continue
            chosen.append(c)
            rejected.append(r)
    return chosen, rejected, bad


class PersonalizedReward:
    """A learned LoRe model and its reward model: the reward of weights w [K] is e(x, y)^T V w.

    V [F, K] shared basis, W [C, K] seen users' weights, W_unseen [C_u, K] unseen users' few-shot weights,
    users / unseen_users their ids. The reward model (`model_name`, a hub id or a local path) loads on the
    first .embed / .reward / .personalize; embeddings go through the extractor of prepare.py.
    A user is a seen or unseen user's id, a weight vector [K], or "uniform" (w = 1/K).
    """

    def __init__(self, V, W=None, W_unseen=None, users=None, unseen_users=None, *, model_name, dataset=None,
                 logit_scale=LOGIT_SCALE, fewshot_iterations=500, fewshot_learning_rate=0.1, fewshot_pairs=1,
                 max_length=4096, truncation_side="left", max_tokens_per_batch=16384, max_batch_size=64,
                 device=None, dtype=None, path=None):
        self.V = torch.as_tensor(V, dtype=torch.float32).cpu()
        if self.V.dim() != 2:
            raise InputError(f"V must be [F, K], got shape {tuple(self.V.shape)}")
        K = self.V.shape[1]
        self.W = torch.zeros(0, K) if W is None else torch.as_tensor(W, dtype=torch.float32).cpu()
        self.W_unseen = torch.zeros(0, K) if W_unseen is None else torch.as_tensor(W_unseen, dtype=torch.float32).cpu()
        self.users = list(range(len(self.W))) if users is None else list(users)
        self.unseen_users = [] if unseen_users is None else list(unseen_users)
        self.model_name, self.dataset, self.logit_scale, self.path = model_name, dataset, float(logit_scale), path
        self.fewshot_iterations, self.fewshot_learning_rate = int(fewshot_iterations), float(fewshot_learning_rate)
        self.fewshot_pairs = int(fewshot_pairs)
        self.max_length, self.truncation_side = max_length, truncation_side
        self.max_tokens_per_batch, self.max_batch_size = max_tokens_per_batch, max_batch_size
        self.device, self.dtype = device, dtype
        self.tokenizer = self.model = None

    @classmethod
    def load(cls, model_file, model_name=None, **kwargs):
        """Load a learned-model file (save_lore_model). model_name: a hub id or local path overriding the
        reward model named in the file (e.g. a local copy). kwargs: device, dtype, batching, few-shot settings."""
        m = load_lore_model(model_file)
        settings = {k: m[k] for k in ("fewshot_iterations", "fewshot_learning_rate", "fewshot_pairs", "max_length",
                                      "truncation_side") if k in m}
        settings.update(kwargs)
        return cls(m["V"], m["W"], m["W_unseen"], m["users"], m["unseen_users"],
                   model_name=model_name or m["model_name"], dataset=m["dataset"], logit_scale=m["logit_scale"],
                   path=m["path"], **settings)

    @property
    def K(self):
        return self.V.shape[1]

    @property
    def F(self):
        return self.V.shape[0]

    def __repr__(self):
        return (f"PersonalizedReward(F={self.F}, K={self.K}, {len(self.users)} seen + {len(self.unseen_users)} unseen "
                f"users, dataset={self.dataset!r}, model_name={self.model_name!r})")

    def weights(self, user):
        """-> [K] float32 weights of `user`: a seen or unseen user's id, a weight vector [K], or "uniform"."""
        if isinstance(user, str) and user == "uniform":
            return torch.full((self.K,), 1.0 / self.K)
        if isinstance(user, (torch.Tensor, np.ndarray, list, tuple)):
            w = torch.as_tensor(user if torch.is_tensor(user) else np.asarray(user, dtype=np.float32),
                                dtype=torch.float32).cpu().reshape(-1)
            if w.numel() != self.K or not torch.isfinite(w).all():
                raise InputError(f"a weight vector must have K = {self.K} finite entries, got {tuple(w.shape)}")
            return w
        for ids, W in ((self.users, self.W), (self.unseen_users, self.W_unseen)):
            for i, u in enumerate(ids):
                if u == user or str(u) == str(user):
                    return W[i].clone()
        examples = ", ".join(repr(u) for u in self.users[:3])
        raise KeyError(f"user {user!r} is not a seen or unseen user of {self.path or 'this model'} "
                       f"({len(self.users)} seen users, e.g. {examples}); give a user id, a weight vector [{self.K}] "
                       "or 'uniform'")

    def head(self, user):
        """-> [F] the reward head V w of `user` (reward = e(x, y)^T head)."""
        return self.V @ self.weights(user)

    def load_reward_model(self):
        """-> (tokenizer, model), loaded once (load_reward_model)."""
        if self.model is None:
            if self.model_name is None:
                raise InputError(f"{self.path or 'this model'} was fit on synthetic embeddings and names no reward "
                                 "model: give one with model_name=... (its hidden size must be F)")
            self.tokenizer, self.model = load_reward_model(self.model_name, self.device, self.dtype)
            hidden = self.model.config.get_text_config().hidden_size
            if hidden != self.F:
                raise InputError(f"{self.model_name} has hidden size {hidden}, but V has F = {self.F} rows: load the "
                                 "reward model this basis was trained with (model_name=...)")
        return self.tokenizer, self.model

    def embed(self, conversations, progress=None):
        """conversations: list of M message lists -> [M, F] float32 embeddings e(x, y), in input order
        (tokenize_conversations + embed_token_ids with the batching of prepare.py)."""
        conversations = _check_conversations(conversations)
        tokenizer, model = self.load_reward_model()
        token_ids, n_truncated = tokenize_conversations(tokenizer, conversations, self.max_length,
                                                        self.truncation_side)
        if n_truncated:
            print(f"embed: {n_truncated}/{len(token_ids)} conversations truncated to {self.max_length} tokens")
        disable = None if progress is None else not progress  # None: a bar on terminals only
        with tqdm(total=len(token_ids), unit="conv", desc="embedding", disable=disable) as pbar:
            return embed_token_ids(model, token_ids, tokenizer.pad_token_id, self.max_tokens_per_batch,
                                   self.max_batch_size, pbar=pbar)

    def reward(self, conversations, user):
        """-> [M] rewards e(x, y)^T V w of M conversations (message lists) for `user` (id, weights [K] or
        "uniform"). Equals the logit of the model written by .export(out_dir, user)."""
        return self.embed(conversations) @ self.head(user)

    def fit_weights(self, diffs, num_iterations=None, learning_rate=None):
        """diffs [m, F] (chosen minus rejected embeddings) -> [K] simplex weights fit on the frozen V
        (PersonalizeBatch, the few-shot step of train_basis.py, with its settings). K <= 1: w = [1].
        Fewer comparisons than an unseen user had in the few-shot protocol print a notice."""
        diffs = torch.as_tensor(diffs, dtype=torch.float32).cpu()
        if diffs.dim() != 2 or diffs.shape[1] != self.F or len(diffs) == 0:
            raise InputError(f"diffs must be [m >= 1, F = {self.F}], got {tuple(diffs.shape)}")
        if len(diffs) < self.fewshot_pairs:
            print(f"personalize: {len(diffs)} comparison(s), fewer than the {self.fewshot_pairs} of an unseen user "
                  f"in the {self.dataset} few-shot protocol; w may follow these few closely")
        if self.K <= 1:
            return torch.ones(self.K)
        model = PersonalizeBatch(1, self.F, self.K, num_iterations or self.fewshot_iterations,
                                 learning_rate or self.fewshot_learning_rate)
        return model.train([diffs], self.V, device="cpu")[0].cpu()

    def personalize(self, chosen_conversations, rejected_conversations, num_iterations=None, learning_rate=None):
        """A new person's m >= 1 comparisons (chosen[i] preferred to rejected[i], message lists) -> their
        weights w [K] on the frozen basis. Fewer comparisons than the few-shot protocol's count print a notice."""
        chosen = _check_conversations(chosen_conversations)
        rejected = _check_conversations(rejected_conversations)
        if len(chosen) != len(rejected):
            raise InputError(f"{len(chosen)} chosen but {len(rejected)} rejected conversations")
        m = len(chosen)
        E = self.embed(chosen + rejected)
        return self.fit_weights(E[:m] - E[m:], num_iterations, learning_rate)

    def suggest(self, candidates, k=1, answered=None, rule="active"):
        """Which of a person's candidate comparisons to ask next -> k indices into `candidates`, best first
        (select_comparisons on the candidates projected onto V: "active", the largest expected information about
        the person's weights, or "uncertainty", the answer predicted nearest 50/50).
        candidates: a list of n (a, b) pairs of conversations (message lists), or their differences e(a) - e(b)
        [n, F]. answered: what the person has answered so far: {candidate index: 1 if they preferred a, -1 if b}
        (never suggested again), or the differences [m, F] (chosen minus rejected) of other comparisons, or None."""
        if not (torch.is_tensor(candidates) or isinstance(candidates, np.ndarray)):
            pairs = list(candidates)
            if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
                raise InputError("candidates must be a non-empty list of (a, b) pairs of conversations, or [n, F]")
            E = self.embed([p[0] for p in pairs] + [p[1] for p in pairs])
            candidates = E[:len(pairs)] - E[len(pairs):]

        def project(D, name):
            D = torch.as_tensor(D, dtype=torch.float64).cpu()
            if D.dim() != 2 or D.shape[1] != self.F:
                raise InputError(f"{name} must be differences [n, F = {self.F}], got {tuple(D.shape)}")
            return (D @ self.V.double()).numpy()
        X = project(candidates, "candidates")
        if isinstance(answered, dict):
            exclude, y = [int(i) for i in answered], np.array(list(answered.values()), dtype=np.float64)
            if any(not 0 <= i < len(X) for i in exclude) or not np.isin(y, (-1, 1)).all():
                raise InputError(f"answered must map candidate indices in [0, {len(X)}) to 1 (a preferred) or -1")
            return select_comparisons(X, k, rule=rule, known=X[exclude] * y[:, None], exclude=exclude)
        return select_comparisons(X, k, rule=rule, known=None if answered is None else project(answered, "answered"))

    def export(self, out_dir, user):
        """Write a Hugging Face AutoModelForSequenceClassification checkpoint of `user`'s reward to out_dir
        -> Path. score.weight is (V w)^T [1, F]; every other tensor is the reward model's own, linked
        (see export_reward_model)."""
        if self.model_name is None:
            self.load_reward_model()  # raises the error that names the missing model_name
        w = self.weights(user)
        info = {"lore_model": self.path, "dataset": self.dataset,
                "user": user if isinstance(user, (str, int)) else "weights", "w": w.tolist()}
        return export_reward_model(self.model_name, (self.V @ w).reshape(1, -1), out_dir, info)


# Export: a sharded checkpoint whose index points at the base model's own files
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
    torch_dtype = {v: k for k, v in _ST_DTYPES.items()}[dtype]
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
        meta.update({k: json.dumps(_jsonable(v)) for k, v in (info or {}).items()})
        save_tensors(tmp / EXPORT_HEAD_FILE, {"score.weight": score_weight.to(torch_dtype)}, metadata=meta)
        save_json(tmp / EXPORT_INDEX_FILE, {"metadata": {"total_size": sum(sizes[k] for k in index)},
                                            "weight_map": dict(sorted(index.items()))})
        for name in EXPORT_COPIED_FILES:
            src = config if name == "config.json" else _base_file(model_name, name)
            if src is not None:
                shutil.copyfile(src, tmp / name)
        _usual_permissions(tmp, 0o777)  # mkdtemp makes 0700
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


# ----------------------------------------------------------------------------------------
# 12. The published interface
#
# The published utils.py names, parameters, defaults and return layouts that notebooks and scripts
# written for it rely on, each a thin wrapper over the sections above. Inputs are lists of per-user
# tensors [m_i, F] (or Pairs). `from utils import *` also gives torch, nn, optim, F, np, random, device.
# ----------------------------------------------------------------------------------------

F = F_nn  # torch.nn.functional (the code above says F_nn, as F is also a feature count)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # decided at import


# --- population simulation (the PersonalLLM seed functions; sample_population_pairs is the lean one) ---

def generate_population(alpha, N):
    """N users' weights over the reward models: Dirichlet(alpha) samples, [N, len(alpha)]."""
    return np.random.dirichlet(alpha, N)


generate_popupulation = generate_population  # the published name


def _as_array(x):
    """A float64 NumPy array from nested lists / tuples / object arrays of numbers, arrays or tensors
    (the published inputs: a list of P lists of R tensors [F], a NumPy object array of scores)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.dtype == object and x.ndim > 0):
        return np.stack([_as_array(e) for e in x])
    return np.asarray(x, dtype=np.float64)


def simulate_user(reward_tensor, features, w):
    """One user's pair per prompt, highest- minus lowest-scored response: [P, F].

    reward_tensor: [P, R, M] scores of R responses by M reward models (also a NumPy object array);
    features: [P, R, F] embeddings (also a list of P lists of R tensors [F], as published);
    w: [M] the user's weights over the reward models.
    """
    scores = _as_array(reward_tensor) @ np.asarray(w, dtype=np.float64)  # [P, R]
    best, worst = scores.argmax(1), scores.argmin(1)
    feats = features if isinstance(features, torch.Tensor) else torch.from_numpy(_as_array(features))
    feats = feats.float()
    rows = torch.arange(len(best))
    return feats[rows, torch.as_tensor(best)] - feats[rows, torch.as_tensor(worst)]


def simulate_population(reward_tensor, features, W):
    """[N, P, F] differences for N users (small inputs only: see sample_population_pairs)."""
    if not isinstance(features, torch.Tensor):  # convert the published nested list once, not per user
        features = torch.from_numpy(_as_array(features)).float()
    reward_tensor = _as_array(reward_tensor)
    return torch.stack([simulate_user(reward_tensor, features, w) for w in W])


def create_sparse_tensor(dense_tensor, sample_percentage):
    """Keep int(sample_percentage * P) random prompts of each user: list of N tensors [m, F]."""
    N, P = dense_tensor.shape[:2]
    m = int(sample_percentage * P)
    return [torch.as_tensor(dense_tensor[i][np.random.choice(P, m, replace=False)], dtype=torch.float32)
            for i in range(N)]


def sample_shots(train_features_unseen, shots, rng=None):
    """`shots` random pairs of each user (without replacement).

    train_features_unseen: list of tensors [m_i, F] (returns a list of [shots, F]) or Pairs (returns Pairs).
    A user with fewer than `shots` pairs is an error.
    """
    check_value("shots", shots)
    rng = np.random if rng is None else rng
    pairs = as_pairs(train_features_unseen)
    counts = pairs.counts().tolist()
    short = [i for i, c in enumerate(counts) if c < shots]
    if short:
        raise InputError(f"sample_shots: {len(short)} user(s) have fewer than shots={shots} pairs "
                         f"(user {short[0]} has {counts[short[0]]}); drop them or ask for fewer shots")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    idx = np.concatenate([s + rng.choice(c, shots, replace=False) for s, c in zip(starts, counts)])
    out = pairs.select(idx)
    return out if isinstance(train_features_unseen, Pairs) else out.to_list()


# --- the PRISM nested-dict format ---

def _dialog_diffs(dialog):
    """[m, F] differences of one published PRISM dialog {"chosen": [...], "rejected": [...]}: entry j of
    chosen (an [F] embedding) against entry j of rejected (an [F] embedding, or [r, F]: each row its own pair)."""
    chosen, rejected = dialog["chosen"], dialog["rejected"]
    if len(chosen) != len(rejected):
        raise InputError(f"a dialog has {len(chosen)} chosen but {len(rejected)} rejected entries")
    rows = []
    for c, r in zip(chosen, rejected):
        c, r = torch.as_tensor(c, dtype=torch.float32).reshape(-1), torch.as_tensor(r, dtype=torch.float32)
        rows.append(c[None] - r.reshape(-1, c.shape[0]))
    if not rows:
        raise InputError("a dialog has no chosen / rejected embeddings")
    return torch.cat(rows)


def create_dataset_prism(embeddings):
    """The published PRISM builder: {user: {dialog: {"chosen": [e [F], ...], "rejected": [e [F] or [r, F], ...]}}}
    -> list of per-user tensors [m_i, F] of chosen - rejected differences (users and dialogs in dict order)."""
    return [torch.cat([_dialog_diffs(d) for d in dialogs.values()]) for dialogs in embeddings.values()]


def create_dataset_prism_shots(embeddings, shots):
    """As create_dataset_prism, from `shots` random dialogs of each user (np.random.choice without
    replacement). A user with fewer than `shots` dialogs is an error."""
    out = []
    for user, dialogs in embeddings.items():
        dialogs = list(dialogs.values())
        if len(dialogs) < shots:
            raise InputError(f"create_dataset_prism_shots: user {user!r} has {len(dialogs)} dialogs, "
                             f"fewer than shots={shots}")
        out.append(torch.cat([_dialog_diffs(dialogs[j]) for j in np.random.choice(len(dialogs), shots, replace=False)]))
    return out


# --- fits ---

def solve_regularized(V_sft, alpha, train_features, num_basis_vectors, num_iterations=1000, learning_rate=0.01,
                      device=None):
    """Fit LoRe (alpha * sum_j ||V_j - V_sft||^2) -> (W [C, K], V [F, K])."""
    pairs = as_pairs(train_features)
    model = LoRe(V_sft, alpha, len(pairs), pairs.num_features, num_basis_vectors, num_iterations, learning_rate)
    return model.train(pairs, device=device)


def solve_regularized_simplex(V_sft, alpha, train_features, num_basis_vectors, num_iterations=1000,
                              learning_rate=0.01, device=None):
    """Fit LoRe_regularized -> (W [C, K'], V [F, K']) with unused bases dropped."""
    pairs = as_pairs(train_features)
    model = LoRe_regularized(V_sft, alpha, len(pairs), pairs.num_features, num_basis_vectors, num_iterations,
                             learning_rate)
    return model.train(pairs, device=device)


def solve(train_features, num_basis_vectors, num_iterations=1000, learning_rate=0.01, device=None):
    """Fit LoRe without the regulariser (alpha = 0) -> (W [C, K], V [F, K])."""
    return solve_regularized(None, 0.0, train_features, num_basis_vectors, num_iterations, learning_rate, device)


def solve_multi_reward(train_features, num_basis_vectors, num_iterations=1000, learning_rate=0.01, device=None):
    """Fit K basis rewards jointly with the users' weights (LoRe, alpha = 0) -> the fitted LoRe model
    (.V [F, K], .weights() [C, K], .losses)."""
    pairs = as_pairs(train_features)
    model = LoRe(None, 0.0, len(pairs), pairs.num_features, num_basis_vectors, num_iterations, learning_rate)
    model.train(pairs, device=device)
    return model


def learn_multiple_few_shot(train_features, V, num_iterations=1000, learning_rate=0.01, device=None):
    """Few-shot weights of new users on a frozen V [F, K] -> list of C simplex vectors [K] (personalize_users)."""
    return list(personalize_users(train_features, V, num_iterations, learning_rate, device))


def learn_multiple_few_shot_weighted(alpha, train_features, current_dialog_features, V, num_iterations=1000,
                                     learning_rate=0.01, device=None):
    """Few-shot weights of new users on a frozen V [F, K] from two sets of pairs per user, the current dialog's
    weighted by alpha: user i minimises mean_train_i(-log sigmoid) + alpha * mean_current_i(-log sigmoid)
    (a user with no pairs in one set gets only the other term; alpha = 0 is learn_multiple_few_shot).
    -> list of C simplex vectors [K]."""
    train, current = as_pairs(train_features), as_pairs(current_dialog_features)
    if len(train) != len(current):
        raise InputError(f"train_features has {len(train)} users, current_dialog_features {len(current)}")
    V = torch.as_tensor(V, dtype=torch.float32)
    model = PersonalizeBatch(len(train), V.shape[0], V.shape[1], num_iterations, learning_rate)
    (_, XV_t), (_, XV_c) = model._project(train, V), model._project(current, V)
    n_t, n_c = train.counts(), current.counts()
    if ((n_t == 0) & (n_c == 0)).any():
        raise InputError("a user has no pairs in either set")
    pw = torch.cat([1.0 / n_t.clamp(min=1)[train.user].float(), alpha / n_c.clamp(min=1)[current.user].float()])
    return model._fit(torch.cat([XV_t, XV_c]), torch.cat([train.user, current.user]), pw, device)


def _fit_bt(pairs, V_ref=None, alpha=0.0, num_iterations=1000, learning_rate=0.01, device=None):
    """One Bradley-Terry reward [F, 1] fit by Adam from 0 on all pairs pooled (mean over pairs), plus
    alpha * ||v - V_ref||^2 when V_ref is given."""
    device = get_device(device)
    diffs, user, counts = _pack(pairs, device)
    check_counts(counts)
    v = torch.zeros(1, diffs.shape[1], device=device, requires_grad=True)
    ref = None if V_ref is None else torch.as_tensor(V_ref, dtype=torch.float32).reshape(1, -1).to(device)
    pw = torch.full((len(user),), 1.0 / len(user), device=device)
    opt = torch.optim.Adam([v], lr=learning_rate)
    for _ in tqdm(range(num_iterations), desc="Bradley-Terry", leave=False, disable=None):
        opt.zero_grad(set_to_none=True)
        loss = _bt_loss(diffs, v.t(), torch.ones(len(user), 1, device=device), pw)
        if ref is not None and alpha:
            loss = loss + alpha * ((v - ref) ** 2).sum()
        loss.backward()
        opt.step()
    return v.detach().t().cpu()


def learn_multiple(train_features, num_iterations=1000, learning_rate=0.01, device=None):
    """One independent Bradley-Terry reward per user (a per-user baseline) -> (W_list, V_list): C weights [1]
    (ones) and C rewards [F, 1], usable with eval_multiple(W_list, V_list, test_features). User i's reward
    minimises its mean -log sigmoid(d^T v_i / 100), from v_i = 0: PerUserBT (section 8)."""
    model = PerUserBT(num_iterations=num_iterations, learning_rate=learning_rate)
    return model.fit(as_pairs(train_features), device).weights_and_bases()


def learn_single_reward(train_features, num_iterations=1000, learning_rate=0.01, device=None):
    """One Bradley-Terry reward for everyone: the mean -log sigmoid(d^T v / 100) over all pairs pooled,
    from v = 0 -> V [F, 1]."""
    return _fit_bt(as_pairs(train_features), num_iterations=num_iterations, learning_rate=learning_rate,
                   device=device)


def learn_single_reward_regularized(V_ref, alpha, train_features, num_iterations=1000, learning_rate=0.01,
                                    device=None):
    """learn_single_reward pulled towards V_ref [F, 1]: plus alpha * ||v - V_ref||^2 -> V [F, 1]."""
    return _fit_bt(as_pairs(train_features), V_ref, alpha, num_iterations, learning_rate, device)


# --- evaluation ---

def evaluate_model(X, V, w):
    """Fraction of rows of X [m, F] with X @ V @ w > 0 (a tie counts as wrong)."""
    V = torch.as_tensor(V, dtype=torch.float32)
    w = torch.as_tensor(w, dtype=torch.float32).to(V.device).reshape(-1)
    X = torch.as_tensor(X, dtype=torch.float32).to(V.device)
    return ((X @ V @ w) > 0).float().mean().item()


def eval_multiple(W_list, V_list, test_features, verbose=True):
    """Per-user accuracies [C] (list of floats); prints the mean and std over users.

    W_list: C weight vectors [K] (or a [C, K] tensor); V_list: one V [F, K] shared by all
    users, or a list of C of them; test_features: list of C tensors [m_i, F] or Pairs.
    """
    pairs = as_pairs(test_features)
    W = torch.stack([torch.as_tensor(w, dtype=torch.float32).cpu().reshape(-1) for w in W_list])
    if isinstance(V_list, (list, tuple)):
        accs = [user_accuracies(pairs.select_users([i]), V_list[i], W[i:i + 1])[0] for i in range(len(pairs))]
    else:
        accs = user_accuracies(pairs, V_list, W).tolist()
    if verbose:
        print(f"accuracy: mean {np.mean(accs):.4f}, std {np.std(accs):.4f} over {len(accs)} users")
    return list(accs)
