"""Benchmark of the embedding extractor core (not a pytest test).

Random-init LlamaForSequenceClassification with the Skywork-Reward-Llama-3.1-8B-v0.2 shapes (bf16, on CUDA, no
download) and synthetic token-id sequences with PersonalLLM-like lengths (log-uniform in [min_len, max_len]).
Measures (a) the length-sorted batched path embed_token_ids() and (b) a one-at-a-time loop on a subset of
`single_n` random sequences, extrapolated per sequence/token to the whole set. Prints tokens/s, sequences/s,
peak GPU memory and the speedup.

    python tests/bench_extract.py                          # full 8B shapes, on a GPU
    python tests/bench_extract.py n_seqs=500 layers=8      # fewer layers: quicker, same per-layer costs
    python tests/bench_extract.py tiny=True                # 2-layer small config on CPU (smoke test)

key=value overrides (utils.configure): n_seqs, max_tokens_per_batch, max_batch_size, layers, single_n, min_len,
max_len, padding_side, seed, tiny, device.
"""
import math
import os
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
from lorelib import extract  # noqa: E402
from lorelib.extract import embed_token_ids  # noqa: E402

# -----------------------------------------------------------------------------
n_seqs = 2000
max_tokens_per_batch = 16384
max_batch_size = 64
layers = 32  # Skywork-Reward-Llama-3.1-8B has 32
single_n = 200  # sequences for the one-at-a-time loop (extrapolated)
min_len = 50  # sequence lengths: log-uniform in [min_len, max_len]
max_len = 1500
padding_side = "right"
seed = 0
tiny = False  # 2-layer hidden-64 model on CPU: smoke test of this script
device = None  # default: cuda if available (and not tiny), else cpu
# -----------------------------------------------------------------------------
utils.configure(globals())  # key=value overrides


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gib(dev):
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def main():
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if tiny:
        cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=min(layers, 2), num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)
    else:  # Skywork/Skywork-Reward-Llama-3.1-8B-v0.2
        cfg = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256)
    config = LlamaConfig(**cfg, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, num_labels=1,
                         pad_token_id=0, tie_word_embeddings=False)
    attn = extract._default_attn(dev, dtype)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(dev):  # random init directly on the device in the target dtype (no fp32 CPU copy)
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype, attn_implementation=attn).eval()
    sync(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device={dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}) dtype={dtype} "
          f"attn_implementation={model.config._attn_implementation} layers={config.num_hidden_layers} "
          f"hidden={config.hidden_size} params={n_params / 1e9:.2f}B (init {time.perf_counter() - t0:.1f}s)")
    weights_gib = torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")

    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n_seqs, generator=g)
    lengths = torch.exp(math.log(min_len) + u * (math.log(max_len) - math.log(min_len))).long().tolist()
    token_ids = [torch.randint(1, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    n_tokens = sum(lengths)
    batches = extract._length_batches(lengths, max_tokens_per_batch, max_batch_size)
    padded = sum(len(b) * lengths[b[0]] for b in batches)
    print(f"{n_seqs} sequences, {n_tokens} tokens, length min/median/mean/max = {min(lengths)}/"
          f"{sorted(lengths)[n_seqs // 2]}/{n_tokens / n_seqs:.0f}/{max(lengths)}; {len(batches)} batches "
          f"(max_tokens_per_batch={max_tokens_per_batch}, max_batch_size={max_batch_size}), "
          f"padding efficiency {n_tokens / padded:.1%}")

    # warm-up (kernels, allocator) on a few sequences of each kind
    embed_token_ids(model, token_ids[:8], 0, max_tokens_per_batch, max_batch_size, padding_side)
    embed_token_ids(model, token_ids[:2], 0, max_batch_size=1)
    sync(dev)

    # (a) batched, length-sorted
    reset_peak(dev)
    t0 = time.perf_counter()
    emb = embed_token_ids(model, token_ids, 0, max_tokens_per_batch, max_batch_size, padding_side)
    sync(dev)
    t_batched = time.perf_counter() - t0
    peak_batched = peak_gib(dev)

    # (b) one at a time, on a random subset
    subset = torch.randperm(n_seqs, generator=g)[:single_n].tolist()
    sub_tokens = sum(lengths[i] for i in subset)
    reset_peak(dev)
    t0 = time.perf_counter()
    single = torch.cat([embed_token_ids(model, [token_ids[i]], 0, max_batch_size=1) for i in subset])
    sync(dev)
    t_single = time.perf_counter() - t0
    peak_single = peak_gib(dev)

    diff = (emb[subset] - single).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(emb[subset], single, dim=-1).min().item()
    tok_b, seq_b = n_tokens / t_batched, n_seqs / t_batched
    tok_s, seq_s = sub_tokens / t_single, single_n / t_single
    print()
    print(f"{'mode':<16}{'seqs':>7}{'tokens':>10}{'time_s':>10}{'seq/s':>10}{'tok/s':>11}{'peak_GiB':>10}")
    print(f"{'batched':<16}{n_seqs:>7}{n_tokens:>10}{t_batched:>10.2f}{seq_b:>10.1f}{tok_b:>11.0f}"
          f"{peak_batched:>10.2f}")
    print(f"{'one-at-a-time':<16}{single_n:>7}{sub_tokens:>10}{t_single:>10.2f}{seq_s:>10.1f}{tok_s:>11.0f}"
          f"{peak_single:>10.2f}")
    print(f"one-at-a-time measured on {single_n} random sequences; extrapolated to all {n_seqs} sequences: "
          f"{n_tokens / tok_s:.1f}s by tokens/s ({n_seqs / seq_s:.1f}s by seq/s)")
    print(f"speedup of batched: {tok_b / tok_s:.2f}x in tokens/s, {seq_b / seq_s:.2f}x in seq/s")
    print(f"model weights {weights_gib:.2f} GiB; peak above weights: batched {peak_batched - weights_gib:.2f} GiB, "
          f"one-at-a-time {peak_single - weights_gib:.2f} GiB")
    print(f"batched vs one-at-a-time on the subset: max |diff| {diff:.3g}, min cosine {cos:.6f} "
          f"({'bf16: not bitwise equal' if dtype == torch.bfloat16 else 'float32'})")


if __name__ == "__main__":
    main()
