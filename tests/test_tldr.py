"""RedditTLDR/: prepare.py end to end on a tiny fixture in the real schema, the worker split protocols,
the caps, loading checks, and both scripts in synthetic mode."""
import json
import random

import numpy as np
import pytest
import torch

import utils
from conftest import FAST_BASELINES, run_script
from lorelib.extract import embed_batch, load_reward_model, reward_head
from lorelib.files import save_tensors
from lorelib.methods import METHODS
from RedditTLDR import tldr

# -------------------------------------------------------------------------------------------
# a tiny openai/summarize_from_feedback 'comparisons' fixture, in the real schema

def comparison(worker, post, texts, choice, split):
    return {"info": {"id": f"t3_{abs(hash(post)) % 10**6}", "post": post, "title": "a title", "subreddit": "tifu",
                     "site": None, "article": None},
            "summaries": [{"text": t, "policy": "sup2", "note": None} for t in texts],
            "choice": choice, "worker": worker, "batch": "batch1", "split": split, "extra": {"confidence": 7}}


def tiny_split(split, counts):
    """Rows for {worker: count}, plus three bad rows (a CNN/DM row without post, a missing summary text,
    a missing choice)."""
    rows = []
    for w, n in counts.items():
        for j in range(n):
            post = f"{split} post {j} by {w}: my cat ate my homework."
            rows.append(comparison(w, post, [f"cat ate hw {j}", f"homework gone {w}"], (j + len(w)) % 2, split))
    bad_post = comparison("w0", "x", ["a", "b"], 0, split)
    bad_post["info"].update(post=None, article="CNN article text", site="cnn")
    bad_text = comparison("w1", f"{split} post with a lost summary", ["a", "b"], 1, split)
    bad_text["summaries"][1]["text"] = None
    bad_choice = comparison("w2", f"{split} post without choice", ["a", "b"], None, split)
    return rows[:3] + [bad_post] + rows[3:7] + [bad_text, bad_choice] + rows[7:]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Folder with train.parquet / validation.parquet in the hub schema. Workers: w4 and w5 have the fewest
    train comparisons (dropped); w6 is in validation only; seen / unseen come from w0..w3."""
    import datasets
    path = tmp_path_factory.mktemp("summarize_from_feedback")
    splits = {"train": tiny_split("train", {"w0": 6, "w1": 5, "w2": 4, "w3": 4, "w4": 2, "w5": 1}),
              "validation": tiny_split("validation", {"w0": 2, "w1": 3, "w2": 2, "w3": 2, "w6": 2})}
    for name, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(str(path / f"{name}.parquet"))
    return path, splits


@pytest.fixture(scope="module")
def prepared(tiny_dataset, tiny_reward_model, tmp_path_factory):
    path, splits = tiny_dataset
    data_dir = tmp_path_factory.mktemp("reddit_data")
    p = run_script("RedditTLDR/prepare.py", f"dataset_path={path}", f"model_name={tiny_reward_model}",
                   f"data_dir={data_dir}", "shard_size=16")
    return data_dir, splits, p.stdout


def test_prepare_end_to_end(prepared, tiny_reward_model):
    data_dir, splits, stdout = prepared
    tokenizer, model = load_reward_model(tiny_reward_model, device="cpu")
    for name, rows in splits.items():
        assert f"{name}: skipping 3 of {len(rows)} rows (1 missing choice, 1 missing post, 1 missing summary)" in stdout
        d = tldr.read_split(data_dir / f"{name}.safetensors")
        good = [i for i, r in enumerate(rows) if r["info"]["post"] and r["choice"] is not None
                and all(s["text"] for s in r["summaries"])]
        assert d["row"].tolist() == good
        assert d["worker"].tolist() == [rows[i]["worker"] for i in good]
        assert d["chosen"].shape == d["rejected"].shape == (len(good), 64) and d["head"].shape == (64, 1)
        # chosen is [post, summaries[choice]], rejected the other one; embedding @ head is the model's reward
        for j in (0, len(good) - 1):
            r = rows[good[j]]
            conv = [[{"role": "user", "content": r["info"]["post"]},
                     {"role": "assistant", "content": r["summaries"][c]["text"]}]
                    for c in (r["choice"], 1 - r["choice"])]
            emb = embed_batch(tokenizer, model, conv)
            torch.testing.assert_close(d["chosen"][j], emb[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(d["rejected"][j], emb[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(d["head"], reward_head(model))


def test_train_basis_on_prepared_files(prepared, tmp_path, tiny_reward_model):
    data_dir, _, _ = prepared
    run_script("RedditTLDR/train_basis.py", f"data_dir={data_dir}", f"out_dir={tmp_path}", "K_list=[0,1,2]",
               "num_iterations=20", "fewshot_iterations=20")
    out = json.loads((tmp_path / "train_basis.json").read_text())
    assert out["workers"]["dropped"] == ["w4", "w5"]
    assert sorted(out["workers"]["seen"] + out["workers"]["unseen"]) == ["w0", "w1", "w2", "w3"]
    assert [r["K"] for r in out["results"]] == [0, 1, 2] and (tmp_path / "train_basis.png").is_file()
    # the learned models, in the common format, with the worker names as user ids
    m = utils.load_lore_model(tmp_path / "models" / "K2_alpha0.safetensors")
    assert m["users"] == out["workers"]["seen"] and m["unseen_users"] == out["workers"]["unseen"]
    assert m["W"].shape == (2, m["V"].shape[1]) and m["W_unseen"].shape == (2, m["V"].shape[1])
    assert (m["model_name"], m["dataset"], m["n_features"], m["fewshot_learning_rate"]) == (
        tiny_reward_model, "RedditTLDR", 64, 0.1)
    rm = utils.PersonalizedReward.load(tmp_path / "models" / "K2_alpha0.safetensors")
    assert torch.equal(rm.weights(out["workers"]["unseen"][1]), m["W_unseen"][1])


def test_prepare_missing_columns(tmp_path):
    import datasets
    rows = tiny_split("train", {"w0": 2})
    datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "worker"} for r in rows]).to_parquet(
        str(tmp_path / "train.parquet"))
    p = run_script("RedditTLDR/prepare.py", f"dataset_path={tmp_path}", "split=train", f"data_dir={tmp_path}",
                   check=False)
    assert p.returncode == 2 and "error: " in p.stderr and "missing column(s) ['worker']" in p.stderr
    assert "Traceback" not in p.stderr


# -------------------------------------------------------------------------------------------
# loading checks

def save_split(path, d):
    """Write a split dict (tldr.read_split layout) in prepare.py's file layout."""
    names = sorted(set(d["worker"].tolist()))
    ids = torch.tensor([names.index(w) for w in d["worker"]], dtype=torch.long)
    save_tensors(path, {"chosen": d["chosen"], "rejected": d["rejected"], "worker": ids, "row": d["row"],
                              "head": d["head"]}, metadata={"workers": json.dumps(names)})


def test_load_split_roundtrip_and_errors(tmp_path):
    train, _ = tldr.make_synthetic(num_workers=8, num_features=8, median_comparisons=20)
    save_split(tmp_path / "train.safetensors", train)
    d = tldr.read_split(tmp_path / "train.safetensors")
    assert (d["worker"] == train["worker"]).all() and torch.equal(d["chosen"], train["chosen"])

    with pytest.raises(FileNotFoundError, match="RedditTLDR/prepare.py"):
        tldr.load(tmp_path / "nowhere")
    bad = dict(train, chosen=train["chosen"].clone())
    bad["chosen"][3, 1] = float("nan")
    save_split(tmp_path / "nan.safetensors", bad)
    with pytest.raises(ValueError, match="NaN"):
        tldr.read_split(tmp_path / "nan.safetensors")
    save_split(tmp_path / "short.safetensors", dict(train, row=train["row"][:-1]))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        tldr.read_split(tmp_path / "short.safetensors")


# -------------------------------------------------------------------------------------------
# worker split protocols

@pytest.fixture(scope="module")
def synthetic():
    return tldr.make_synthetic(num_features=8)


def test_published_worker_split(synthetic):
    train, test = synthetic
    w = tldr.select_workers(train["worker"], test["worker"])
    assert w == tldr.select_workers(train["worker"], test["worker"])  # deterministic
    assert not set(w["seen"]) & set(w["unseen"]) and abs(len(w["seen"]) - len(w["unseen"])) <= 1
    names, counts = np.unique(train["worker"], return_counts=True)
    assert w["dropped"] == sorted(names[np.argsort(counts, kind="stable")[:2]].tolist())
    both = sorted(set(train["worker"]) & set(test["worker"]) - set(w["dropped"]))
    random.Random(0).shuffle(both)
    assert w["seen"] + w["unseen"] == both and len(w["seen"]) == len(both) // 2
    assert tldr.select_workers(train["worker"], test["worker"], split_seed=1)["seen"] != w["seen"]
    with pytest.raises(ValueError, match="protocol"):
        tldr.select_workers(train["worker"], test["worker"], protocol="nope")


def test_published_caps_and_test_pairs(synthetic):
    train, test = synthetic
    (tr, te, tr_u, te_u), info = tldr.split_pairs(train, test)
    n_tr = {w: int((train["worker"] == w).sum()) for w in info["seen"] + info["unseen"]}
    n_te = {w: int((test["worker"] == w).sum()) for w in info["seen"] + info["unseen"]}
    assert tr.counts().tolist() == [min(n_tr[w], 150) for w in info["seen"]]
    assert tr_u.counts().tolist() == [min(n_tr[w], 50) for w in info["unseen"]]
    assert te.counts().tolist() == [n_te[w] for w in info["seen"]]
    assert te_u.counts().tolist() == [n_te[w] for w in info["unseen"]]
    assert max(n_tr.values()) > 150  # the caps are exercised
    # the train pairs of seen worker 0 are rows of its train-split comparisons, test pairs its validation ones
    w0 = info["seen"][0]
    own = train["chosen"][train["worker"] == w0] - train["rejected"][train["worker"] == w0]
    assert len(tr[0]) > 0 and all((own == d).all(1).any() for d in tr[0])
    torch.testing.assert_close(te[0], test["chosen"][test["worker"] == w0] - test["rejected"][test["worker"] == w0])
    (tr2, *_), _ = tldr.split_pairs(train, test)
    assert torch.equal(tr.dense(), tr2.dense())  # deterministic subsets
    (tr_all, _, tr_u_all, _), _ = tldr.split_pairs(train, test, max_train_pairs=None, max_fewshot_pairs=None)
    assert tr_u_all.counts().tolist() == [n_tr[w] for w in info["unseen"]]
    with pytest.raises(ValueError, match="max_train_pairs"):
        tldr.split_pairs(train, test, max_train_pairs=0)


def test_load_returns_the_protocol_by_name(synthetic):
    data = tldr.load(synthetic=True, synthetic_features=8, protocol="paper")
    (tr, te, tr_u, te_u), info = tldr.split_pairs(*synthetic, protocol="paper")
    assert data.info["workers"] == info and (data.N, data.N_unseen) == (len(info["seen"]), len(info["unseen"]))
    assert data.info["N"] == data.N and torch.equal(data.head, synthetic[0]["head"])
    for got, expected in zip(data.features, (tr, te, tr_u, te_u)):
        assert torch.equal(got.user, expected.user) and torch.equal(got.dense(), expected.dense())


def test_paper_protocol(synthetic):
    train, test = synthetic
    total = {w: int((train["worker"] == w).sum() + (test["worker"] == w).sum())
             for w in set(train["worker"]) | set(test["worker"])}
    m = sorted(total.values())[5]  # so that 5 workers are dropped
    (tr, te, tr_u, te_u), info = tldr.split_pairs(train, test, protocol="paper", max_train_pairs=None,
                                                    max_fewshot_pairs=None, min_comparisons=m)
    assert sorted(info["seen"] + info["unseen"]) == sorted(w for w, c in total.items() if c >= m)
    assert info["dropped"] == sorted(w for w, c in total.items() if c < m) and len(info["dropped"]) == 5
    assert tr.counts().tolist() == [total[w] // 2 for w in info["seen"]]
    assert (tr.counts() + te.counts()).tolist() == [total[w] for w in info["seen"]]
    assert (tr_u.counts() + te_u.counts()).tolist() == [total[w] for w in info["unseen"]]
    (tr, _, tr_u, _), _ = tldr.split_pairs(train, test, protocol="paper")
    assert tr.counts().max() <= 150 and tr_u.counts().max() <= 50


# -------------------------------------------------------------------------------------------
# both scripts in synthetic mode

def test_train_basis_synthetic(tmp_path):
    """ref, BT, LoRe, the three baselines and the tuned rows (the stored settings) in one table and JSON; LoRe > BT >
    ref, and every baseline > ref."""
    p = run_script("RedditTLDR/train_basis.py", "synthetic=True", f"out_dir={tmp_path}", f"data_dir={tmp_path}",
                   "K_list=[0,1,4]", FAST_BASELINES[0])
    out = json.loads((tmp_path / "train_basis_synthetic.json").read_text())
    unseen = [r["unseen_test"]["mean"] for r in out["results"]]
    assert unseen[2] > unseen[1] + 0.05 and unseen[1] > unseen[0] + 0.03  # LoRe > BT > reference head
    baselines = {m: r["unseen_test"]["mean"] for m, r in out["baselines"].items()}
    assert set(baselines) == {"per_user_bt", "vpl", "pal", "mrm", "vpl_tuned", "pal_tuned", "mrm_tuned"}
    assert all(b > unseen[0] + 0.02 for b in baselines.values()), (unseen, baselines)
    assert all(name in p.stdout for name in ("LoRe", "per-user BT", "VPL", "PAL", "PAL (tuned)", "VPL (tuned)"))
    key = tldr.data_key({**out["config"], "synthetic": True})
    assert key == "RedditTLDR synthetic lowrank F=64 protocol=published max_train_pairs=150"
    for name in ("vpl", "pal", "mrm"):  # the released row's overrides, then the settings stored for this data
        chosen, tuned = METHODS[name].tuned[key], out["baselines"][f"{name}_tuned"]
        assert tuned["tuning"]["chosen"] == chosen and tuned["tuning"]["provenance"].startswith("stored")
        assert tuned["settings"] == {**out["baselines"][name]["settings"], **chosen}
    assert (tmp_path / "train_basis_synthetic.png").is_file()


def test_vary_fewshot_synthetic(tmp_path):
    p = run_script("RedditTLDR/vary_fewshot.py", "synthetic=True", f"out_dir={tmp_path}", f"data_dir={tmp_path}", "K=3",
                   "num_shots=[5,40]", "trials=2", "num_iterations=300", "fewshot_iterations=100", "baselines=['pal']",
                   *FAST_BASELINES)
    out = json.loads((tmp_path / "vary_fewshot_synthetic.json").read_text())
    assert [r["shots"] for r in out["results"]] == [5, 40]
    assert out["results"][0]["users_skipped"] == 0 and out["results"][1]["users_skipped"] >= 1
    assert "users skipped" in p.stdout and (tmp_path / "vary_fewshot_synthetic.png").is_file()
    pal = out["baselines"]["pal"]["results"]  # the same shots, the same skipped workers
    assert [r["shots"] for r in pal] == [5, 40] and [r["users_skipped"] for r in pal] == [
        r["users_skipped"] for r in out["results"]] and all(0 < r["unseen_test"]["mean"] < 1 for r in pal)
