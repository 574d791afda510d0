"""Personalize a learned model to one person from their own comparisons, and export their reward model.

    python PRISM/personalize.py comparisons=my.jsonl model=PRISM/results/models/K10_alpha10000.safetensors
    python PRISM/personalize.py comparisons=my.jsonl model=... out_dir=alice_rm model_name=/path/to/local/copy

comparisons: a jsonl file, one comparison a line: {"prompt": ..., "chosen": ..., "rejected": ...}, where the
prompt is a string (one user message) or a list of chat messages [{"role", "content"}, ...] and chosen /
rejected are the two replies (strings, or lists of messages). Lines that are not such an object are reported
with their line number and skipped.
model: a learned-model file of any dataset's train_basis.py (results/models/K{K}_alpha{alpha}.safetensors).

Embeds both conversations of every comparison with the reward model named in the model file (or model_name),
fits the person's weights w [K] on the frozen basis V (the few-shot step of train_basis.py, with the settings
stored in the file), prints w and how many of their comparisons it orders right, and writes a Hugging Face
AutoModelForSequenceClassification checkpoint whose score.weight is (V w / 100)^T, linked to the reward model's
own weight files (export_reward_model): its logits are calibrated Bradley-Terry log-odds, on the base reward
model's scale (calibrated=False: (V w)^T, the raw e^T V w). To steer a policy with it: PRISM/steer_policy.py.

    python PRISM/personalize.py suggest=pool.jsonl model=... [comparisons=my.jsonl]

suggest: a jsonl pool of candidate comparisons the person has not answered, one a line {"prompt": ..., "a": ...,
"b": ...}. Prints the next num_suggestions to ask, best first, each with its expected information about w (nats)
(PersonalizedReward.suggest: `selection` "active" asks where the answer tells most about w, "uncertainty"
where it is predicted nearest 50/50, "variance" where the predicted reward gap is least known), given the
comparisons answered so far (none: from the prior); pool lines identical to an answered comparison are skipped.
stop_below (nats): the stopping rule: fewer (or none: "stop asking") once the best remaining expected information
falls below it (what each threshold saves and costs: the dataset READMEs, "Choosing the comparisons").
With suggest, nothing is exported.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorelib.config import (
    InputError,  # noqa: E402
    MissingFileError,  # noqa: E402
    configure,  # noqa: E402
)
from lorelib.files import script_out_dir  # noqa: E402
from lorelib.learned import PersonalizedReward, read_comparisons  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
comparisons = None         # the person's jsonl file of answered comparisons (required unless suggest is given)
model = None               # learned-model file written by a train_basis.py (required)
model_name = None          # reward model (hub id or local path); default: the one named in the model file
out_dir = None             # exported reward model; default: PRISM/results/personalized/<jsonl name>_<model name>
export = True              # False: only print w
calibrated = True          # the export's logits: calibrated log-odds e^T V w / 100 (as the base reward model's own
                           # head gives; sigmoid(r_c - r_r) = P(c preferred)), or False: the raw e^T V w (100x larger)
num_iterations = None      # few-shot Adam steps; default: the model file's (500)
learning_rate = None       # few-shot learning rate; default: the model file's
device = None              # reward model device; default: cuda if available, else cpu
suggest = None             # a jsonl pool of unanswered candidates {"prompt", "a", "b"}: print the next ones to ask
num_suggestions = 3        # with suggest: how many
selection = "active"       # with suggest: "active" (most information about w), "uncertainty" (nearest 50/50) or
                           # "variance" (the least known reward gap)
stop_below = None          # with suggest: stop suggesting once the best remaining expected information (nats) is
                           # below this, e.g. 0.05 (None: always num_suggestions)
_types = {"comparisons": str, "model": str, "model_name": str, "suggest": str, "stop_below": float}
# -----------------------------------------------------------------------------
config = configure(globals(), script=__file__, writable={"out_dir": "results"} if export else None)
export = export and suggest is None
if model is None or (comparisons is None and suggest is None):
    raise InputError(f"comparisons={comparisons}, suggest={suggest}, model={model}: pass model=results/models/"
                     "K..._alpha....safetensors and comparisons=FILE.jsonl (to personalise), suggest=POOL.jsonl "
                     "(to choose what to ask next) or both")
for path in (comparisons, suggest):
    if path is not None and not Path(path).is_file():
        raise MissingFileError(f"{'comparisons' if path == comparisons else 'suggest'}={path}: no such file")


def read(key, path, sides, what):
    """The good lines of the jsonl `path` (setting `key`) -> (first sides, second sides, their line numbers)."""
    first, second, bad = read_comparisons(path, sides)
    for n, reason in bad:
        print(f"{path}:{n}: skipped, {reason}")
    if not first:
        raise InputError(f"{key}={path}: no valid {what} (see the lines above); each line must be "
                         f'{{"prompt": ..., "{sides[0]}": ..., "{sides[1]}": ...}}')
    print(f"{len(first)} {what}s read from {path}" + (f" ({len(bad)} bad line(s) skipped)" if bad else ""))
    skip = dict(bad)
    with open(path, encoding="utf-8") as f:
        return first, second, [n for n, line in enumerate(f, 1) if line.strip() and n not in skip]


chosen, rejected, _ = read("comparisons", comparisons, ("chosen", "rejected"), "comparison") if comparisons else \
    ([], [], [])
rm = PersonalizedReward.load(model, model_name=model_name, device=device)
print(rm)
diffs = None
if chosen:
    E = rm.embed(chosen + rejected)  # what rm.personalize(chosen, rejected) does, keeping the embeddings
    diffs = E[:len(chosen)] - E[len(chosen):]
    w = rm.fit_weights(diffs, num_iterations, learning_rate)
    margin, uniform = diffs @ rm.head(w), diffs @ rm.head("uniform")
    print("w = [" + ", ".join(f"{x:.4f}" for x in w.tolist()) + "]")
    print(f"ordered right: {int((margin > 0).sum())}/{len(margin)} of these comparisons with w, "
          f"{int((uniform > 0).sum())}/{len(uniform)} with the uniform weights")
if suggest:
    a, b, lines = read("suggest", suggest, ("a", "b"), "candidate")
    done = {frozenset(json.dumps(c) for c in pair) for pair in zip(chosen, rejected)}
    keep = [i for i in range(len(a)) if frozenset((json.dumps(a[i]), json.dumps(b[i]))) not in done]
    if len(keep) < len(a):
        print(f"{len(a) - len(keep)} candidate(s) already answered in {comparisons}: skipped")
    if not keep:
        raise InputError(f"suggest={suggest}: every candidate is already answered")
    best, info = rm.suggest([(a[i], b[i]) for i in keep], min(num_suggestions, len(keep)), answered=diffs,
                            rule=selection, stop_below=stop_below, return_information=True)
    if best:
        print(f"ask next ({selection}, best first; add each answer to the comparisons file as "
              '{"prompt": ..., "chosen": <the preferred reply>, "rejected": <the other>}):')
    for rank, (j, gain) in enumerate(zip(best, info), 1):
        i = keep[j]
        print(f"{rank}. {suggest}:{lines[i]} (expected information {gain:.3f} nats)\n"
              f"   prompt: {a[i][-2]['content']!r:.200}\n   a: {a[i][-1]['content']!r:.200}\n"
              f"   b: {b[i][-1]['content']!r:.200}")
    if len(info) > len(best):
        print(f"stop asking{' more' if best else ''}: the best remaining comparison's expected information, "
              f"{info[-1]:.3f} nats, is below stop_below={stop_below:g}")
if export:
    out = Path(out_dir) if out_dir else (script_out_dir(__file__) / "personalized"
                                         / f"{Path(comparisons).stem}_{Path(model).stem}")
    rm.export(out, user=w, calibrated=calibrated)
    print(f"its logits are {'calibrated log-odds (e^T V w / 100)' if calibrated else 'raw e^T V w'}; load it with "
          f"AutoModelForSequenceClassification.from_pretrained({str(out)!r})")
