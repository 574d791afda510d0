import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests use small tensors, for which one thread is fastest; on a busy 2-core machine, OpenMP threads
# waiting for each other make small matrix products many times slower. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # the same for the fused numba kernel
# Mutation testing (tests/mutate.py): mutmut's recording pass sets MUTANT_UNDER_TEST=stats, which subprocesses
# (the script tests) would inherit, and there mutmut finds no configuration and fails. This process keeps its own
# copy of the mode; subprocesses run the plain code. Under a mutant the variable stays: scripts run the mutant too.
if os.environ.get("MUTANT_UNDER_TEST") == "stats":
    del os.environ["MUTANT_UNDER_TEST"]

# Llama-3-style template: the text starts with BOS, every message is header + content + <|eot_id|>
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
TINY_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>", "<pad>"]


def make_tiny_reward_model(path, seed=0, hidden_size=64, num_layers=2, with_pad_token=True):
    """Save a tiny random Llama reward model + tokenizer to `path` (no download) and return path as str.
    Tokenizer: byte-level BPE without merges (256 byte tokens, any unicode text works, ~1 token per byte) plus the
    Llama-3 special tokens, pad '<pad>', eos '<|eot_id|>', Llama-3 chat template.
    Model: LlamaForSequenceClassification, 2 layers, hidden 64, 4 heads, 2 KV heads, num_labels 1, float32.
    with_pad_token=False saves a tokenizer and config without pad token (to test the eos fallback)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(TINY_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<pad>" if with_pad_token else None,
                                        chat_template=LLAMA3_CHAT_TEMPLATE)
    tokenizer.save_pretrained(path)

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                         num_labels=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config).float().eval()
    model.save_pretrained(path)
    return str(path)


# The baselines on a few thousand pairs in the script tests: narrower, with larger batches and steps and more
# epochs than their published settings (sized for tens of thousands of pairs in 4096-d), to keep the suite fast;
# the README reports them at their published settings.
# small baselines, released rows only (the tuned rows: test_tldr.py's synthetic train_basis)
FAST_BASELINES = ["baseline_settings=" + repr({
    "vpl": {"hidden_dim": 64, "latent_dim": 32, "num_epochs": 5, "learning_rate": 2e-3},
    "pal": {"dim": 64, "num_epochs": 3, "batch_size": 16, "learning_rate": 2e-3, "user_learning_rate": 2e-2,
            "fewshot_epochs": 10, "fewshot_batch_size": 16, "fewshot_learning_rate": 2e-2}}), "tuned=False"]


def run_script(script, *overrides, check=True):
    """Run a repository script in a subprocess from a temp working directory -> CompletedProcess
    (stdout and stderr captured as text). The script path is relative to the repository root."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as cwd:  # scripts must not depend on the working directory
        proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *map(str, overrides)],
                              cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


RB2_SUBSETS = ["Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties"]  # allenai/reward-bench-2


def write_rb2(folder):
    """A tiny RewardBench 2 test split (3 prompts per subset) as parquet in `folder` -> folder."""
    rows = []
    for s, subset in enumerate(RB2_SUBSETS):
        for i in range(3):
            chosen = [f"{subset} good {i}"] + ([f"{subset} also good {i}"] if subset == "Ties" else [])
            rejected = [f"{subset} bad {i} {j}" for j in range(3)]
            rows.append({"id": f"{s}-{i}", "prompt": f"{subset} question {i}?", "chosen": chosen, "rejected": rejected,
                         "num_correct": len(chosen), "num_rejected": 3, "total_completions": len(chosen) + 3,
                         "models": ["m"] * (len(chosen) + 3), "subset": subset})
    os.makedirs(folder, exist_ok=True)
    import pandas as pd
    pd.DataFrame(rows).to_parquet(os.path.join(folder, "test-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory):
    """Path (str) of a saved tiny random reward model + tokenizer, loadable with model_name=<path>."""
    return make_tiny_reward_model(tmp_path_factory.mktemp("tiny_reward_model"))
