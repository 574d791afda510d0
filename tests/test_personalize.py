"""Tests of using a learned model: the model file, PersonalizedReward (reward, personalize) and the exported
Hugging Face reward model, on the tiny random reward model (CPU, no download)."""
import errno
import hashlib
import json
import os

import pytest
import torch
from test_embed import make_conversations
from test_errors import run_inline
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import utils
from conftest import make_tiny_reward_model, run_script
from lorelib.export import EXPORT_HEAD_FILE, EXPORT_INDEX_FILE
from lorelib.extract import embed_batch, load_reward_model, reward_head
from lorelib.files import load_metadata, load_tensors, save_tensors

F = 64  # hidden size of the tiny reward model


def make_model_file(path, model_name, K=3, seed=0, metadata=None):
    """A learned-model file with random V [F, K], 5 seen users 'a'..'e' and 2 unseen users 'x', 'y'."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(F, K, generator=g)
    W = torch.softmax(torch.randn(5, K, generator=g), 1)
    W_u = torch.softmax(torch.randn(2, K, generator=g), 1)
    utils.save_lore_model(path, V, W, W_u, model_name=model_name, dataset="test", users=list("abcde"),
                      unseen_users=["x", "y"], metadata={"K": K, "alpha": 0.0, "fewshot_pairs": 9, **(metadata or {})})
    return path


@pytest.fixture(scope="module")
def rm(tiny_reward_model, tmp_path_factory):
    path = make_model_file(tmp_path_factory.mktemp("models") / "K3_alpha0.safetensors", tiny_reward_model)
    return utils.PersonalizedReward.load(path)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def hf_scores(model_dir, tokenizer, conversations):
    """Logits of AutoModelForSequenceClassification.from_pretrained(model_dir) on one right-padded batch."""
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model, model(**enc).logits.squeeze(-1)


def test_model_file_round_trip(tmp_path, tiny_reward_model):
    path = make_model_file(tmp_path / "m.safetensors", tiny_reward_model, metadata={"fewshot_learning_rate": 0.5})
    m = utils.load_lore_model(path)
    assert m["V"].shape == (F, 3) and m["W"].shape == (5, 3) and m["W_unseen"].shape == (2, 3)
    assert m["users"] == list("abcde") and m["unseen_users"] == ["x", "y"]
    assert (m["model_name"], m["dataset"], m["n_features"], m["logit_scale"]) == (tiny_reward_model, "test", F, 100.0)
    assert m["K"] == 3 and m["alpha"] == 0.0 and m["fewshot_learning_rate"] == 0.5
    rm = utils.PersonalizedReward.load(path, model_name="elsewhere")
    assert rm.model_name == "elsewhere" and rm.fewshot_learning_rate == 0.5 and rm.fewshot_pairs == 9
    assert torch.equal(rm.weights("c"), m["W"][2]) and torch.equal(rm.weights("y"), m["W_unseen"][1])
    # integer ids (simulated users) default to 0..C-1, then the unseen users
    utils.save_lore_model(tmp_path / "n.safetensors", m["V"], m["W"], m["W_unseen"], model_name="x", dataset="d")
    n = utils.PersonalizedReward.load(tmp_path / "n.safetensors")
    assert n.users == [0, 1, 2, 3, 4] and n.unseen_users == [5, 6] and torch.equal(n.weights(6), m["W_unseen"][1])
    # an embeddings file (any other safetensors) is refused with a clear error
    save_tensors(tmp_path / "other.safetensors", {"V": m["V"], "W": m["W"], "W_unseen": m["W_unseen"]})
    with pytest.raises(ValueError, match="not a learned-model file"):
        utils.load_lore_model(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="unique"):
        utils.save_lore_model(tmp_path / "dup.safetensors", m["V"], m["W"], m["W_unseen"], model_name="x", dataset="d",
                          users=list("abcdx"), unseen_users=["x", "y"])


def test_weights_of_a_user(rm):
    assert torch.allclose(rm.weights("uniform"), torch.full((3,), 1 / 3))
    assert torch.equal(rm.weights([0.2, 0.3, 0.5]), torch.tensor([0.2, 0.3, 0.5]))
    with pytest.raises(utils.InputError, match="not a seen or unseen user") as e:  # one line in a script
        rm.weights("zz")
    assert "'a', 'b', 'c', 'd', 'e'" in str(e.value) and "'x', 'y'" in str(e.value) and isinstance(e.value, KeyError)
    with pytest.raises(utils.InputError, match="K = 3"):
        rm.weights([0.5, 0.5])
    for user in ("zz", [0.5, 0.5]):  # what export is given is checked before anything is written
        with pytest.raises(utils.InputError):
            rm.export(os.path.join(os.path.dirname(rm.path), "never"), user=user)
    assert not os.path.exists(os.path.join(os.path.dirname(rm.path), "never"))


def test_reward_is_embedding_times_V_w(rm, tiny_reward_model):
    convs = make_conversations(12, seed=3)
    tokenizer, model = load_reward_model(tiny_reward_model)
    E = embed_batch(tokenizer, model, convs)  # the extractor of prepare.py, one item at a time in spirit
    assert torch.allclose(rm.embed(convs), E, atol=1e-5)
    for user in ["b", "x", "uniform", [0.1, 0.0, 0.9]]:
        w = rm.weights(user)
        by_hand = torch.stack([sum(E[i, f] * sum(rm.V[f, k] * w[k] for k in range(3)) for f in range(F))
                               for i in range(len(convs))])
        assert torch.allclose(rm.reward(convs, user=user, calibrated=False), by_hand, atol=1e-4)
        assert torch.allclose(rm.reward(convs, user=user), by_hand / 100, atol=1e-6)  # calibrated: the log-odds
    # K = 0 (the reference head as V [F, 1], w = [1], logit scale 1, as save_models writes it) gives the reward
    # model's own logit, calibrated or not
    ref = utils.PersonalizedReward(reward_head(model), torch.ones(1, 1), model_name=tiny_reward_model,
                                   logit_scale=1.0)
    _, logits = hf_scores(tiny_reward_model, tokenizer, convs)
    assert torch.allclose(ref.reward(convs, user=[1.0]), logits, atol=1e-4)
    assert torch.allclose(ref.reward(convs, user=[1.0], calibrated=False), logits, atol=1e-4)


def test_exported_logits_are_the_fits_log_odds(rm, tmp_path):
    """sigmoid(export(c) - export(r)) is the fit's probability sigmoid(d^T V w / 100) that the user prefers c, as a
    reward model's logits are; calibrated=False exports the raw e^T V w, 100 times larger; the head file says which."""
    tokenizer = rm.load_reward_model()[0]
    rm = utils.PersonalizedReward(300 * rm.V, rm.W, users=rm.users, model_name=rm.model_name)  # confident answers
    out, raw = rm.export(tmp_path / "cal", user="b"), rm.export(tmp_path / "raw", user="b", calibrated=False)
    chosen, rejected = make_conversations(8, seed=21), make_conversations(8, seed=22)
    (_, r_c), (_, r_r) = hf_scores(out, tokenizer, chosen), hf_scores(out, tokenizer, rejected)
    d = rm.embed(chosen) - rm.embed(rejected)
    fit = torch.sigmoid(d @ rm.V @ rm.weights("b") / 100)  # the likelihood LoRe is trained with
    assert (fit - 0.5).abs().max() > 0.2 and torch.allclose(torch.sigmoid(r_c - r_r), fit, atol=1e-6)
    assert torch.allclose(hf_scores(raw, tokenizer, chosen)[1], 100 * r_c, rtol=1e-5, atol=1e-4)
    meta = [load_metadata(f / EXPORT_HEAD_FILE) for f in (out, raw)]
    assert [json.loads(m["logits"]) for m in meta] == ["calibrated", "raw"]
    assert json.loads(meta[0]["logit_scale"]) == 100.0


def test_export_scores_like_reward_and_links_the_base(rm, tiny_reward_model, tmp_path):
    base_file = os.path.join(tiny_reward_model, "model.safetensors")
    before = (sha256(base_file), os.stat(base_file).st_mtime_ns, os.stat(base_file).st_size)
    out = rm.export(tmp_path / "alice", user="b")
    convs = make_conversations(10, seed=4)
    model, logits = hf_scores(out, rm.load_reward_model()[0], convs)
    expected = rm.reward(convs, user="b")
    assert torch.allclose(logits, expected, atol=1e-4)
    assert (logits - hf_scores(tiny_reward_model, rm.tokenizer, convs)[1]).abs().min() > 1e-2  # not the base head
    assert torch.allclose(model.score.weight[0], rm.head("b"), atol=1e-6)

    # small on disk: the base file is the same inode, the only new weights are the [1, F] head
    files = sorted(os.listdir(out))
    assert files == sorted(["base-model.safetensors", EXPORT_HEAD_FILE, EXPORT_INDEX_FILE, "config.json",
                            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
    assert os.stat(out / "base-model.safetensors").st_ino == os.stat(base_file).st_ino
    assert os.path.getsize(out / EXPORT_HEAD_FILE) < 4 * F + 1024
    own = sum(os.path.getsize(out / f) for f in files if os.stat(out / f).st_nlink == 1)
    assert own < os.path.getsize(base_file) / 10
    index = json.loads((out / EXPORT_INDEX_FILE).read_text())
    assert index["weight_map"]["score.weight"] == EXPORT_HEAD_FILE
    assert set(index["weight_map"]) == set(load_tensors(base_file))
    assert {v for k, v in index["weight_map"].items() if k != "score.weight"} == {"base-model.safetensors"}

    # using the export (changing its weights in memory, saving it into its own folder) leaves the base intact
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    model.save_pretrained(out)
    assert (sha256(base_file), os.stat(base_file).st_mtime_ns, os.stat(base_file).st_size) == before

    # exporting again replaces the earlier export; any other non-empty folder is refused
    rm.export(tmp_path / "alice", user="uniform")
    assert torch.allclose(hf_scores(tmp_path / "alice", rm.tokenizer, convs)[1], rm.reward(convs, "uniform"),
                          atol=1e-4)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        rm.export(tmp_path / "busy", user="b")
    assert sha256(base_file) == before[0]


def test_export_sharded_base_symlinked_without_pad_token(tmp_path):
    """A sharded base (index + shards), no pad token, and no hard links (another filesystem): symlinks."""
    tiny = make_tiny_reward_model(tmp_path / "tiny", with_pad_token=False)
    base = str(tmp_path / "base")
    AutoModelForSequenceClassification.from_pretrained(tiny).save_pretrained(base, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(base)
    shards = sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))
    assert len(shards) > 2 and os.path.exists(os.path.join(base, EXPORT_INDEX_FILE))
    rm = utils.PersonalizedReward.load(make_model_file(tmp_path / "m.safetensors", base))

    def no_hard_links(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    real_link, os.link = os.link, no_hard_links
    try:
        out = rm.export(tmp_path / "exp", user="c")
    finally:
        os.link = real_link
    for s in shards:
        assert os.path.islink(out / f"base-{s}") and os.readlink(out / f"base-{s}") == os.path.realpath(
            os.path.join(base, s))
    assert (out / "config.json").read_bytes() == (tmp_path / "base" / "config.json").read_bytes()
    # without a pad token, transformers scores one conversation at a time (its last token)
    convs = make_conversations(4, seed=5)
    tokenizer = rm.load_reward_model()[0]
    logits = torch.cat([hf_scores(out, tokenizer, [c])[1] for c in convs])
    assert torch.allclose(logits, rm.reward(convs, user="c"), atol=1e-4)


def planted_pairs(rm, w, n_pairs, seed):
    """(chosen, rejected) conversation lists: n_pairs random pairs ordered by the reward of w."""
    convs = make_conversations(2 * n_pairs, seed=seed)
    r = rm.embed(convs) @ rm.head(w)
    first = (r[0::2] > r[1::2]).tolist()
    chosen = [convs[2 * i] if f else convs[2 * i + 1] for i, f in enumerate(first)]
    rejected = [convs[2 * i + 1] if f else convs[2 * i] for i, f in enumerate(first)]
    return chosen, rejected


def test_personalize_recovers_a_planted_w(tiny_reward_model, capsys):
    """V [F, 3] = [a, b, -a] with a, b whitened principal directions of the embeddings; planted w = (0.7, 0.3, 0)
    disagrees with the uniform w on about 40% of the pairs. Labels come from the planted reward."""
    rm = utils.PersonalizedReward(torch.zeros(F, 3), model_name=tiny_reward_model, fewshot_pairs=60)
    E = rm.embed(make_conversations(200, seed=11))
    _, S, Vh = torch.linalg.svd(E - E.mean(0), full_matrices=False)
    a, b = (Vh[:2].T / S[:2] * len(E) ** 0.5).T
    rm.V = 300 * torch.stack([a, b, -a], 1)
    planted = torch.tensor([0.7, 0.3, 0.0])
    w = rm.personalize(*planted_pairs(rm, planted, 50, seed=1))
    assert "fewer than the 60" in capsys.readouterr().out  # 50 comparisons < the protocol's 60: a notice
    assert w.shape == (3,) and abs(w.sum().item() - 1) < 1e-5 and (w >= 0).all()
    assert (w - planted).abs().sum() < 0.4
    chosen, rejected = planted_pairs(rm, planted, 100, seed=2)  # held-out pairs
    diffs = rm.embed(chosen) - rm.embed(rejected)
    agree = lambda u: (diffs @ rm.head(u) > 0).float().mean().item()  # noqa: E731
    assert agree(w) >= 0.9 and agree("uniform") <= 0.7


def test_personalize_input_checks(rm):
    convs = make_conversations(4)
    with pytest.raises(ValueError, match="3 chosen but 2 rejected"):
        rm.personalize(convs[:3], convs[:2])
    w = rm.personalize(convs[:1], convs[1:2])  # one comparison is allowed
    assert w.shape == (3,) and torch.isfinite(w).all()
    one = utils.PersonalizedReward(torch.randn(F, 1), model_name=rm.model_name)  # K = 1: nothing to fit
    assert torch.equal(one.personalize(convs[:2], convs[2:]), torch.ones(1))


def test_read_comparisons_reports_bad_lines(tmp_path):
    path = tmp_path / "my.jsonl"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "a joke?"}]
    path.write_text("\n".join([
        json.dumps({"prompt": "Summarise this.", "chosen": "Short.", "rejected": "Long and rambling."}),
        "",
        json.dumps({"prompt": msgs, "chosen": "Knock knock.", "rejected": "No."}),
        '{"prompt": "broken", "chosen": "x"',
        json.dumps({"prompt": "p", "chosen": "c"}),
        json.dumps({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}),
        json.dumps(["p", "c", "r"]),
    ]) + "\n")
    chosen, rejected, bad = utils.read_comparisons(path)
    assert [n for n, _ in bad] == [4, 5, 6, 7]
    assert "not valid JSON" in bad[0][1] and "missing rejected" in bad[1][1] and "messages" in bad[2][1]
    assert chosen[0] == [{"role": "user", "content": "Summarise this."}, {"role": "assistant", "content": "Short."}]
    assert rejected[1] == msgs + [{"role": "assistant", "content": "No."}]


def test_personalize_command_end_to_end(tmp_path, tiny_reward_model):
    """PRISM/personalize.py on a 5-line jsonl with one malformed line: reports it, prints w, exports."""
    model_file = make_model_file(tmp_path / "K3_alpha0.safetensors", tiny_reward_model)
    convs = make_conversations(8, seed=7)
    rows = [{"prompt": c[0]["content"], "chosen": c[1]["content"], "rejected": r[1]["content"]}
            for c, r in zip(convs[:4], convs[4:])]
    rows[1]["prompt"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": rows[1]["prompt"]}]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, '{"prompt": "a broken line", "chosen": "x",')
    (tmp_path / "my.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_script("PRISM/personalize.py", f"comparisons={tmp_path / 'my.jsonl'}", f"model={model_file}",
                      f"out_dir={tmp_path / 'me'}")
    out = proc.stdout
    assert "my.jsonl:3: skipped, not valid JSON" in out and "4 comparisons read" in out and "1 bad line(s)" in out
    assert "fewer than the 9" in out and "export: wrote" in out
    printed = torch.tensor(json.loads(out.split("w = ")[1].splitlines()[0]))
    # the same fit in this process
    chosen, rejected, bad = utils.read_comparisons(tmp_path / "my.jsonl")
    rm = utils.PersonalizedReward.load(model_file)
    w = rm.personalize(chosen, rejected)
    assert [n for n, _ in bad] == [3] and torch.allclose(printed, w, atol=1e-4)
    assert f"ordered right: {int((rm.reward(chosen, w) > rm.reward(rejected, w)).sum())}/4" in out
    _, logits = hf_scores(tmp_path / "me", rm.load_reward_model()[0], chosen + rejected)
    assert torch.allclose(logits, rm.reward(chosen + rejected, w), atol=1e-4)
    # no valid line: a clear error
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    proc = run_script("PRISM/personalize.py", f"comparisons={tmp_path / 'bad.jsonl'}", f"model={model_file}",
                      check=False)
    assert proc.returncode == 2 and "bad.jsonl:1: skipped" in proc.stdout and "no valid comparison" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_suggest_on_a_jsonl_pool_end_to_end(tmp_path, tiny_reward_model):
    """PRISM/personalize.py suggest=pool.jsonl prints the next comparisons to ask (the pool's line numbers), the same
    as PersonalizedReward.suggest in this process; a candidate already answered is never suggested."""
    model_file = make_model_file(tmp_path / "K3_alpha0.safetensors", tiny_reward_model)
    convs = make_conversations(16, seed=3)
    pool = [{"prompt": c[0]["content"], "a": c[1]["content"], "b": r[1]["content"]}
            for c, r in zip(convs[:8], convs[8:])]
    lines = [json.dumps(p) for p in pool]
    lines.insert(3, '{"prompt": "broken", "a": "x"}')  # line 4: reported and skipped
    (tmp_path / "pool.jsonl").write_text("\n".join(lines) + "\n")
    mine = [{"prompt": pool[0]["prompt"], "chosen": pool[0]["b"], "rejected": pool[0]["a"]},  # pool line 1, answered
            {"prompt": pool[5]["prompt"], "chosen": pool[5]["a"], "rejected": pool[6]["b"]}]
    (tmp_path / "my.jsonl").write_text("\n".join(json.dumps(m) for m in mine) + "\n")
    proc = run_inline("PRISM/personalize.py", f"suggest={tmp_path / 'pool.jsonl'}",  # the script, in this process
                      f"comparisons={tmp_path / 'my.jsonl'}", f"model={model_file}", "num_suggestions=3")
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    assert "pool.jsonl:4: skipped, missing b" in out and "1 candidate(s) already answered" in out
    assert "ask next (active" in out and "w = [" in out and "export:" not in out
    printed = [int(line.split(":")[-1].split()[0]) for line in out.splitlines() if line[:3] in ("1. ", "2. ", "3. ")]
    assert all("expected information" in line for line in out.splitlines() if line[:3] in ("1. ", "2. ", "3. "))
    # the same in this process: candidates are the pool's good lines 2, 3, 5, ... 9 (line 1 answered, 4 broken)
    rm = utils.PersonalizedReward.load(model_file)
    chosen, rejected, _ = utils.read_comparisons(tmp_path / "my.jsonl")
    a, b, bad = utils.read_comparisons(tmp_path / "pool.jsonl", sides=("a", "b"))
    assert [n for n, _ in bad] == [4] and len(a) == 8
    line_of = [1, 2, 3, 5, 6, 7, 8, 9]
    best = rm.suggest(list(zip(a, b))[1:], 3, answered=rm.embed(chosen) - rm.embed(rejected))
    assert printed == [line_of[1 + j] for j in best] and len(set(best)) == 3
    # from the prior; from precomputed differences; an answered candidate is never suggested again
    E = rm.embed(a + b)
    first = rm.suggest(list(zip(a, b)), 8)
    assert sorted(first) == list(range(8)) and rm.suggest(E[:8] - E[8:], 8) == first
    again = rm.suggest(E[:8] - E[8:], 7, answered={first[0]: -1})
    assert first[0] not in again and len(again) == 7
    assert len(rm.suggest(E[:8] - E[8:], 2, rule="uncertainty")) == 2
    with pytest.raises(utils.InputError, match="answered must map"):
        rm.suggest(E[:8] - E[8:], 1, answered={8: 1})
    # the stopping rule: above every candidate's expected information (at most log 2 nats) nothing is suggested
    proc = run_inline("PRISM/personalize.py", f"suggest={tmp_path / 'pool.jsonl'}", f"model={model_file}",
                      "stop_below=0.7")
    assert proc.returncode == 0 and "stop asking: the best remaining comparison" in proc.stdout
    assert "ask next" not in proc.stdout
