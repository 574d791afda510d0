"""Benchmark of scoring with a learned model (not a pytest test): PersonalizedReward.reward throughput.

Builds the tiny random reward model of the tests (CPU) or, with big=True, a randomly initialised model with the
Skywork-Reward-Llama-3.1-8B-v0.2 shapes (bf16, on CUDA, no download) behind the tiny byte-level tokenizer (about
one token per byte), and a learned-model file with a random V [F, K]. Scores n_convs random [user, assistant]
conversations of words_min..words_max words per message and prints conversations/s and tokens/s; on the tiny
model also the time of .personalize on 10 comparisons and of .export, and the exported model's own throughput.

    python tests/bench_personalize.py                     # tiny model on CPU
    python tests/bench_personalize.py big=True            # 8B shapes on a GPU
    python tests/bench_personalize.py big=True layers=8   # fewer layers: quicker, same per-layer costs

key=value args: n_convs, words_min, words_max, K, big, layers, seed, device.
"""
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402
from conftest import make_tiny_reward_model  # noqa: E402
from lorelib import extract  # noqa: E402
from lorelib.extract import load_reward_model  # noqa: E402

# -----------------------------------------------------------------------------
n_convs = 512
words_min, words_max = 20, 200  # words per message (~6 tokens a word with the byte-level tokenizer)
K = 10
big = False  # 8B shapes on a GPU
layers = 32
seed = 0
device = None
for arg in sys.argv[1:]:  # key=value overrides
    key, val = arg.split("=", 1)
    assert key in globals() and not key.startswith("_"), f"unknown arg {key}"
    globals()[key] = val if isinstance(globals()[key], str) or globals()[key] is None else \
        (val.lower() in ("1", "true", "yes") if isinstance(globals()[key], bool) else type(globals()[key])(val))
# -----------------------------------------------------------------------------
WORDS = ("the quick brown fox jumps over a lazy dog while reward models read preferences of many users "
         "and summarise long posts about their day").split()


def conversations(n, g):
    def text():
        k = int(torch.randint(words_min, words_max + 1, (1,), generator=g))
        return " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (k,), generator=g))
    return [[{"role": "user", "content": text()}, {"role": "assistant", "content": text()}] for _ in range(n)]


def timed(fn, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out, time.perf_counter() - t0


def main():
    dev = torch.device(device or ("cuda" if big and torch.cuda.is_available() else "cpu"))
    tmp = tempfile.mkdtemp()
    base = make_tiny_reward_model(os.path.join(tmp, "tiny"))
    F = 4096 if big else 64
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(F, K, generator=g)
    W = torch.softmax(torch.randn(4, K, generator=g), 1)
    path = utils.save_lore_model(os.path.join(tmp, "model.safetensors"), V, W, W[:0], model_name=base, dataset="bench")
    rm = utils.PersonalizedReward.load(path, device=dev)
    if big:  # random 8B-shaped model behind the tiny tokenizer
        from transformers import AutoModelForSequenceClassification, LlamaConfig

        tokenizer, _ = load_reward_model(base, device="cpu")
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                             max_position_embeddings=131072, rms_norm_eps=1e-5, num_labels=1,
                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(seed)
        with torch.device(dev):
            model = AutoModelForSequenceClassification.from_config(
                config, dtype=torch.bfloat16, attn_implementation=extract._default_attn(dev, torch.bfloat16)).eval()
        rm.tokenizer, rm.model = tokenizer, model
    tokenizer, model = rm.load_reward_model()
    convs = conversations(n_convs, g)
    n_tokens = sum(len(t) for t in tokenizer([tokenizer.apply_chat_template(c, tokenize=False) for c in convs],
                                             add_special_tokens=False)["input_ids"])
    print(f"device={dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}), "
          f"threads={torch.get_num_threads()}, model hidden={F} layers={model.config.num_hidden_layers} "
          f"dtype={model.dtype}; {n_convs} conversations, {n_tokens} tokens ({n_tokens / n_convs:.0f} per conv)")
    rm.reward(convs[:16], user=0)  # warm-up
    r, t = timed(lambda: rm.reward(convs, user=0), dev)
    print(f"reward: {n_convs / t:.1f} conversations/s, {n_tokens / t:.0f} tokens/s ({t:.2f}s)")
    _, t = timed(lambda: rm.reward(convs, user="uniform"), dev)
    print(f"reward (again, uniform user): {n_convs / t:.1f} conversations/s")
    if big:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB" if dev.type == "cuda" else "")
        return
    _, t = timed(lambda: rm.personalize(convs[:10], convs[10:20]), dev)
    print(f"personalize on 10 comparisons (20 conversations embedded, 500 Adam steps): {t:.2f}s")
    out, t = timed(lambda: rm.export(os.path.join(tmp, "export"), user=0), dev)
    print(f"export: {t:.3f}s")
    from transformers import AutoModelForSequenceClassification
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in convs]

    def hf_scores(bs=64):
        outs = []
        for i in range(0, len(texts), bs):
            enc = tokenizer(texts[i:i + bs], add_special_tokens=False, padding=True, return_tensors="pt")
            with torch.inference_mode():
                outs.append(hf(**enc).logits.squeeze(-1))
        return torch.cat(outs)
    logits, t = timed(hf_scores, dev)
    print(f"exported model, plain transformers loop (batches of 64 in input order): {n_convs / t:.1f} conversations/s;"
          f" max |logit - reward| = {(logits - r).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
