"""The published utils.py API, called the way the published scripts and notebooks call it: module names,
list inputs, keyword names and defaults, return layouts, the helper functions the published file left broken."""
import inspect
import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_core import loop_loss, planted

import utils
from lorelib.files import (
    PUBLISHED_REFERENCE,
    choose_reference,
    load_pickle,
    read_published_reference,
    read_score_weight,
    save_tensors,
)
from lorelib.model import pack


def test_module_level_names_of_the_published_star_import():
    names = {}
    exec("from utils import *", names)
    assert names["F"] is F and names["optim"] is torch.optim and names["nn"] is torch.nn
    assert names["np"] is np and names["torch"] is torch and names["random"].random
    assert names["device"] == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_published_keyword_names_and_defaults():
    published = {
        "solve": ["train_features", "num_basis_vectors", "num_iterations", "learning_rate"],
        "solve_regularized": ["V_sft", "alpha", "train_features", "num_basis_vectors", "num_iterations",
                              "learning_rate"],
        "solve_regularized_simplex": ["V_sft", "alpha", "train_features", "num_basis_vectors", "num_iterations",
                                      "learning_rate"],
        "solve_multi_reward": ["train_features", "num_basis_vectors", "num_iterations", "learning_rate"],
        "learn_multiple": ["train_features", "num_iterations", "learning_rate"],
        "learn_multiple_few_shot": ["train_features", "V", "num_iterations", "learning_rate"],
        "learn_multiple_few_shot_weighted": ["alpha", "train_features", "current_dialog_features", "V",
                                             "num_iterations", "learning_rate"],
        "learn_single_reward": ["train_features", "num_iterations", "learning_rate"],
        "learn_single_reward_regularized": ["V_ref", "alpha", "train_features", "num_iterations", "learning_rate"],
    }
    for name, params in published.items():
        sig = inspect.signature(getattr(utils, name)).parameters
        assert list(sig)[:len(params)] == params, name
        assert sig["num_iterations"].default == 1000 and sig["learning_rate"].default == 0.01, name
    more = {"sample_shots": ["train_features_unseen", "shots"], "simulate_user": ["reward_tensor", "features", "w"],
            "simulate_population": ["reward_tensor", "features", "W"], "evaluate_model": ["X", "V", "w"],
            "create_sparse_tensor": ["dense_tensor", "sample_percentage"], "generate_popupulation": ["alpha", "N"],
            "eval_multiple": ["W_list", "V_list", "test_features"],
            "create_dataset_prism_shots": ["embeddings", "shots"]}
    for name, params in more.items():
        assert list(inspect.signature(getattr(utils, name)).parameters)[:len(params)] == params, name
    X, _, _, _ = planted(num_users=5, pairs_per_user=8, F_dim=6, seed=1)
    W, V = utils.solve_regularized(torch.randn(6, 1), 0, X, num_basis_vectors=3, num_iterations=5)
    assert W.shape == (5, 3) and V.shape == (6, 3)


def test_pairs_behave_like_the_published_list():
    X = [torch.randn(m, 4) for m in (2, 3, 1)]
    pairs = utils.Pairs.from_list(X)
    assert len(pairs) == 3 and torch.equal(pairs[-1], X[-1]) and torch.equal(pairs[1], X[1])
    assert [x.shape for x in pairs[1:]] == [(3, 4), (1, 4)] and len(pairs[::2]) == 2
    assert all(torch.equal(a, b) for a, b in zip(pairs, X)) and len(list(pairs)) == 3
    with pytest.raises(IndexError):
        pairs[-4]


def test_simulate_user_accepts_the_published_nested_lists_and_object_arrays():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(6, 8, 5, generator=g)
    S = np.random.RandomState(0).rand(6, 8, 3)
    w = np.array([0.2, 0.5, 0.3])
    ref = utils.simulate_user(S, E, w)
    features = [[E[p, r] for r in range(8)] for p in range(6)]  # P lists of 8 tensors [F]
    S_obj = np.empty((6, 8, 3), dtype=object)
    S_obj[...] = S.tolist()
    assert torch.equal(utils.simulate_user(S_obj, features, w), ref)
    best, worst = (S @ w).argmax(1), (S @ w).argmin(1)
    assert torch.equal(ref[2], E[2, best[2]] - E[2, worst[2]])
    pop = utils.simulate_population(S_obj, features, np.stack([w, w[::-1]]))
    assert pop.shape == (2, 6, 5) and torch.equal(pop[0], ref)


def test_create_dataset_prism_on_the_published_nested_dict():
    e = {k: torch.full((3,), float(v)) for k, v in zip("abcdef", range(1, 7))}
    embeddings = {"u1": {"d1": {"chosen": [e["a"], e["b"]], "rejected": [e["c"], torch.stack([e["d"], e["e"]])]},
                         "d2": {"chosen": [e["f"]], "rejected": [e["a"]]}},
                  "u2": {"d3": {"chosen": [e["b"]], "rejected": [e["a"]]}}}
    out = utils.create_dataset_prism(embeddings)
    assert len(out) == 2 and torch.equal(out[0][:, 0], torch.tensor([1 - 3, 2 - 4, 2 - 5, 6 - 1.0]))
    assert torch.equal(out[1], torch.ones(1, 3))
    np.random.seed(0)
    shots = utils.create_dataset_prism_shots(embeddings, 1)
    assert len(shots[0]) in (3, 1) and torch.equal(shots[1], torch.ones(1, 3))
    with pytest.raises(ValueError, match="fewer than shots=2"):
        utils.create_dataset_prism_shots(embeddings, 2)


def test_learn_multiple_equals_a_plain_loop_of_per_user_fits():
    X, test, V_true, W_true = planted(num_users=6, pairs_per_user=30, num_test=100, F_dim=8, seed=2)
    W_list, V_list = utils.learn_multiple(X, num_iterations=200, learning_rate=0.05)
    assert len(W_list) == len(V_list) == 6 and all(v.shape == (8, 1) for v in V_list)
    for x, v in zip(X, V_list):
        u = torch.zeros(8, requires_grad=True)
        opt = torch.optim.Adam([u], lr=0.05)
        for _ in range(200):
            opt.zero_grad()
            F.softplus(-(x @ u) / 100).mean().backward()
            opt.step()
        assert torch.allclose(v[:, 0], u.detach(), atol=1e-4)
    acc = utils.eval_multiple(W_list, V_list, test, verbose=False)
    assert np.mean(acc) > 0.75  # each user's own reward from 30 pairs in 8 dimensions (chance: 0.5)


def test_single_reward_pooled_and_regularized():
    g = torch.Generator().manual_seed(3)
    v_true = torch.randn(8, generator=g)
    X = []
    for _ in range(4):
        d = torch.randn(50, 8, generator=g)
        X.append(d * torch.sign(d @ v_true)[:, None])
    V = utils.learn_single_reward(X, num_iterations=300, learning_rate=0.05)
    u = torch.zeros(8, requires_grad=True)  # the plain pooled fit
    opt = torch.optim.Adam([u], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        F.softplus(-(torch.cat(X) @ u) / 100).mean().backward()
        opt.step()
    assert V.shape == (8, 1) and torch.allclose(V[:, 0], u.detach(), atol=1e-4)
    d = torch.randn(500, 8, generator=g)
    assert ((d @ V[:, 0] > 0) == (d @ v_true > 0)).float().mean() > 0.8
    assert torch.allclose(utils.learn_single_reward_regularized(torch.randn(8, 1), 0.0, X, 300, 0.05), V)
    V_ref = -v_true.reshape(8, 1)
    pulled = utils.learn_single_reward_regularized(V_ref, 100.0, X, 300, 0.05)
    assert (pulled - V_ref).norm() < 0.1 * V_ref.norm()


def test_solve_is_lore_without_regulariser():
    X, _, _, _ = planted(num_users=10, pairs_per_user=10, F_dim=12, seed=4)
    utils.set_seed(0)
    W, V = utils.solve(X, 3, num_iterations=30)
    V_sft = torch.randn(12, 1)  # ignored with alpha = 0
    utils.set_seed(0)
    W2, V2 = utils.LoRe(V_sft, 0.0, 10, 12, 3, 30, 0.01).train(X)
    assert torch.allclose(W, W2) and torch.allclose(V, V2) and torch.allclose(W.sum(1), torch.ones(10))
    utils.set_seed(0)
    model = utils.solve_multi_reward(X, 3, num_iterations=30)
    assert isinstance(model, utils.LoRe) and torch.allclose(model.V.detach(), V)


def test_few_shot_weighted_follows_the_current_dialog():
    V = torch.eye(4)[:, :2]  # basis 0 prefers feature 0, basis 1 feature 1
    d = torch.zeros(20, 4)
    d[:, 0], d[:, 1] = 100.0, -100.0  # these pairs favour basis 0
    train, current = [d], [-d[:5]]  # the current dialog favours basis 1
    base = utils.learn_multiple_few_shot(train, V, 200, 0.1)
    assert torch.allclose(utils.learn_multiple_few_shot_weighted(0.0, train, current, V, 200, 0.1)[0], base[0])
    assert base[0][0] > 0.9
    assert utils.learn_multiple_few_shot_weighted(10.0, train, current, V, 200, 0.1)[0][1] > 0.9


def test_forward_returns_the_published_loss_terms():
    X, _, _, _ = planted(num_users=5, pairs_per_user=7, F_dim=6, seed=5)
    V_sft = torch.randn(6, 1)
    model = utils.LoRe(V_sft, 0.3, 5, 6, 2)
    nll, reg = model(X)
    assert torch.allclose(nll + reg, loop_loss(model.V, model.W, X, 0.3, V_sft), atol=1e-6)
    diffs, user, counts = pack(X, "cpu")
    assert torch.allclose(nll + reg, model.loss(diffs, user, counts), atol=1e-6)
    assert model(diffs, user).shape == (35,)  # the packed form

    reg_model = utils.LoRe_regularized(V_sft, 5.0, 5, 6, 2)
    nll, reg = reg_model(X, 2.0)
    pooled = F.softplus(-(torch.cat(X) @ reg_model.V * reg_model.weights()[user]).sum(1) / 100).mean()
    cos = F.cosine_similarity(reg_model.V, V_sft.expand(6, 2), dim=0)
    assert torch.allclose(nll, pooled, atol=1e-6) and torch.allclose(reg, 2.0 * (1 - cos).mean())
    assert reg_model(diffs, user).shape == (35,)

    pb = utils.PersonalizeBatch(5, 6, 2)
    W = pb.weights()
    expected = sum(F.softplus(-(x @ model.V.detach() @ W[i]) / 100).mean() for i, x in enumerate(X))
    assert torch.allclose(pb(X, model.V.detach()), expected, atol=1e-6)


def test_run_results_plot_as_published(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, test, _, _ = planted(num_users=8, pairs_per_user=6, num_test=10, F_dim=8, seed=6)
    K_list = [0, 1, 2]
    head = torch.randn(8, 1)
    res = utils.run(K_list, [0.0, 1.0], head, train, test, train, test, 8, 8, "cpu",
                    num_iterations=5, fewshot_iterations=5)
    assert all(r.shape == (6,) for r in res)  # alpha-major: K_list of alpha 0, then of alpha 1
    plt.plot(K_list, res[1][:3])
    plt.errorbar(K_list, res[3][3:], yerr=res[7][3:])
    plt.close("all")
    head_acc = np.mean(utils.eval_multiple([torch.ones(1)] * 8, head, test, verbose=False))
    assert res[1][0] == res[1][3] == pytest.approx(head_acc)  # K = 0 (the head) of each alpha
    assert f"{res[1][0]:.4f}" == f"{head_acc:.4f}"


# ------------------------------------------------------------------------------------------------
# the published files: converted by each prepare.py (from_published=...), no GPU, no model load

def test_read_score_weight_from_single_and_sharded_checkpoints(tiny_reward_model, tmp_path):
    from safetensors.torch import load_file, save_file
    weight = load_file(os.path.join(tiny_reward_model, "model.safetensors"))["score.weight"]
    assert torch.equal(read_score_weight(tiny_reward_model), weight.float().T)
    save_file({"model.norm.weight": torch.ones(64)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"score.weight": weight}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "score.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(read_score_weight(tmp_path), weight.float().T)
    with pytest.raises(FileNotFoundError, match="score.weight"):
        read_score_weight(tmp_path / "missing")


def test_published_reference_is_the_last_linear_of_automodel(tiny_reward_model, tmp_path):
    """The published scripts' reference direction, read from the shard alone, equals what their loop over
    AutoModel(...).named_modules() takes: weight[:, 0] of the last nn.Linear (here layers.1.mlp.down_proj, not the
    reward head); prepare.py stores it, and reference="published" makes it the K = 0 column and V_sft."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(tiny_reward_model)
    last_linear_layer = None
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            last_linear_layer = module
    V_final = last_linear_layer.weight[:, 0]
    ref = read_published_reference(tiny_reward_model)
    assert ref.shape == (64, 1) and torch.equal(ref[:, 0], V_final.float())
    assert not torch.allclose(ref, read_score_weight(tiny_reward_model))
    tensors = {"head": read_score_weight(tiny_reward_model), PUBLISHED_REFERENCE: ref}
    assert torch.equal(choose_reference("published", tensors), ref)
    assert torch.equal(choose_reference("head", tensors), tensors["head"])
    with pytest.raises(utils.InputError, match="published_reference.*python prepare.py"):
        choose_reference("published", {"head": tensors["head"]}, "f.safetensors", "python prepare.py")


def test_load_pickle_reads_tensors_and_refuses_code(tmp_path):
    obj = {"w1": [{"embeddings": {"winning": [torch.ones(3)]}}]}
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(obj, f)
    torch.save(obj, tmp_path / "torch.pkl")
    for name in ["plain.pkl", "torch.pkl"]:
        assert torch.equal(load_pickle(tmp_path / name)["w1"][0]["embeddings"]["winning"][0], torch.ones(3))
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(ValueError, match="refused"):
        load_pickle(tmp_path / "evil.pkl")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_personalllm_published_embeddings_convert(tmp_path):
    from PersonalLLM import personalllm
    P, F_dim = 3, 5
    E = torch.randn(P * 8, F_dim)
    save_tensors(tmp_path / "embeddings.safetensors", {"embeddings": E})
    rng = np.random.RandomState(0)
    df = pd.DataFrame({f"response_{i}_{m}": rng.rand(P) for i in range(1, 9) for m in personalllm.MODEL_NAMES})
    head = torch.randn(F_dim, 1)
    out = personalllm.convert_published(tmp_path / "embeddings.safetensors", df, head, tmp_path / "train.safetensors")
    E2, S, head2 = personalllm.read_split(out, "make")
    assert torch.equal(E2, E) and torch.equal(head2, head) and S.shape == (P, 8, 10)
    ref = torch.randn(F_dim, 1)
    out = personalllm.convert_published(tmp_path / "embeddings.safetensors", df, head, out, ref)
    assert torch.equal(personalllm.read_split(out, "make", reference="published")[2], ref)
    assert S[1, 2, 3] == pytest.approx(df[f"response_3_{personalllm.MODEL_NAMES[3]}"][1], rel=1e-6)
    with pytest.raises(ValueError, match="expected"):
        personalllm.convert_published(tmp_path / "embeddings.safetensors", df.iloc[:2], head, tmp_path / "x")


def test_tldr_published_pickles_convert(tmp_path):
    from RedditTLDR import tldr
    head = torch.randn(4, 1)
    for split, name in tldr.PUBLISHED_FILES.items():
        data = {w: [{"text": "post", "winning_summary": "a", "losing_summary": "b",
                     "embeddings": {"winning": [torch.full((4,), 1.0 + k)], "losing": [torch.zeros(4)]}}
                    for k in range(n)] for w, n in [("wB", 2), ("wA", 3)]}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(data, f)
    tensors, names = tldr.convert_published(tmp_path / tldr.PUBLISHED_FILES["train"], head)
    save_tensors(tmp_path / "train.safetensors", tensors, metadata={"workers": json.dumps(names)})
    split = tldr.read_split(tmp_path / "train.safetensors")
    assert list(split["worker"]) == ["wB", "wB", "wA", "wA", "wA"] and torch.equal(split["head"], head)
    assert torch.equal(split["chosen"][:, 0], torch.tensor([1.0, 2.0, 1.0, 2.0, 3.0]))
    assert torch.equal(split["rejected"], torch.zeros(5, 4))


def test_prism_published_pickles_convert_and_load(tiny_reward_model, tmp_path):
    from conftest import run_script
    from PRISM import prism
    g = torch.Generator().manual_seed(0)

    def record(user, dialog, seen, split):
        return {"prompt": "hi", "extra_info": {
            "user_id": user, "dialog_id": dialog, "chosen_utterance": "c", "rejected_utterance": "r",
            "chosen_conv_embedding": torch.randn(64, generator=g),
            "rejected_conv_embedding": torch.randn(64, generator=g),
            "seen": seen, "split": split}}
    users = [("s1", True), ("s2", True), ("u1", False)]
    for split in ["train", "test"]:
        records = [record(u, f"{u}-{split}-{d}", seen, split) for u, seen in users for d in range(2)]
        torch.save(records, tmp_path / prism.PUBLISHED_FILES[split])
    run_script("PRISM/prepare.py", f"from_published={tmp_path}", f"data_dir={tmp_path / 'data'}",
               f"model_name={tiny_reward_model}")
    data = prism.load(tmp_path / "data")
    assert (data.N, data.N_unseen) == (2, 1) and [len(p.user) for p in data.features] == [4, 4, 2, 2]
    first = torch.load(tmp_path / "train_embeddings.pkl", weights_only=True)[0]["extra_info"]
    assert torch.allclose(data.seen_train[0][0], first["chosen_conv_embedding"] - first["rejected_conv_embedding"])
    assert torch.equal(data.head, read_score_weight(tiny_reward_model))
