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
AutoModelForSequenceClassification checkpoint whose score.weight is (V w)^T, linked to the reward model's
own weight files (utils.export_reward_model).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import utils  # noqa: E402
from utils import InputError, MissingFileError  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
comparisons = None         # the person's jsonl file (required)
model = None               # learned-model file written by a train_basis.py (required)
model_name = None          # reward model (hub id or local path); default: the one named in the model file
out_dir = None             # exported reward model; default: PRISM/results/personalized/<jsonl name>_<model name>
export = True              # False: only print w
num_iterations = None      # few-shot Adam steps; default: the model file's (500)
learning_rate = None       # few-shot learning rate; default: the model file's
device = None              # reward model device; default: cuda if available, else cpu
# -----------------------------------------------------------------------------
config = utils.configure(globals(), script=__file__, writable={"out_dir": "results"} if export else None)
if comparisons is None or model is None:
    raise InputError(f"comparisons={comparisons}, model={model}: both are needed; pass "
                     "comparisons=FILE.jsonl model=results/models/K..._alpha....safetensors")
if not Path(comparisons).is_file():
    raise MissingFileError(f"comparisons={comparisons}: no such file")

chosen, rejected, bad = utils.read_comparisons(comparisons)
for n, reason in bad:
    print(f"{comparisons}:{n}: skipped, {reason}")
if not chosen:
    raise InputError(f"comparisons={comparisons}: no valid comparison (see the lines above); each line must be "
                     '{"prompt": ..., "chosen": ..., "rejected": ...}')
print(f"{len(chosen)} comparisons read from {comparisons}" + (f" ({len(bad)} bad line(s) skipped)" if bad else ""))

rm = utils.PersonalizedReward.load(model, model_name=model_name, device=device)
print(rm)
E = rm.embed(chosen + rejected)  # what rm.personalize(chosen, rejected) does, keeping the embeddings
diffs = E[:len(chosen)] - E[len(chosen):]
w = rm.fit_weights(diffs, num_iterations, learning_rate)
margin, uniform = diffs @ rm.head(w), diffs @ rm.head("uniform")
print("w = [" + ", ".join(f"{x:.4f}" for x in w.tolist()) + "]")
print(f"ordered right: {int((margin > 0).sum())}/{len(margin)} of these comparisons with w, "
      f"{int((uniform > 0).sum())}/{len(uniform)} with the uniform weights")
if export:
    out = Path(out_dir) if out_dir else (utils.script_out_dir(__file__) / "personalized"
                                         / f"{Path(comparisons).stem}_{Path(model).stem}")
    rm.export(out, user=w)
    print(f"load it with AutoModelForSequenceClassification.from_pretrained({str(out)!r})")
