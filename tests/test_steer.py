"""Steering a policy with an exported personalized reward: PRISM/steer_policy.py runs TRL's GRPOTrainer (two steps,
CPU) with a tiny random policy and a reward model exported from the tiny reward model."""
import json
import os

import pytest
import torch
from test_errors import run_inline
from test_personalize import hf_scores, make_model_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import utils
from conftest import run_script

STEPS = ["max_steps=2", "batch_size=4", "num_generations=2", "max_completion_length=6", "seed=3"]


@pytest.fixture(scope="module")
def setup(tiny_reward_model, tmp_path_factory):
    """(folder, PersonalizedReward): a tiny random causal LM policy with the reward model's tokenizer, prompts, and
    user "b"'s reward exported calibrated (the default) and raw."""
    tmp = tmp_path_factory.mktemp("steer")
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    with open(tmp / "prompts.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": f"Tell me about topic {i}." if i % 2 else
                                [{"role": "user", "content": f"A question, number {i}?"}]}) + "\n")
    rm = utils.PersonalizedReward.load(make_model_file(tmp / "m.safetensors", tiny_reward_model))
    rm.V = 30 * rm.V  # a confident user: rewards of a few units of log-odds
    rm.export(tmp / "alice", user="b")
    rm.export(tmp / "alice_raw", user="b", calibrated=False)
    return tmp, rm


def steer(tmp, export, out):
    run_script("PRISM/steer_policy.py", f"policy={tmp / 'policy'}", f"reward_model={tmp / export}",
               f"prompts={tmp / 'prompts.jsonl'}", f"out_dir={tmp / out}", *STEPS)
    return json.loads((tmp / out / "steer_policy.json").read_text())


def test_grpo_logs_the_exported_models_own_rewards_on_the_base_scale(setup):
    tmp, rm = setup
    cal, raw = steer(tmp, "alice", "out_cal"), steer(tmp, "alice_raw", "out_raw")
    assert (cal["reward_model_logits"], raw["reward_model_logits"]) == ("calibrated", "raw")
    # the rewards TRL logged for the last step's completions are the export's own logits for them, which are
    # PersonalizedReward's calibrated rewards e^T V w / 100 of the same conversations
    last = cal["last_step"]
    conversations = [r["prompt"] + r["completion"] for r in last]
    assert len(last) == 4 and all(r["completion"][-1]["role"] == "assistant" for r in last)
    logged = torch.tensor([r["reward"] for r in last])
    _, exported = hf_scores(tmp / "alice", rm.load_reward_model()[0], conversations)
    assert torch.allclose(logged, exported, atol=1e-4)
    assert torch.allclose(logged, rm.reward(conversations, user="b"), atol=1e-4)
    assert (logged - logged.mean()).abs().max() > 1e-3  # the completions are told apart
    means = [h[f"rewards/{cal['reward_name']}/mean"] for h in cal["log_history"] if "rewards/alice/mean" in h]
    assert len(means) == 2 and means[-1] == pytest.approx(logged.mean().item(), abs=1e-5)
    # the same first step (same seed, same policy) with the raw export: 100 times the calibrated rewards
    raw_first = [h for h in raw["log_history"] if f"rewards/{raw['reward_name']}/mean" in h][0]
    assert raw_first[f"rewards/{raw['reward_name']}/mean"] == pytest.approx(100 * means[0], rel=1e-4)
    assert os.path.isfile(tmp / "out_cal" / "config.json")  # the trained policy


@pytest.mark.parametrize("override, shown", [
    ("batch_size=3", "multiple of num_generations=2"),
    ("prompts=/nonexistent.jsonl", "no such file"),
    ("scale_rewards=sum", "one of group, batch, none"),
])
def test_bad_settings_are_one_line_before_any_model_loads(setup, override, shown):
    tmp, _ = setup
    proc = run_inline("PRISM/steer_policy.py", f"policy={tmp / 'policy'}", f"reward_model={tmp / 'alice'}",
                      f"prompts={tmp / 'prompts.jsonl'}", f"out_dir={tmp / 'bad'}", *STEPS, override)
    assert proc.returncode == 2 and shown in proc.stderr and "Traceback" not in proc.stderr
