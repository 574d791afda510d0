"""Configuration and errors: InputError, the range rules of every setting, a script's key=value configuration,
device and process helpers, and the record of a run for its Ctrl-C message.

Imports no other module of lorelib: everything else imports this one.
"""
import ast
import contextlib
import dataclasses
import datetime
import math
import numbers
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


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


def barrier():
    """Wait for every process of the process group (nothing to do without one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def process_group(device):
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

# The range of every setting of the core classes and pipelines and of the settings every script shares (a rule of
# check_value). A dataset module carries the rules of its own settings (its RULES, passed to configure), a method
# class those of its own (its `rules`).
RULES = {
    "K_list": "each int >= 0", "K": "int >= 0", "alpha_list": "each >= 0", "alpha": ">= 0",
    "N": "int >= 1", "N_unseen": "int >= 1",
    "num_classes": "int >= 1", "num_features": "int >= 1", "num_basis_vectors": "int >= 1",
    "num_iterations": "int >= 1", "learning_rate": "> 0",
    "fewshot_iterations": "int >= 0",  # 0: unseen users keep uniform weights (run says so)
    "fewshot_learning_rate": "> 0", "num_shots": "each int >= 1", "shots": "int >= 1", "trials": "int >= 1",
    "synthetic_features": "int >= 1", "batch_size": "int >= 1",
    "truncation_side": "one of left right", "max_length": "int >= 1",
    "validation_fraction": "in [0, 1)", "reference": "one of head published",
    "max_tokens_per_batch": "int >= 1", "shard_size": "int >= 1", "stop_after_shards": "int >= 0",
    "embedding_dtype": "one of float32 bfloat16 float16", "pairs_dtype": "one of auto float32 bfloat16",
    "shot_selection": "one of random uncertainty active variance longest (or a list)",
    "selection": "one of active uncertainty variance", "num_suggestions": "int >= 1", "calibrated": "bool",
    "seeds": "int >= 0 or None (or a list)", "stop_thresholds": "each > 0 or None",
    "pair_budgets": "each int >= 1 or None", "stop_below": "> 0 or None",
    "choice_quality": "bool", "choice_prompts": "int >= 1 or None", "tune": "bool", "tuned": "bool",
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
                      "num_iterations": int, "num_shots": list, "max_fewshot_pairs": int, "embedding_dtype": str,
                      "choice_prompts": int}


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
        if default is None and value is not None and key in none_types and not isinstance(none_types[key], tuple):
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


def configure(config, argv=None, *, script=None, writable=None, checks=(), rules=None):
    """Apply `key=value` (or `--key value`) command-line overrides to a script's config, in place, and check it.

    config: the script's globals(); every public name bound to a bool/int/float/str/list/tuple/dict/None is a
    config key. Values are parsed as Python literals (a bare word is a string) and must keep the type of the
    default (an int is accepted for a float). A None default takes None or a value of its type in
    NONE_DEFAULT_TYPES / the script's `_types` (anything when neither names it); a tuple of types there, e.g.
    `_types = {"shot_selection": (str, list)}`, is accepted whatever the default. argv None: sys.argv[1:], or
    nothing in a notebook kernel. Every setting with a rule in RULES or in `rules` (a dataset's own) is
    range-checked (a None default also accepts None).
    script: the script's __file__. Given, configure also creates and test-writes the output folders `writable`
    ({key: default folder name beside the script}, e.g. {"out_dir": "results"}), runs `checks` (functions of the
    config dict that raise InputError: a dataset's or the baselines' own checks), and makes the script end on an
    InputError with one `error: ...` line (exit status 2) and on Ctrl-C with what was finished (exit status 130);
    every other exception keeps its traceback. All of it happens before any data is loaded.
    Returns {key: value} of the config, for the results JSON (a Config: its `.record` is the script's RunRecord, to
    pass as `record=` to the pipelines and writers, so that Ctrl-C can say what was finished and written).
    """
    result = Config()
    result.record = RunRecord()
    if script is not None:
        sys.excepthook = _excepthook(result.record)
    if argv is None:
        argv = [] if _in_notebook() else sys.argv[1:]
    defaults = dict(config)
    keys = _parse_overrides(config, argv)
    check_values({k: v for k, v in keys.items() if not (v is None and defaults.get(k) is None)},
                 {**RULES, **(rules or {})})
    for key, default in (writable or {}).items():
        folder = Path(keys[key]) if keys[key] else Path(script).resolve().parent / default
        _check_writable(key, folder)
    for check in checks:
        check(keys)
    result.update(keys)
    return result


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


@dataclasses.dataclass
class RunRecord:
    """What a configured script has done, for its Ctrl-C message: results finished (printed, not yet saved), files
    written (complete: every write is atomic) and how to resume unfinished work. configure() makes one (its
    result's `.record`); the pipelines and writers that take `record=` add to it."""
    finished: list = dataclasses.field(default_factory=list)
    written: list = dataclasses.field(default_factory=list)
    resume: str | None = None

    def message(self):
        lines = ["interrupted (Ctrl-C): stopped cleanly; no half-written file is left under an output name."]
        if self.finished:
            lines.append(f"finished (printed above, not saved: results are written when the run ends): "
                         f"{', '.join(self.finished)}")
        written = list(dict.fromkeys(str(p) for p in self.written))
        lines.append(f"written: {', '.join(written)}" if written else "nothing was written.")
        if self.resume:
            lines.append(self.resume)
        return "\n".join(lines)


def note_finished(record, what):
    """Add a finished piece of work (a str) to `record` (a RunRecord, or None outside a script)."""
    if record is not None:
        record.finished.append(what)


def note_written(record, path):
    """Add a written file to `record` (a RunRecord, or None)."""
    if record is not None and path is not None:
        record.written.append(Path(path))


class Config(dict):
    """configure()'s result: {key: value} of a script's config (for its results JSON), with `.record`, the script's
    RunRecord."""
    record: RunRecord


def _excepthook(record):
    """sys.excepthook of a configured script: one `error:` line (exit 2) for an InputError, what `record` holds for
    Ctrl-C (exit 130), the usual traceback for anything else (a bug)."""
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            message, code = record.message(), 130
        elif issubclass(exc_type, InputError):
            message, code = f"error: {exc}", 2
        else:
            return sys.__excepthook__(exc_type, exc, tb)
        sys.stdout.flush()
        print(message, file=sys.stderr, flush=True)
        os._exit(code)  # after an uncaught exception Python would exit with status 1
    return hook
