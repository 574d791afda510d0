"""PRISM/: processing of the jsonl files, the split, loading, and prepare.py -> train_basis.py -> eval_rb2.py
end to end (CPU, no download)."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

import utils
from conftest import FAST_BASELINES, REPO_ROOT, run_script, write_rb2
from lorelib.extract import embed_batch, load_reward_model
from lorelib.files import load_metadata, load_tensors, save_tensors
from PRISM import prism, rewardbench

# ------------------------------------------------------------------------------------------------
# tiny PRISM in the real jsonl schemas

def turn(user, *replies):
    """One turn: the user message and its replies as (text, chosen) tuples."""
    return {"user": user, "replies": list(replies)}


def simple_dialog(cid):
    return [turn(f"{cid} hello", (f"{cid} good", True), (f"{cid} bad", False))]


def prism_spec():
    """user -> (num_completed_conversations, {conversation_id: [turns]})."""
    spec = {}
    u0 = {"c_u0_0": [turn("hi", ("A", True), ("B", False), ("C", False)),  # two rejected replies
                     turn("more", ("D", True), ("E", False)),
                     turn("again", ("F", False), ("G", False))],        # no chosen reply: dialog stops
          "c_u0_1": [turn("lonely", ("X", False), ("Y", False))]}       # no complete turn: dropped
    u0.update({f"c_u0_{i}": simple_dialog(f"c_u0_{i}") for i in range(2, 7)})
    spec["u0"] = (7, u0)
    for u in ["u1", "u2", "u3", "u4"]:
        spec[u] = (6, {f"c_{u}_{i}": simple_dialog(f"c_{u}_{i}") for i in range(6)})
    spec["few"] = (3, {f"c_few_{i}": simple_dialog(f"c_few_{i}") for i in range(3)})       # too few dialogs
    spec["nosurvey"] = (0, {f"c_ns_{i}": simple_dialog(f"c_ns_{i}") for i in range(6)})   # no completed conv.
    return spec


def write_prism(folder):
    """survey / conversations / utterances.jsonl with one malformed line in each of the last two."""
    os.makedirs(folder, exist_ok=True)
    survey, conversations, utterances = [], [], []
    for user, (completed, dialogs) in prism_spec().items():
        survey.append({"user_id": user, "survey_only": False, "num_completed_conversations": completed,
                       "age": "25-34 years old"})
        for cid, turns in dialogs.items():
            history = []
            for t, tr in enumerate(turns):
                history.append({"turn": t, "role": "user", "content": tr["user"], "model_provider": None,
                                "model_name": None, "score": None, "if_chosen": None, "within_turn_id": None})
                for k, (text, chosen) in enumerate(tr["replies"]):
                    score = 90 - 10 * k
                    history.append({"turn": t, "role": "model", "content": text, "model_provider": "p",
                                    "model_name": f"m{k}", "score": score, "if_chosen": chosen, "within_turn_id": k})
                    utterances.append({"utterance_id": f"{cid}-{t}-{k}", "user_id": user, "conversation_id": cid,
                                       "turn": t, "within_turn_id": k, "user_prompt": tr["user"],
                                       "model_response": text, "model_name": f"m{k}", "model_provider": "p",
                                       "score": score, "if_chosen": chosen})
            conversations.append({"conversation_id": cid, "user_id": user, "conversation_type": "unguided",
                                  "opening_prompt": turns[0]["user"], "conversation_turns": len(turns),
                                  "conversation_history": history})
    lines = {"survey.jsonl": [json.dumps(r) for r in survey],
             "conversations.jsonl": [json.dumps(r) for r in conversations],
             "utterances.jsonl": [json.dumps(r) for r in utterances]}
    lines["conversations.jsonl"].insert(2, '{"conversation_id": "broken", "user_id": ')   # line 3: bad JSON
    bad = {k: v for k, v in utterances[0].items() if k != "if_chosen"}
    lines["utterances.jsonl"].insert(4, json.dumps(bad))                                 # line 5: missing field
    for name, ls in lines.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(ls) + "\n")
    return folder


@pytest.fixture(scope="module")
def prism_dir(tmp_path_factory):
    return write_prism(tmp_path_factory.mktemp("prism_raw"))


def test_read_jsonl_reports_malformed_lines(prism_dir, capsys):
    rows = prism.read_jsonl(os.path.join(prism_dir, "utterances.jsonl"))
    out = capsys.readouterr().out
    assert "utterances.jsonl:5: missing field 'if_chosen'; line skipped" in out
    num_replies = sum(len(t["replies"]) for _, dialogs in prism_spec().values() for turns in dialogs.values()
                      for t in turns)
    assert len(rows) == num_replies > 0 and all("if_chosen" in r for r in rows)  # every well-formed line
    prism.read_jsonl(os.path.join(prism_dir, "conversations.jsonl"))
    assert "conversations.jsonl:3: invalid JSON" in capsys.readouterr().out


def test_processing_gives_expected_pairs(prism_dir):
    rows = [prism.read_jsonl(os.path.join(prism_dir, n)) for n in prism.FILES]
    dialogs = prism.build_dialogs(*rows)
    ids = {d["conversation_id"] for d in dialogs}
    assert "c_u0_1" not in ids and not any(i.startswith("c_ns_") for i in ids)  # no complete turn / no survey user
    pairs, users, convs = prism.build_pairs(dialogs, seed=123, user_split="filter_first")
    assert set(users["user_id"]) == {"u0", "u1", "u2", "u3", "u4"}  # 'few' has too few dialogs
    assert users["seen"].sum() == 4 and list(users["seen"]) == [True] * 4 + [False]
    assert (users["dialogs"] == 6).all() and (users["train_dialogs"] == 3).all()
    assert len(pairs) == 3 + 5 + 4 * 6 and len(convs) == len(pairs) + (2 + 5 + 4 * 6)
    assert (np.diff(pairs["user"]) >= 0).all()  # users contiguous, seen users first

    d0 = pairs[pairs["conversation_id"] == "c_u0_0"]
    assert list(d0["turn"]) == [0, 0, 1] and list(d0["chosen"]) == ["A", "A", "D"]
    assert list(d0["rejected"]) == ["B", "C", "E"]  # each rejected reply is its own pair
    assert list(d0["prompt"].iloc[0]) == [{"role": "user", "content": "hi"}]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"},
               {"role": "user", "content": "more"}]
    assert list(d0["prompt"].iloc[2]) == history  # history holds the chosen replies only
    assert d0["chosen_row"].iloc[0] == d0["chosen_row"].iloc[1]  # the chosen conversation is embedded once
    assert convs[d0["chosen_row"].iloc[2]] == history + [{"role": "assistant", "content": "D"}]
    assert convs[d0["rejected_row"].iloc[1]] == [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "C"}]
    assert all(isinstance(m["content"], str) for c in convs for m in c)
    assert list(d0["chosen_score"]) == [90.0, 90.0, 90.0] and list(d0["rejected_score"]) == [80.0, 70.0, 80.0]
    # half of every user's dialogs for train / few-shot, half for test, same split for all pairs of a dialog
    assert (pairs.groupby("dialog")["split"].nunique() == 1).all()
    assert (pairs.groupby(["user", "split"])["dialog"].nunique() == 3).all()
    t = prism.pair_tensors(pairs)
    assert t["chosen"].dtype == torch.int64 and len(t["split"]) == len(pairs)


def test_split_is_seeded():
    users = [f"u{i % 20}" for i in range(200)]
    a, b = prism.split_users(users, seed=123), prism.split_users(users, seed=123)
    assert a == b and a[1] == 16 and a != prism.split_users(users, seed=1)


def test_published_user_split_shuffles_all_users_then_drops_the_small_ones():
    counts = [3 if i % 2 else 7 for i in range(20)]  # odd users have too few dialogs
    dialog_users = [f"u{i:02d}" for i, c in enumerate(counts) for _ in range(c)]
    users, num_seen, dialog_split = prism.split_users(dialog_users, seed=123)
    order = sorted(set(dialog_users))
    np.random.RandomState(123).shuffle(order)
    expected_seen = [u for u in order[:16] if int(u[1:]) % 2 == 0]
    assert users[:num_seen] == expected_seen and users[num_seen:] == [u for u in order[16:] if int(u[1:]) % 2 == 0]
    assert all(s == -1 for u, s in zip(dialog_users, dialog_split) if int(u[1:]) % 2)
    users2, num_seen2, _ = prism.split_users(dialog_users, seed=123, user_split="filter_first")
    assert sorted(users2) == sorted(users) and num_seen2 == 8  # exactly 80% of the 10 kept users
    with pytest.raises(ValueError, match="user_split"):
        prism.split_users(dialog_users, user_split="other")


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)embeddings.safetensors not found.*python \S*PRISM/prepare.py"):
        prism.load(tmp_path)


# ------------------------------------------------------------------------------------------------
# scripts end to end: prepare -> train_basis -> eval_rb2 on the tiny random reward model

def test_prepare_train_eval_end_to_end(prism_dir, tiny_reward_model, tmp_path):
    data, out = tmp_path / "data", tmp_path / "results"
    log = run_script("PRISM/prepare.py", f"dataset_path={prism_dir}", f"data_dir={data}",
                     f"model_name={tiny_reward_model}", "max_tokens_per_batch=4096").stdout
    assert "utterances.jsonl:5: missing field" in log
    t = load_tensors(data / "embeddings.safetensors", prism.TENSORS)
    pairs = pd.read_parquet(data / "pairs.parquet")
    users = pd.read_parquet(data / "users.parquet")
    assert t["embeddings"].shape == (32 + 31, 64) and t["head"].shape == (64, 1) and len(users) == 5
    assert torch.equal(t["chosen"], torch.tensor(pairs["chosen_row"].to_numpy()))
    assert torch.equal(t["seen"].bool(), torch.tensor(pairs["seen"].to_numpy()))
    # rows are the embeddings of the right conversations, and E @ head is the model's own reward
    tokenizer, model = load_reward_model(tiny_reward_model, device="cpu")
    p = pairs.iloc[1]
    conv = list(p["prompt"]) + [{"role": "assistant", "content": p["rejected"]}]
    conv = [{"role": m["role"], "content": m["content"]} for m in conv]
    e = embed_batch(tokenizer, model, [conv])
    torch.testing.assert_close(t["embeddings"][p["rejected_row"]], e[0], rtol=1e-4, atol=1e-4)
    ids = tokenizer.apply_chat_template(conv, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logit = model(**ids).logits[0, 0]
    torch.testing.assert_close(e[0] @ t["head"][:, 0], logit, rtol=1e-4, atol=1e-4)
    # a second run finds the embeddings up to date
    assert "up to date" in run_script("PRISM/prepare.py", f"dataset_path={prism_dir}", f"data_dir={data}",
                                      f"model_name={tiny_reward_model}").stdout
    # the users' ratings of every pair's replies, as in pairs.parquet; a file prepared before they were stored
    # is refused by choice quality, and prepare.py adds them without embedding again
    path = data / "embeddings.safetensors"
    full = load_tensors(path)
    for k in prism.SCORES:
        assert torch.equal(full[k], torch.tensor(pairs[k].to_numpy(dtype=np.float32)))
    meta = load_metadata(path)
    save_tensors(path, {k: v for k, v in full.items() if k not in prism.SCORES},
                       metadata={**meta, "extras_sha256": "prepared before the ratings were stored"})
    proc = run_script("PRISM/train_basis.py", f"data_dir={data}", f"out_dir={out}", check=False)
    assert proc.returncode == 2 and "has no `chosen_score` tensor" in proc.stderr and \
        f"add it with: python {os.path.join(REPO_ROOT, 'PRISM', 'prepare.py')} data_dir={data}" in proc.stderr
    log = run_script("PRISM/prepare.py", f"dataset_path={prism_dir}", f"data_dir={data}",
                     f"model_name={tiny_reward_model}").stdout
    assert "has current embeddings but other extra tensors or metadata, rewriting it" in log
    again = load_tensors(path)
    assert all(torch.equal(again[k], full[k]) for k in full) and set(again) == set(full)

    log = run_script("PRISM/train_basis.py", f"data_dir={data}", f"out_dir={out}", "K_list=[0,1,3]",
                     "num_iterations=30", "fewshot_iterations=20").stdout
    assert "3 seen / 2 unseen users" in log  # published split: a user with too few dialogs was among the first 80%
    res = json.loads((out / "train_basis.json").read_text())
    assert [(r["alpha"], r["K"]) for r in res["results"]][:9] == [(a, K) for a in (0, 100, 1e4) for K in (0, 1, 3)]
    assert res["config"]["alpha_list"] is None and (out / "train_basis.png").is_file()  # alpha chosen with K
    # choice quality of the reference head, by hand from pairs.parquet: each seen user's test first turns
    first = pairs[(pairs["split"] == "test") & pairs["seen"]]
    first = first[first["turn"] == first.groupby("dialog")["turn"].transform("min")]
    tops = {}
    for _, turn in first.groupby("dialog"):
        rows = [turn["chosen_row"].iloc[0]] + list(turn["rejected_row"])
        ratings = [turn["chosen_score"].iloc[0]] + list(turn["rejected_score"])
        picked = int(torch.argmax(t["embeddings"][rows] @ t["head"][:, 0]))
        tops.setdefault(turn["user"].iloc[0], []).append(ratings[picked] == max(ratings))
    ref = res["choice"]["results"][0]
    assert ref["K"] == 0 and ref["seen"]["top"]["mean"] == pytest.approx(np.mean([np.mean(v) for v in tops.values()]))
    assert set(res["choice"]["baselines"]) == {"per_user_bt", "vpl", "pal", "mrm"}  # no tuned settings for these files
    assert (out / "train_basis_choice.png").is_file()
    head_file = out / "models" / "K3_alpha10000.safetensors"
    h = load_tensors(head_file, ["V", "W", "W_unseen"])
    assert h["V"].shape[0] == 64 and h["W"].shape == (3, h["V"].shape[1]) and h["W_unseen"].shape[0] == 2
    torch.testing.assert_close(load_tensors(out / "models" / "K0_alpha10000.safetensors")["V"], t["head"])
    # the common model format: PRISM user ids, the reward model, and rewards e^T V w of the data's own rows
    m = utils.load_lore_model(head_file)
    assert m["users"] == list(users["user_id"][:3]) and m["unseen_users"] == list(users["user_id"][3:])
    assert (m["model_name"], m["dataset"], m["fewshot_learning_rate"]) == (tiny_reward_model, "PRISM", 0.5)
    rm = utils.PersonalizedReward.load(head_file)
    p = pairs.iloc[-1]  # a pair of the last unseen user
    conv = [{"role": m_["role"], "content": m_["content"]} for m_ in p["prompt"]]
    conv.append({"role": "assistant", "content": p["chosen"]})
    torch.testing.assert_close(rm.reward([conv], user=p["user_id"], calibrated=False),
                               t["embeddings"][[p["chosen_row"]]] @ m["V"] @ m["W_unseen"][p["user"] - 3],
                               atol=1e-4, rtol=1e-4)
    # K = 0 is the reward model's own head: its logits are log-odds already (logit scale 1), the fit's are / 100
    k0 = utils.PersonalizedReward.load(out / "models" / "K0_alpha10000.safetensors")
    assert (k0.logit_scale, rm.logit_scale) == (1.0, 100.0)
    expected = (t["embeddings"][[p["chosen_row"]]] @ t["head"])[:, 0]
    torch.testing.assert_close(k0.reward([conv], user=p["user_id"]), expected, atol=1e-4, rtol=1e-4)

    rb2 = write_rb2(tmp_path / "rb2")
    log = run_script("PRISM/eval_rb2.py", "--rm_head", head_file, "weights=all", "--limit", "2", f"dataset_path={rb2}",
                     f"model_name={tiny_reward_model}", f"data_dir={data}", f"out_dir={out}").stdout
    csv = pd.read_csv(out / "eval_rb2_K3_alpha10000_all_limit2.csv")
    K = h["V"].shape[1]
    assert csv["head"][0] == "reference" and sorted(csv["head"][1:]) == sorted(
        ["K3_alpha10000 uniform", "K3_alpha10000 user 0"] + [f"K3_alpha10000 basis {j}" for j in range(K)])
    assert list(csv.columns) == ["head"] + rewardbench.SUBSETS + ["overall", "overall_published"]
    assert csv.iloc[:, 1:].apply(lambda c: c.between(0, 1)).all().all()
    assert "Precise IF" in log and (data / "rb2_limit2.safetensors").is_file()
    five = csv[rewardbench.SUBSETS[:-1]].mean(axis=1)
    assert np.allclose(csv["overall_published"], (five + csv["Ties"]) / 2)

    # the published flags, a published .pt head [F, K] and no weights=: every column its own head, ranked
    pt = tmp_path / "V.pt"
    torch.save({"V": h["V"]}, pt)
    log = run_script("PRISM/eval_rb2.py", "--model", tiny_reward_model, "--rm_head", pt, "--head_key", "V",
                     "--head_bias", "0.5", "--split", "test", "--limit", "2", "--batch_size", "4", "--max_length",
                     "4096", "--truncation_side", "left", "--device", "cpu", "--dtype", "float32", "--top_k", "1",
                     "--save_csv", tmp_path / "published.csv", "--verbose_failures", "True", "--mode", "rm_head",
                     f"dataset_path={rb2}", f"data_dir={data}").stdout
    csv = pd.read_csv(tmp_path / "published.csv")
    assert list(csv["head"])[0] == "reference" and sorted(csv["head"][1:]) == [f"V basis {j}" for j in range(K)]
    assert list(csv["overall_published"][1:]) == sorted(csv["overall_published"][1:], reverse=True)
    assert "prompts not fully correct" in log and "up to date" in log
    # the reference row is the model's own reward: recompute it from the model's logits
    df = rewardbench.load_prompts("rb2", rb2, limit=2)
    convs, prompt_row, is_chosen = rewardbench.conversations(df)
    with torch.no_grad():
        rewards = [model(**tokenizer.apply_chat_template(c, return_tensors="pt", return_dict=True)).logits[0, 0]
                   for c in convs]
    expected = rewardbench.accuracy(torch.stack(rewards), prompt_row, is_chosen, df["subset"].tolist())
    assert csv.iloc[0, 1:].to_dict() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------
# synthetic mode

def test_synthetic_lore_beats_bt_beats_reference():
    """On the planted low-rank data (alpha = 0), unseen users: LoRe > BT > reference head."""
    data = prism.load(synthetic=True, synthetic_users=400)
    train, test, train_u, test_u = data.features
    assert len(data.info["fewshot_dialogs"]) == len(train_u.user) and (data.N, data.N_unseen) == (320, 80)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 shared cores: one thread is several times faster here
    try:
        res = utils.run_regularized([0, 1, 4], [0.0], data.head, train, test, train_u, test_u, data.N, data.N_unseen,
                                    "cpu", num_iterations=300)
    finally:
        torch.set_num_threads(threads)
    unseen = res[3]  # K = 0, 1, 4 of the one alpha
    assert unseen[2] > unseen[1] + 0.03 and unseen[1] > unseen[0] + 0.03


def test_train_basis_and_vary_fewshot_synthetic(tmp_path):
    # F = 8: a user's few dialogs (about 18 pairs for an unseen user) pin down a reward of its own; at the
    # default F = 64 per-user BT falls below the head (the README's table)
    log = run_script("PRISM/train_basis.py", "synthetic=True", "synthetic_users=200", "synthetic_features=8",
                     "K_list=[0,1,3]", "alpha_list=[0,1e4]", "num_iterations=50", "fewshot_iterations=50",
                     *FAST_BASELINES, f"out_dir={tmp_path}").stdout
    assert "seen_test" in log and all(name in log for name in ("per-user BT", "VPL", "PAL"))
    res = json.loads((tmp_path / "train_basis_synthetic.json").read_text())
    assert len(res["results"]) == 6 and res["num_iterations_used"] == 50
    ref = res["results"][0]["unseen_test"]["mean"]  # on unseen users, every baseline beats the model's own head
    baselines = {m: r["unseen_test"]["mean"] for m, r in res["baselines"].items()}
    assert set(baselines) == {"per_user_bt", "vpl", "pal", "mrm"} and all(b > ref + 0.03 for b in baselines.values()), \
        (ref, baselines)
    assert (tmp_path / "models_synthetic" / "K3_alpha0.safetensors").is_file()
    # choice quality on the first turns, by the users' ratings: every method and alpha, beside chance
    choice = res["choice"]
    assert choice["kind"] == "rating" and len(choice["results"]) == 6 and set(choice["baselines"]) == set(baselines)
    top = [r["unseen"]["top"]["mean"] for r in choice["results"][:3]]  # alpha = 0: ref < LoRe K = 3
    assert top[2] > top[0] and top[2] > choice["chance"]["unseen"]["top"]["mean"] + 0.1, (top, choice["chance"])
    assert (tmp_path / "train_basis_synthetic_choice.png").is_file() and "choice quality" in log

    run_script("PRISM/vary_fewshot.py", "synthetic=True", "synthetic_users=200", "K=3", "trials=2",
               "num_iterations=50", "fewshot_iterations=50", "baselines=['vpl']", *FAST_BASELINES,
               "shot_selection=['random','active']", f"out_dir={tmp_path}")
    res = json.loads((tmp_path / "vary_fewshot_synthetic.json").read_text())
    active = res["results_by_selection"]["active"]  # whole dialogs asked one at a time: one deterministic run
    assert res["results_by_selection"]["random"] == res["results"] and [r["shots"] for r in active] == \
        [r["shots"] for r in res["results"]] and all(r["unseen_test"]["std"] == 0 for r in active[:2])
    assert 0 < res["full_pool"]["unseen_test"]["mean"] < 1 and set(res["shots_to_95pct_of_full_pool"]) == \
        {"random", "active"}
    shots = [r["shots"] for r in res["results"]]
    assert shots[0] == 1 and shots == list(range(1, len(shots) + 1)) and len(shots) >= 3
    assert res["results"][0]["users_skipped"] == 0 and res["results"][-1]["users_skipped"] > 0
    assert all(0 <= r["unseen_test"]["mean"] <= 1 for r in res["results"])
    assert (tmp_path / "vary_fewshot_synthetic.png").is_file()
    vpl = res["baselines"]["vpl"]["results"]  # dialogs as shots, as for LoRe
    assert [r["shots"] for r in vpl] == shots and all(0 < r["unseen_test"]["mean"] < 1 for r in vpl[:2])
    # alpha: 0 with the fixes (at 1e4 the basis collapses onto the head), the published 1e4 with reference=published
    assert res["alpha"] == 0.0
    run_script("PRISM/vary_fewshot.py", "synthetic=True", "synthetic_users=200", "K=3", "trials=1", "num_shots=[1]",
               "num_iterations=5", "fewshot_iterations=5", "baselines=[]", "reference=published",
               f"out_dir={tmp_path}")
    res = json.loads((tmp_path / "vary_fewshot_synthetic.json").read_text())
    assert res["alpha"] == 1e4
