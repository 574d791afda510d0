"""Tests of the embedding extractor on a tiny random Llama reward model (CPU, no download)."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import utils
from lorelib import extract
from lorelib.extract import embed_batch, embed_token_ids, load_reward_model, reward_head, tokenize_conversations

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the quick brown fox jumps over a lazy dog while reward models read preferences of many users; "
         "ünïcödé ✓ 漢字 😀 and numbers 12345").split()


def make_conversations(n, seed=0, max_words=25):
    """n conversations of varied length: mostly [user, assistant], every 4th a 4-turn conversation."""
    g = torch.Generator().manual_seed(seed)

    def text():
        k = int(torch.randint(1, max_words, (1,), generator=g))
        return " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (k,), generator=g))

    convs = []
    for i in range(n):
        conv = [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        if i % 4 == 3:
            conv += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        convs.append(conv)
    return convs


@pytest.fixture(scope="module")
def tok_model(tiny_reward_model):
    return load_reward_model(tiny_reward_model)


def single_ids(tokenizer, conv):
    return tokenizer(tokenizer.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]


def test_load_reward_model(tok_model):
    tokenizer, model = tok_model
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token_id is not None and model.config.pad_token_id == tokenizer.pad_token_id
    conv = make_conversations(1)[0]
    ids = single_ids(tokenizer, conv)
    assert tokenize_conversations(tokenizer, [conv])[0] == [ids]
    assert tokenizer.apply_chat_template(conv)["input_ids"] == ids  # same as transformers' own tokenize=True path
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1  # template writes BOS once
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_pad_token_fallback(tmp_path):
    from conftest import make_tiny_reward_model
    path = make_tiny_reward_model(tmp_path / "nopad", with_pad_token=False)
    tokenizer, model = load_reward_model(path)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|eot_id|>"
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_embeddings_times_head_is_reward(tok_model):
    tokenizer, model = tok_model
    convs = make_conversations(9)
    head = reward_head(model)
    assert head.shape == (model.config.hidden_size, 1) and head.dtype == torch.float32
    emb = embed_batch(tokenizer, model, convs)
    assert emb.shape == (9, model.config.hidden_size) and emb.dtype == torch.float32
    assert not emb.is_inference() and not emb.requires_grad  # safe to feed into training code
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([single_ids(tokenizer, c)])).logits for c in convs])
    torch.testing.assert_close(emb @ head, logits.float(), atol=1e-5, rtol=1e-5)


def test_reward_head_requires_score():
    with pytest.raises(ValueError, match="score"):
        reward_head(torch.nn.Linear(3, 1))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_equals_single(tok_model, padding_side):
    tokenizer, model = tok_model
    token_ids, _ = tokenize_conversations(tokenizer, make_conversations(12, seed=1))
    assert len(set(map(len, token_ids))) > 5  # really padded batches
    batched = embed_token_ids(model, token_ids, tokenizer.pad_token_id, max_tokens_per_batch=None,
                                    max_batch_size=None, padding_side=padding_side)
    small = embed_token_ids(model, token_ids, tokenizer.pad_token_id, max_tokens_per_batch=400,
                                  max_batch_size=3, padding_side=padding_side)
    single = torch.cat([embed_token_ids(model, [ids], tokenizer.pad_token_id) for ids in token_ids])
    # Not bitwise equal: float32 CPU matmuls of different shapes (batch size, padded length) round differently,
    # so the results agree only to ~1e-6. Hence a tight tolerance instead of equality.
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small, single, atol=1e-5, rtol=1e-5)


def test_length_batches():
    lengths = [5, 100, 7, 7, 50, 1, 300, 20]
    batches = extract._length_batches(lengths, max_tokens_per_batch=200, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 200  # 300 runs alone
    assert batches[0] == [6] and [2, 3] == [i for b in batches for i in b if lengths[i] == 7]  # stable ties


def test_truncation(tok_model, tiny_reward_model, tmp_path, capsys):
    tokenizer, model = tok_model
    convs = make_conversations(10, seed=2)
    full_ids, n0 = tokenize_conversations(tokenizer, convs)
    assert n0 == 0
    max_length = sorted(map(len, full_ids))[4]  # 5 conversations are longer
    n_long = sum(len(ids) > max_length for ids in full_ids)
    for side in ["left", "right"]:
        ids, n = tokenize_conversations(tokenizer, convs, max_length, truncation_side=side)
        assert n == n_long and all(len(x) == min(len(f), max_length) for x, f in zip(ids, full_ids))
        out = utils.extract_embeddings(convs, tmp_path / f"{side}.safetensors", model_name=tiny_reward_model,
                                       max_length=max_length, truncation_side=side, shard_size=4,
                                       progress=False)
        assert f"{n_long}/10 conversations truncated" in capsys.readouterr().out
        f = load_file(out)
        cut = [x[-max_length:] if side == "left" else x[:max_length] for x in full_ids]
        expected = embed_token_ids(model, cut, tokenizer.pad_token_id)
        torch.testing.assert_close(f["embeddings"], expected, atol=1e-5, rtol=1e-5)
        with safe_open(str(out), "pt") as g:
            assert g.metadata()["n_truncated"] == str(n_long) and g.metadata()["truncation_side"] == side
    left, right = (load_file(tmp_path / f"{s}.safetensors")["embeddings"] for s in ["left", "right"])
    long = torch.tensor([len(x) > max_length for x in full_ids])
    assert torch.equal(left[~long], right[~long]) and not torch.allclose(left[long], right[long])
    # left truncation keeps the end: the last token (where the reward is read) is the same as without truncation
    assert all(x[-1] == f[-1] for x, f in zip(tokenize_conversations(tokenizer, convs, max_length)[0],
                                              full_ids))


def test_resume_is_byte_identical(tiny_reward_model, tmp_path, monkeypatch, capsys):
    convs = make_conversations(10, seed=3)
    kw = dict(model_name=tiny_reward_model, shard_size=3, max_batch_size=2, progress=False,
              metadata={"dataset": "toy", "split": "train"})
    (tmp_path / "a").mkdir()
    ref = utils.extract_embeddings(convs, tmp_path / "a" / "ref.safetensors", **kw)  # uninterrupted
    assert ref == tmp_path / "a" / "ref.safetensors" and os.listdir(tmp_path / "a") == ["ref.safetensors"]

    out = tmp_path / "b" / "emb.safetensors"
    out.parent.mkdir()
    shard_dir = tmp_path / "b" / "emb.safetensors.shards"
    # a stale shard from other settings (max_length) must be recomputed, not reused
    assert utils.extract_embeddings(convs, out, **{**kw, "max_length": 20}, stop_after_shards=1) is None
    stale = sorted(os.listdir(shard_dir))
    assert stale == ["shard_00000000_00000003.safetensors"]
    # "killed" after one more shard: two shards finished, no output file, no temp files
    assert utils.extract_embeddings(convs, out, **kw, stop_after_shards=2) is None
    assert sorted(os.listdir(shard_dir)) == ["shard_00000000_00000003.safetensors",
                                             "shard_00000003_00000006.safetensors"]
    assert not out.exists()
    assert "2/4 shards not finished" in capsys.readouterr().out
    with safe_open(str(shard_dir / "shard_00000003_00000006.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["start"] == "3" and meta["stop"] == "6" and meta["split"] == "train" and meta["dataset"] == "toy"
    assert meta["model_name"] == tiny_reward_model and meta["dtype"] == "float32"

    # a half-written temp file (killed while saving) and a corrupt shard file are ignored / recomputed
    (shard_dir / "shard_00000006_00000009.safetensors.999.tmp").write_bytes(b"\x00" * 100)
    (shard_dir / "shard_00000006_00000009.safetensors").write_bytes(b"garbage")
    assert utils.extract_embeddings(convs, out, **kw) == out
    assert "resuming, 2 finished shards" in capsys.readouterr().out
    assert out.read_bytes() == ref.read_bytes()
    assert not shard_dir.exists() and os.listdir(out.parent) == ["emb.safetensors"]

    # up to date: returns at once, without loading the model
    def boom(*args, **kwargs):
        raise AssertionError("model loaded although the output is up to date")
    monkeypatch.setattr(extract, "load_reward_model", boom)
    mtime = out.stat().st_mtime_ns
    assert utils.extract_embeddings(convs, out, **kw) == out
    assert "up to date" in capsys.readouterr().out and out.stat().st_mtime_ns == mtime
    # other inputs -> not up to date
    with pytest.raises(AssertionError, match="model loaded"):
        utils.extract_embeddings(convs[:-1], out, **kw)
    with pytest.raises(AssertionError, match="model loaded"):
        utils.extract_embeddings(convs, out, **{**kw, "max_length": 50})


def test_keep_shards(tiny_reward_model, tmp_path):
    convs = make_conversations(5, seed=4)
    out = utils.extract_embeddings(convs, tmp_path / "e.safetensors", model_name=tiny_reward_model,
                                   shard_size=2, keep_shards=True, progress=False)
    shards = sorted(os.listdir(f"{out}.shards"))
    assert shards == ["shard_00000000_00000002.safetensors", "shard_00000002_00000004.safetensors",
                      "shard_00000004_00000005.safetensors"]
    parts = [load_file(os.path.join(f"{out}.shards", s))["embeddings"] for s in shards]
    assert torch.equal(torch.cat(parts), load_file(out)["embeddings"])


def test_groups_extras_metadata(tok_model, tiny_reward_model, tmp_path, monkeypatch, capsys):
    tokenizer, model = tok_model
    chosen, rejected = make_conversations(4, seed=5), make_conversations(3, seed=6)
    user = torch.tensor([0, 1, 1, 2], dtype=torch.int64)
    extras = {"user_id": user, "prompt_idx": torch.arange(4, dtype=torch.int32), "w": torch.rand(2, 3),
              "flag": torch.tensor([True, False]), "half": torch.ones(3, dtype=torch.bfloat16),
              "scalar": torch.tensor(7, dtype=torch.int64), "empty": torch.zeros(0, dtype=torch.int64)}
    kw = dict(model_name=tiny_reward_model, groups={"chosen": 4, "rejected": np.int64(3)}, shard_size=3,
              progress=False)
    out = utils.extract_embeddings(chosen + rejected, tmp_path / "g.safetensors", extra_tensors=extras,
                                   metadata={"split": "test", "n_users": 3}, **kw)
    f = load_file(out)
    assert set(f) == {"chosen", "rejected", "head", *extras}
    emb = embed_batch(tokenizer, model, chosen + rejected)
    torch.testing.assert_close(f["chosen"], emb[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f["rejected"], emb[4:], atol=1e-5, rtol=1e-5)
    assert torch.equal(f["head"], reward_head(model))
    for name, t in extras.items():
        assert f[name].dtype == t.dtype and torch.equal(f[name], t), name
    with safe_open(str(out), "pt") as g:
        meta = g.metadata()
    assert meta["split"] == "test" and meta["n_users"] == "3" and meta["model_name"] == tiny_reward_model
    assert meta["n_items"] == "7" and meta["n_features"] == str(model.config.hidden_size)
    assert meta["dtype"] == "float32" and meta["max_length"] == "4096" and meta["n_truncated"] == "0"
    assert json.loads(meta["groups"]) == [["chosen", 4], ["rejected", 3]] and len(meta["fingerprint"]) == 64

    # new extra tensors / metadata only: the file is rewritten from its own rows, without the model, and equals
    # a fresh run with those extras
    fresh = utils.extract_embeddings(chosen + rejected, tmp_path / "fresh.safetensors",
                                     extra_tensors={"user_id": user + 1}, metadata={"split": "dev"}, **kw)
    monkeypatch.setattr(extract, "load_reward_model", lambda *a, **k: 1 / 0)
    capsys.readouterr()
    assert utils.extract_embeddings(chosen + rejected, out, extra_tensors={"user_id": user + 1},
                                    metadata={"split": "dev"}, **kw) == out
    assert "rewriting" in capsys.readouterr().out
    assert out.read_bytes() == fresh.read_bytes()


def test_streaming_writer_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    mat = torch.randn(11, 5, generator=g)
    tensors = {"head": torch.randn(5, 1, generator=g), "i8": torch.arange(3, dtype=torch.int8),
               "i64": torch.arange(5, dtype=torch.int64), "bf": torch.randn(3, generator=g).bfloat16(),
               "f64": torch.randn(2, 2, dtype=torch.float64, generator=g)}
    groups = [("a", 4), ("none", 0), ("b", 7)]
    path = tmp_path / "x.safetensors"
    meta = {"k": "v", "ünï": "çødé"}
    extract._write_embeddings_file(path, iter([mat[:3], mat[3:9], mat[9:]]), 11, 5, groups, tensors, meta)
    f = load_file(path)
    assert torch.equal(f["a"], mat[:4]) and torch.equal(f["b"], mat[4:]) and f["none"].shape == (0, 5)
    for k, t in tensors.items():
        assert torch.equal(f[k], t)
    with safe_open(str(path), "pt") as h:
        assert h.metadata() == meta
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and len(raw) == 8 + n + 11 * 5 * 4 + 5 * 4 + 3 + 40 + 6 + 32
    # deterministic, and a failing writer leaves neither the target nor a temp file behind
    extract._write_embeddings_file(path, iter([mat]), 11, 5, groups, tensors, meta)
    assert path.read_bytes() == raw
    with pytest.raises(ValueError, match="rows"):
        extract._write_embeddings_file(tmp_path / "y.safetensors", iter([mat[:5]]), 11, 5, groups, tensors, meta)
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_bad_input(tiny_reward_model, tmp_path):
    kw = dict(model_name=tiny_reward_model, progress=False)
    out = tmp_path / "bad.safetensors"
    good = make_conversations(3)
    with pytest.raises(ValueError, match="non-empty list"):
        utils.extract_embeddings([], out, **kw)
    with pytest.raises(ValueError, match=r"conversations\[0\]"):
        utils.extract_embeddings(good[0], out, **kw)  # one conversation instead of a list of them
    with pytest.raises(ValueError, match=r"conversations\[1\]"):
        utils.extract_embeddings([good[0], "hello"], out, **kw)
    with pytest.raises(ValueError, match=r"conversations\[1\]"):
        utils.extract_embeddings([good[0], [{"role": "user", "text": "hi"}]], out, **kw)
    with pytest.raises(ValueError, match=r"conversations\[3\]"):
        utils.extract_embeddings(good + [[]], out, **kw)
    with pytest.raises(ValueError, match="sum to 2"):
        utils.extract_embeddings(good, out, groups={"chosen": 1, "rejected": 1}, **kw)
    with pytest.raises(ValueError, match="clashes"):
        utils.extract_embeddings(good, out, extra_tensors={"head": torch.zeros(1)}, **kw)
    with pytest.raises(ValueError, match="reserved"):
        utils.extract_embeddings(good, out, metadata={"fingerprint": "x"}, **kw)
    with pytest.raises(ValueError, match="truncation_side"):
        utils.extract_embeddings(good, out, truncation_side="middle", **kw)
    assert not out.exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tiny_reward_model, tmp_path):
    """2 CPU processes (gloo) under torchrun write the same bytes as one process."""
    convs = make_conversations(10, seed=7)
    (tmp_path / "convs.json").write_text(json.dumps(convs))
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import importlib, json, sys
        import torch
        sys.path.insert(0, {REPO_ROOT!r})
        utils = importlib.import_module({utils.__name__!r})
        convs = json.load(open(sys.argv[1]))
        out = utils.extract_embeddings(convs, sys.argv[2], model_name=sys.argv[3], shard_size=3,
                                             groups={{"chosen": 6, "rejected": 4}}, progress=False,
                                             extra_tensors={{"user_id": torch.arange(6)}}, metadata={{"split": "x"}})
        rank, world, local_rank = importlib.import_module("lorelib.config").dist_info()
        print(f"rank={{rank}} world={{world}} out={{out}}", flush=True)
    """))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"]:
        env.pop(k, None)
    one = tmp_path / "one.safetensors"
    two = tmp_path / "two.safetensors"
    args = [str(tmp_path / "convs.json"), None, tiny_reward_model]
    r1 = subprocess.run([sys.executable, str(driver), args[0], str(one), args[2]], env=env, capture_output=True,
                        text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", str(driver),
                         args[0], str(two), args[2]], env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert f"rank=0 world=2 out={two}" in r2.stdout and f"rank=1 world=2 out={two}" in r2.stdout
    assert r2.stdout.count("wrote") == 1  # only rank 0 merges and prints
    assert two.read_bytes() == one.read_bytes()
    assert not os.path.exists(f"{two}.shards")
