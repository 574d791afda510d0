"""Steer a policy with one person's reward: GRPO (TRL's GRPOTrainer) with a reward model exported by personalize.py.

    python PRISM/personalize.py comparisons=my.jsonl model=PRISM/results/models/K10_alpha10000.safetensors \
        out_dir=alice_rm
    python PRISM/steer_policy.py reward_model=alice_rm policy=Qwen/Qwen2.5-0.5B-Instruct prompts=prompts.jsonl

prompts: a jsonl file, one {"prompt": ...} a line (a string: one user message, or a list of chat messages).
reward_model: an export folder of personalize.py (or of PersonalizedReward.export), or any
AutoModelForSequenceClassification reward model. An export's logits are calibrated Bradley-Terry log-odds by
default (e^T V w / 100, the base reward model's own scale); one exported with calibrated=False gives 100 times
larger rewards, which swamp the KL term (beta) and make a reward model's sigmoid(r_c - r_r) overconfident: the
script says so. GRPO normalises rewards within each group of completions (scale_rewards="group"), which hides the
scale from its advantages but not from the KL term nor from the logged rewards.

Writes out_dir/ (default PRISM/results/steered/<reward model folder name>): the trained policy (save_pretrained)
and steer_policy.json: the config, the reward model's logits ("calibrated" or "raw", when an export says), every
logged step (rewards/<name>/mean is the mean reward of the step's completions) and the last step's prompts,
completions and rewards.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lorelib.config import (  # noqa: E402
    InputError,  # noqa: E402
    MissingFileError,  # noqa: E402
    check_values,
    configure,
    set_seed,
)
from lorelib.export import EXPORT_HEAD_FILE  # noqa: E402
from lorelib.extract import check_conversations  # noqa: E402
from lorelib.files import load_metadata, save_json, save_or_fallback, script_out_dir  # noqa: E402
from lorelib.report import print_table  # noqa: E402

# -----------------------------------------------------------------------------
# config (edit in place, or override on the command line as key=value)
policy = None              # the policy to train: a hub id or local folder of a causal LM with a chat template
reward_model = None        # the personalized reward model: an export folder of personalize.py
prompts = None             # jsonl of {"prompt": ...}
max_steps = 100            # GRPO steps
batch_size = 8             # completions per step (a multiple of num_generations)
num_generations = 4        # completions per prompt (GRPO's group)
max_completion_length = 128
learning_rate = 1e-6
beta = 0.04                # weight of the KL term towards the initial policy (0: no reference model)
temperature = 1.0
scale_rewards = "group"    # GRPO's reward normalisation: "group", "batch" or "none"
logging_steps = 1
seed = 0
out_dir = None             # default: PRISM/results/steered/<reward model folder name>
device = None              # "cpu" forces the CPU; default: a GPU when there is one
_types = {"policy": str, "reward_model": str, "prompts": str}
_rules = {"max_steps": "int >= 1", "batch_size": "int >= 1", "num_generations": "int >= 2",
          "max_completion_length": "int >= 1", "learning_rate": "> 0", "beta": ">= 0", "temperature": "> 0",
          "scale_rewards": "one of group batch none", "logging_steps": "int >= 1"}
# -----------------------------------------------------------------------------


def check(config):
    """Every setting before any model is loaded: the ranges, the files, the batch arithmetic."""
    check_values(config, _rules)
    for key in ("policy", "reward_model", "prompts"):
        if config[key] is None:
            raise InputError(f"{key}=None: pass policy=MODEL reward_model=EXPORT_FOLDER prompts=FILE.jsonl")
    if not Path(config["prompts"]).is_file():
        raise MissingFileError(f"prompts={config['prompts']}: no such file")
    if Path(config["reward_model"]).exists() and not (Path(config["reward_model"]) / "config.json").is_file():
        raise MissingFileError(f"reward_model={config['reward_model']}: no config.json there; make an export with: "
                               f"python {Path(__file__).parent / 'personalize.py'} comparisons=... model=... "
                               "out_dir=...")
    if config["batch_size"] % config["num_generations"]:
        raise InputError(f"batch_size={config['batch_size']} must be a multiple of num_generations="
                         f"{config['num_generations']} (GRPO scores whole groups of completions)")


def read_prompts(path):
    """-> list of {"prompt": [messages]} from a jsonl of {"prompt": str or messages}; bad lines are an InputError."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                rows.append({"prompt": check_conversations([messages])[0]})
            except (json.JSONDecodeError, KeyError, TypeError, InputError) as e:
                raise InputError(f"{path}:{n}: expected {{\"prompt\": a string or a list of chat messages}} ({e})")
    if not rows:
        raise InputError(f"prompts={path}: no prompts")
    return rows


def export_logits(folder):
    """'calibrated' / 'raw' from an export's head file (PersonalizedReward.export), None for another model."""
    head = Path(folder) / EXPORT_HEAD_FILE
    return json.loads(load_metadata(head).get("logits", "null")) if head.is_file() else None


config = configure(globals(), script=__file__, writable={"out_dir": "results"}, checks=[check])
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

set_seed(seed)
data = Dataset.from_list(read_prompts(prompts))
logits = export_logits(reward_model)
print(f"{len(data)} prompts from {prompts}; reward model {reward_model}: "
      + {"calibrated": "an export with calibrated logits (Bradley-Terry log-odds, the base reward model's scale)",
         "raw": "an export with RAW logits e^T V w, 100 times the log-odds: the KL term (beta) is swamped; export "
                "with calibrated=True", None: "not a LoRe export (its own logits)"}[logits])
out = Path(out_dir) if out_dir else script_out_dir(__file__) / "steered" / Path(reward_model).name
args = GRPOConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=batch_size,
                  num_generations=num_generations, max_completion_length=max_completion_length,
                  learning_rate=learning_rate, beta=beta, temperature=temperature, scale_rewards=scale_rewards,
                  logging_steps=logging_steps, seed=seed, report_to=[], save_strategy="no",
                  use_cpu=device == "cpu" or not torch.cuda.is_available(), bf16=torch.cuda.is_available()
                  and device != "cpu")
trainer = GRPOTrainer(model=policy, reward_funcs=reward_model, args=args, train_dataset=data)
trainer.train()
trainer.save_model(str(out))
name = trainer.reward_func_names[0]
last = [{"prompt": p, "completion": c, "reward": r} for p, c, r in
        zip(trainer._logs["prompt"], trainer._logs["completion"], trainer._logs["rewards"][name])]
means = [(h["step"], h[f"rewards/{name}/mean"]) for h in trainer.state.log_history if f"rewards/{name}/mean" in h]
print_table(["step", f"mean reward ({name})"], [[s, m] for s, m in means])
path = save_or_fallback(out / "steer_policy.json", lambda p: save_json(p, {
    "config": config, "reward_model_logits": logits, "reward_name": name, "log_history": trainer.state.log_history,
    "last_step": last}))
print(f"wrote the policy to {out} and {path}")
