"""The LoRe library: models, packing, simulation, evaluation and the run pipelines."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import utils
from lorelib import kernels
from lorelib.config import all_finite
from lorelib.data import user_accuracies
from lorelib.evaluate import holdout_pairs
from lorelib.files import load_tensors, save_json, save_tensors
from lorelib.kernels import numba


def planted(num_users=60, pairs_per_user=40, num_test=200, F_dim=32, rank=3, seed=0):
    """Users with w* on the simplex over a rank-`rank` basis V* [F, rank]; every pair is
    oriented so that d^T V* w* > 0. -> (train list, test list, V*, W*)."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(F_dim, rank, generator=g)
    W = torch.distributions.Dirichlet(torch.full((rank,), 0.3)).sample((num_users,))

    def draw(m):
        out = []
        for w in W:
            d = torch.randn(m, F_dim, generator=g)
            out.append(d * torch.sign(d @ V @ w)[:, None])
        return out
    return draw(pairs_per_user), draw(num_test), V, W


def loop_loss(V, W_logits, X, alpha=0.0, V_sft=None):
    """The published per-user loop: sum over users of their mean -log sigmoid."""
    loss = 0.0
    W = torch.softmax(W_logits, 1)
    for i, x in enumerate(X):
        loss = loss + F.softplus(-(x @ V @ W[i]) / 100).mean()
    if alpha:
        loss = loss + alpha * ((V - V_sft) ** 2).sum()
    return loss


def test_packed_loss_and_gradients_equal_per_user_loop():
    X = [torch.randn(m, 16) for m in (3, 7, 1, 12)]
    utils.set_seed(0)
    V_sft = torch.randn(16, 1)
    model = utils.LoRe(V_sft, 0.3, 4, 16, 3)
    pairs = utils.Pairs.from_list(X)
    packed = model.loss(pairs.dense(), pairs.user, pairs.counts())
    packed.backward()
    V = model.V.detach().clone().requires_grad_()
    Wl = model.W.detach().clone().requires_grad_()
    looped = loop_loss(V, Wl, X, 0.3, V_sft)
    looped.backward()
    assert abs(packed.item() - looped.item()) < 1e-5
    assert torch.allclose(model.V.grad, V.grad, atol=1e-5)
    assert torch.allclose(model.W.grad, Wl.grad, atol=1e-5)


@pytest.mark.skipif(numba is None, reason="numba not installed")
def test_fused_cpu_kernel_equals_two_pass_torch_path(monkeypatch):
    """The one-pass numba loss and gradients == the two thin products through autograd."""
    X = [torch.randn(m, 300) * 5 for m in (3, 40, 1, 17, 260)]
    pairs = utils.Pairs.from_list(X)
    grads = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(kernels, "numba", None)
        utils.set_seed(0)
        model = utils.LoRe(None, 0, 5, 300, 4)
        loss = model.loss(pairs.dense(), pairs.user, pairs.counts())
        loss.backward()
        grads.append((loss.item(), model.V.grad, model.W.grad))
    (l1, v1, w1), (l2, v2, w2) = grads
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert torch.allclose(v1, v2, atol=1e-6, rtol=1e-4) and torch.allclose(w1, w2, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(numba is None or (os.cpu_count() or 1) < 2, reason="needs numba and 2 cores")
def test_fused_cpu_kernel_keeps_the_torch_thread_count():
    """numba's OpenMP layer sets the process-wide OpenMP thread count when its kernel runs on 2 threads; the
    kernel call puts PyTorch's back, or every later PyTorch op (few-shot fits, baselines) runs with more
    threads than asked for. In a fresh process: the tests otherwise run numba on one thread."""
    code = ("import torch, utils; torch.set_num_threads(1); "
            "utils.LoRe(None, 0, 2, 300, 2, 3).train([torch.randn(50, 300), torch.randn(40, 300)], device='cpu'); "
            "print('threads', torch.get_num_threads())")
    env = {**os.environ, "NUMBA_NUM_THREADS": "2", "PYTHONPATH": os.path.dirname(os.path.dirname(utils.__file__))
           or "."}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "threads 1" in out.stdout, out.stdout


def test_thin_matmul_gradient_matches_autograd():
    X, V = torch.randn(1000, 300), torch.randn(300, 4, requires_grad=True)
    G = torch.randn(1000, 4)
    (kernels.ThinMatmul.apply(X, V) * G).sum().backward()
    assert torch.allclose(V.grad, X.t() @ G, atol=1e-3, rtol=1e-5)


def test_lore_shapes_simplex_and_loss_decreases():
    X, _, _, _ = planted(num_users=20, pairs_per_user=10)
    utils.set_seed(0)
    model = utils.LoRe(None, 0, 20, 32, 4, num_iterations=100)
    W, V = model.train(X)
    assert W.shape == (20, 4) and V.shape == (32, 4)
    assert torch.allclose(W.sum(1), torch.ones(20), atol=1e-5) and (W >= 0).all()
    assert model.losses[-1] < 0.5 * model.losses[0]


def test_planted_low_rank_recovered_and_bt_is_worse():
    train, test, _, _ = planted()
    accs = {}
    for K in (1, 3, 4):
        utils.set_seed(0)
        W, V = utils.LoRe(None, 0, len(train), 32, K, 1000, 0.5).train(train)
        accs[K] = utils.eval_multiple(list(W), V, test, verbose=False)
    assert np.mean(accs[3]) >= 0.9 and np.mean(accs[4]) >= 0.9
    assert np.mean(accs[1]) < np.mean(accs[3]) - 0.1


def test_personalize_batch_recovers_known_simplex_weights():
    g = torch.Generator().manual_seed(1)
    V = torch.linalg.qr(torch.randn(24, 3, generator=g))[0] * 200  # logits ~ N(0, 2^2)
    w_true = torch.tensor([[0.8, 0.2, 0.0], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    X = []
    for w in w_true:
        d = torch.randn(2000, 24, generator=g)
        p = torch.sigmoid(d @ V @ w / 100)  # Bradley-Terry labels from the true weights
        X.append(d * torch.where(torch.rand(2000, generator=g) < p, 1.0, -1.0)[:, None])
    W = torch.stack(utils.PersonalizeBatch(3, 24, 3, 500, 0.1).train(X, V))
    assert torch.allclose(W.sum(1), torch.ones(3), atol=1e-5)
    assert (W - w_true).abs().max() < 0.05, W


def test_personalize_batch_vectorised_equals_one_user_at_a_time():
    X = [torch.randn(m, 10) for m in (4, 9, 2)]
    V = torch.randn(10, 3) * 30
    together = torch.stack(utils.PersonalizeBatch(3, 10, 3, 200, 0.1).train(X, V))
    alone = torch.stack([utils.PersonalizeBatch(1, 10, 3, 200, 0.1).train([x], V)[0] for x in X])
    assert torch.allclose(together, alone, atol=1e-5)


def test_regularized_variant_keeps_used_bases_and_schedule():
    train, _, _, _ = planted(num_users=30, pairs_per_user=20)
    utils.set_seed(0)
    V_sft = torch.randn(32, 1)
    model = utils.LoRe_regularized(V_sft, 10.0, 30, 32, 6, num_iterations=200)
    assert model.alpha_at(0) == 0 and model.alpha_at(40) == 0
    assert model.alpha_at(100) == pytest.approx(5.0) and model.alpha_at(199) == 10.0
    assert 0.0 <= model.W.min() and model.W.max() < 1.0  # logits ~ U[0, 1)
    W, V = model.train(train)
    full = model.weights().detach()
    keep = full.max(0).values >= 1e-2
    assert V.shape == (32, int(keep.sum())) and W.shape == (30, int(keep.sum()))
    assert torch.allclose(V, model.V.detach()[:, keep])
    assert torch.allclose(W.sum(1), torch.ones(30), atol=1e-5)


def regularized_loop(V, W_logits, X, V_sft, alpha, num_iterations, lr):
    """The published LoRe_regularized fit, user by user: each iteration an Adam step on W (V frozen) and one on V,
    both on the mean -log sigmoid over all pairs pooled, V's with alpha_t * mean_j (1 - cos(V_j, V_sft)).
    -> (W logits, V, V-step losses)."""
    V, W_logits = V.clone().requires_grad_(), W_logits.clone().requires_grad_()
    opt_W, opt_V = torch.optim.Adam([W_logits], lr=lr), torch.optim.Adam([V], lr=lr)

    def pooled_nll(V, W):
        return torch.cat([F.softplus(-(x @ V @ W[i]) / 100) for i, x in enumerate(X)]).mean()
    losses = []
    for t in range(num_iterations):
        opt_W.zero_grad()
        pooled_nll(V.detach(), torch.softmax(W_logits, 1)).backward()
        opt_W.step()
        opt_V.zero_grad()
        alpha_t = alpha * min(max((t / num_iterations - 0.2) / 0.6, 0.0), 1.0)
        cos = (V * V_sft).sum(0) / (V.norm(dim=0) * V_sft.norm())
        loss = pooled_nll(V, torch.softmax(W_logits, 1).detach()) + alpha_t * (1 - cos).mean()
        loss.backward()
        opt_V.step()
        losses.append(loss.item())
    return W_logits.detach(), V.detach(), losses


def test_regularized_train_equals_pooled_loop():
    """LoRe_regularized.train from a fixed start == the hand-written loop (a per-user mean loss would differ)."""
    g = torch.Generator().manual_seed(0)
    X = [torch.randn(m, 8, generator=g) * 20 for m in (2, 5, 30)]  # unequal users: pooled != per-user mean
    V_sft = torch.randn(8, 1, generator=g)
    utils.set_seed(0)
    model = utils.LoRe_regularized(V_sft, 2.0, 3, 8, 3, num_iterations=10, learning_rate=0.05)
    W_logits, V, losses = regularized_loop(model.V.detach(), model.W.detach(), X, V_sft, 2.0, 10, 0.05)
    model.train(X)
    assert model.losses == pytest.approx(losses, rel=1e-5)
    torch.testing.assert_close(model.V.detach(), V, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.W.detach(), W_logits, atol=1e-5, rtol=1e-5)


def test_train_keeps_pytorch_meaning():
    for model in (utils.LoRe(None, 0, 3, 4, 2), utils.LoRe_regularized(torch.ones(4, 1), 1, 3, 4, 2),
                  utils.PersonalizeBatch(3, 4, 2)):
        assert model.eval() is model and model.training is False
        assert model.train() is model and model.training is True
        model.train(False)
        assert model.training is False


def test_evaluation_vectorised_equals_loop_and_ties_are_wrong():
    X = [torch.randn(m, 6) for m in (5, 8, 3)]
    X[2][0] = 0.0  # a tie: counts as wrong
    V, W = torch.randn(6, 2), torch.softmax(torch.randn(3, 2), 1)
    vec = utils.eval_multiple(list(W), V, X, verbose=False)
    loop = [utils.evaluate_model(x, V, w) for x, w in zip(X, W)]
    assert np.allclose(vec, loop)
    assert utils.evaluate_model(torch.zeros(2, 6), V, W[0]) == 0.0


def test_lean_population_equals_seed_document_functions():
    """sample_population_pairs picks the same pairs as simulate_population + sampling."""
    g = torch.Generator().manual_seed(3)
    E, S = torch.randn(50 * 8, 12, generator=g), torch.randn(50, 8, 10, generator=g).double().numpy()
    W = utils.generate_population(0.5 * np.ones(10), 7)
    dense = utils.simulate_population(S, E.reshape(50, 8, 12), W)  # [N, P, F]
    assert dense.shape == (7, 50, 12)
    full = utils.sample_population_pairs(S, E, W, 1.0)
    assert torch.allclose(full.dense(), dense.reshape(-1, 12))
    sparse = utils.create_sparse_tensor(dense, 0.2)
    assert len(sparse) == 7 and all(s.shape == (10, 12) for s in sparse)
    rng = np.random.RandomState(0)
    lean = utils.sample_population_pairs(S, E, W, 0.2, rng)
    rng = np.random.RandomState(0)
    rows = [dense[i][rng.choice(50, 10, replace=False)] for i in range(7)]
    assert torch.allclose(lean.dense(), torch.cat(rows))
    V = torch.randn(12, 3)  # table projection == dense projection
    assert torch.allclose(lean.project(V), lean.dense() @ V, atol=1e-4)


def test_all_finite_by_blocks_finds_every_nan_and_inf():
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.zeros(100, 7, dtype=dtype)
        assert all_finite(t, block_floats=10) and all_finite(t[:0])
        for i, j, bad in ((99, 6, float("nan")), (0, 0, float("inf")), (37, 3, -float("inf"))):
            u = t.clone()
            u[i, j] = bad
            assert not all_finite(u, block_floats=10) and not all_finite(u)
            assert not all_finite(u[:, j]) and not all_finite(u.reshape(10, 10, 7), block_floats=10)
    assert all_finite(torch.tensor(1.0)) and not all_finite(torch.tensor(float("nan")))
    assert all_finite(torch.arange(5))


def test_dense_differences_by_blocks_equal_the_whole_expression():
    """Pairs.dense() builds [M, F] a block of rows at a time, in the table's dtype (bf16 rounded once)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        T = torch.randn(50, 9, generator=g).to(dtype)
        c, r = torch.randint(0, 50, (103,), generator=g), torch.randint(0, 50, (103,), generator=g)
        p = utils.Pairs(torch.arange(103) % 4, 4, table=T, chosen=c, rejected=r)
        whole = (T[c].float() - T[r].float()).to(dtype)
        assert p.dense(block_rows=10).dtype == dtype and torch.equal(p.dense(block_rows=10), whole)
        assert torch.equal(p.dense(), whole)


def test_pairs_select_users_and_list_roundtrip():
    X = [torch.full((m, 2), float(i)) for i, m in enumerate((2, 3, 1))]
    pairs = utils.Pairs.from_list(X)
    assert [len(x) for x in pairs.to_list()] == [2, 3, 1]
    sub = pairs.select_users([2, 0])
    assert len(sub) == 2 and torch.equal(sub[0], X[2]) and torch.equal(sub[1], X[0])
    with pytest.raises(IndexError):
        pairs[3]


def test_sample_shots_and_errors():
    X = [torch.randn(m, 4) for m in (5, 9)]
    shots = utils.sample_shots(X, 3)
    assert [s.shape for s in shots] == [(3, 4), (3, 4)]
    for s, x in zip(shots, X):  # rows come from the user's own pairs, without repetition
        assert all(any(torch.equal(r, y) for y in x) for r in s) and len(torch.unique(s, dim=0)) == 3
    with pytest.raises(ValueError, match="fewer than shots=6"):
        utils.sample_shots(X, 6)


def test_model_input_errors():
    with pytest.raises(ValueError, match="features"):
        utils.LoRe(None, 0, 1, 5, 2).train([torch.randn(3, 4)])
    with pytest.raises(ValueError, match="num_classes"):
        utils.LoRe(None, 0, 2, 4, 2).train([torch.randn(3, 4)])
    with pytest.raises(ValueError, match="NaN"):
        utils.LoRe(None, 0, 1, 4, 2).train([torch.full((3, 4), float("nan"))])


def test_run_same_seed_same_numbers_and_protocol():
    train, test, _, _ = planted(num_users=20, pairs_per_user=15, num_test=30, seed=4)
    train_u, test_u, _, _ = planted(num_users=8, pairs_per_user=5, num_test=30, seed=5)
    head = torch.randn(32, 1)
    kw = dict(num_iterations=150, fewshot_iterations=100)
    a = utils.run([0, 1, 3], [0], head, train, test, train_u, test_u, 20, 8, "cpu", **kw)
    b = utils.run([0, 1, 3], [0], head, train, test, train_u, test_u, 20, 8, "cpu", **kw)
    assert len(a) == 8 and all(x.shape == (3,) for x in a)  # published: flat, alpha-major
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    # K = 0 is the reference head with w = [1] for everyone
    ref = utils.eval_multiple([torch.ones(1)] * 8, head, test_u, verbose=False)
    assert a[3][0] == pytest.approx(np.mean(ref)) and a[7][0] == pytest.approx(np.std(ref))
    with pytest.raises(ValueError, match="users"):
        utils.run([0], [0], head, train, test, train_u, test_u, 21, 8, "cpu")


def test_vary_shots_skips_short_users():
    train, _, _, _ = planted(num_users=10, pairs_per_user=10, num_test=5, seed=6)
    pool = [torch.randn(m, 32) for m in (3, 6, 6)]
    test_u = [torch.randn(5, 32) for _ in range(3)]
    out = utils.run_few_shot_vary_shots(2, [0], [2], [2, 5], train, pool, test_u, torch.randn(32, 1), 10, 3,
                                        "cpu", num_iterations=50, fewshot_iterations=20, return_skipped=True)
    assert out[4] == [0, 1]
    assert out[0].shape == (2,) and np.isfinite(out[2]).all()
    # with groups (e.g. dialogs) as the unit: user 0 has 1 group, users 1 and 2 have 3
    groups = [0, 0, 0] + [1, 1, 2, 2, 3, 3] * 2
    out = utils.run_few_shot_vary_shots(1, [0], [2], [1, 2], train, pool, test_u, torch.randn(32, 1), 10, 3,
                                        "cpu", shot_groups=groups, num_iterations=50, fewshot_iterations=20,
                                        return_skipped=True)
    assert out[4] == [0, 1]


def test_vary_shots_stacked_trials_equal_separate_fits():
    """All trials fit in one batch, in the projected space == each trial fit on its own."""
    train, _, _, _ = planted(num_users=12, pairs_per_user=10, num_test=5, seed=7)
    pool, test_u, _, _ = planted(num_users=4, pairs_per_user=6, num_test=20, seed=8)
    kw = dict(num_iterations=60, fewshot_iterations=50, seed=3)
    out = utils.run_few_shot_vary_shots(3, [0], [2], [4], train, pool, test_u, torch.randn(32, 1), 12, 4, "cpu", **kw)
    utils.set_seed(3)
    _, V = utils.LoRe(None, 0, 12, 32, 2, 60, 0.5).train(train)
    fs, ts = [], []
    for trial in range(3):
        rng = np.random.RandomState(3 * 100003 + trial)
        shots = [x[torch.as_tensor(rng.choice(6, 4, replace=False))] for x in pool]
        W = utils.learn_multiple_few_shot(shots, V, 50, 0.1)
        fs.append(np.mean(utils.eval_multiple(W, V, shots, verbose=False)))
        ts.append(np.mean(utils.eval_multiple(W, V, test_u, verbose=False)))
    assert out[0][0] == pytest.approx(np.mean(fs)) and out[1][0] == pytest.approx(np.std(fs))
    assert out[2][0] == pytest.approx(np.mean(ts)) and out[3][0] == pytest.approx(np.std(ts))


def test_configure_in_a_notebook_floats_and_none_defaults(monkeypatch):
    import sys
    import types
    fake_ipython = types.ModuleType("IPython")
    fake_ipython.get_ipython = lambda: object()  # a running kernel
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel.json"])
    cfg = {"alpha": 0.0, "stop_after_shards": None, "out_dir": None, "max_fewshot_pairs": 100}
    assert utils.configure(cfg) == cfg  # the kernel's own argv is ignored
    utils.configure(cfg, ["alpha=0.5", "stop_after_shards=3", "out_dir=2024", "max_fewshot_pairs=None"])
    assert cfg == {"alpha": 0.5, "stop_after_shards": 3, "out_dir": "2024", "max_fewshot_pairs": None}
    for bad in ["stop_after_shards=x", "stop_after_shards=1.5", "max_fewshot_pairs=x"]:
        with pytest.raises(utils.InputError, match="must be of type int"):
            utils.configure(cfg, [bad])
    cfg = {"_types": {"thing": float}, "thing": None}
    utils.configure(cfg, ["thing=2"])
    assert cfg["thing"] == 2.0
    with pytest.raises(utils.InputError, match="float"):
        utils.configure(cfg | {"thing": None}, ["thing=abc"])


def test_configure_overrides_and_type_checks():
    cfg = {"K_list": [0, 1], "lr": 0.5, "n": 3, "name": "a", "flag": False, "path": None}
    utils.configure(cfg, ["K_list=[2,3]", "lr=1", "name=hello", "flag=True", "path=/tmp/x"])
    assert cfg == {"K_list": [2, 3], "lr": 1.0, "n": 3, "name": "hello", "flag": True, "path": "/tmp/x"}
    utils.configure(cfg, ["--n", "7", "--name=b c"])  # flags, as in the published READMEs
    assert cfg["n"] == 7 and cfg["name"] == "b c"
    for bad in (["n=1.5"], ["flag=1"], ["nope=1"], ["K_list"], ["--n"]):
        with pytest.raises(utils.InputError):
            utils.configure(dict(cfg), bad)


def test_save_json_is_valid_with_nan(tmp_path):
    import json
    save_json(tmp_path / "r.json", {"a": np.array([1.0, np.nan]), "b": np.float32(2)})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1.0, None], "b": 2.0}


def test_outputs_get_the_usual_permissions(tmp_path):
    import os
    umask = os.umask(0)
    os.umask(umask)
    save_tensors(tmp_path / "a.safetensors", {"a": torch.ones(2)})
    save_json(tmp_path / "a.json", {"a": 1})
    for name in ("a.safetensors", "a.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.safetensors"]  # no temp files left


def test_load_tensors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="python prepare.py"):
        load_tensors(tmp_path / "missing.safetensors", make_cmd="python prepare.py")
    save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="lacks"):
        load_tensors(tmp_path / "x.safetensors", ["b"])
    save_tensors(tmp_path / "n.safetensors", {"a": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="NaN"):
        load_tensors(tmp_path / "n.safetensors")


def test_numba_cache_survives_another_module_name(tmp_path):
    """lorelib/kernels.py loaded under another module name, then imported normally, in one process; then normally
    again: no crash, only the canonical import (`lorelib.kernels`) writes the numba cache, and the next run loads it
    without writing (a second process does not compile again)."""
    import os
    import subprocess
    import sys
    pytest.importorskip("numba")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fit = ("X, V = torch.randn(9, 8), torch.randn(8, 2, requires_grad=True); "
           "m.bt_loss(X, V, torch.rand(9, 2), torch.ones(9), 100.0).backward(); print(m.__name__, 'ok'); ")
    count = f"print('cache files', len(list(pathlib.Path({str(tmp_path)!r}).rglob('*.nb*')))); "
    other = ("import importlib.util, pathlib, torch; spec = importlib.util.spec_from_file_location('lore_kernels', "
             f"{os.path.join(root, 'lorelib', 'kernels.py')!r}); o = importlib.util.module_from_spec(spec); "
             "spec.loader.exec_module(o); m = o; " + fit + count)
    plain = f"import sys; sys.path.insert(0, {root!r}); import torch, lorelib.kernels; m = lorelib.kernels; " + fit
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # `lorelib` importable only where asked
    env["NUMBA_CACHE_DIR"] = str(tmp_path)
    stamps, logs = [], []
    for code in [other + plain, plain]:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.count(" ok") == code.count("ok")
        stamps.append({p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tmp_path.rglob("*.nb*")})
        logs.append(proc.stdout)
    assert "cache files 0" in logs[0]  # the run under another name wrote nothing
    assert stamps[0] and stamps[1] == stamps[0]  # the canonical one did; the next run only read it


def test_rank_is_chosen_on_held_out_training_pairs():
    """holdout_pairs splits each user's training pairs (at least one held out where it has two, one always kept);
    select_rank fits every K >= 2 on the rest and picks the best held-out accuracy: on planted rank-3 users it
    does not pick K = 2, which cannot represent them."""
    train, _, _, _ = planted(num_users=40, pairs_per_user=30)
    pairs = utils.Pairs.from_list(train[:-1] + [train[-1][:1]])  # the last user has a single pair
    fit, held = holdout_pairs(pairs, 0.2, seed=0)
    assert held.counts().tolist() == [6] * 39 + [0] and fit.counts().tolist() == [24] * 39 + [1]
    both = torch.cat([fit.dense(), held.dense()])
    assert len(both) == len(pairs.dense()) and len(torch.unique(both, dim=0)) == len(both)  # a partition
    assert torch.equal(holdout_pairs(pairs, 0.2, seed=0)[1].dense(), held.dense())  # seeded
    sel = utils.select_rank([0, 1, 2, 3], [0.0], torch.randn(32, 1), pairs, "cpu", validation_fraction=0.2,
                            num_iterations=300)
    assert set(sel["validation"]) == {"alpha=0 K=2", "alpha=0 K=3"}  # K = 0 and 1 are other methods
    assert sel["K"] == 3 and sel["validation"]["alpha=0 K=3"] > sel["validation"]["alpha=0 K=2"] + 0.03
    assert utils.select_rank([0, 1, 3], [0.0], None, pairs) is None  # one candidate: nothing to choose
    assert utils.select_rank([2, 3], [0.0], None, pairs, validation_fraction=0.0) is None



@pytest.mark.parametrize("kernel", [True, False])
def test_a_fit_on_bf16_pairs_recovers_the_float32_accuracy(kernel, monkeypatch):
    """Planted rank-3 users: LoRe on the same pairs held in bf16 (differences rounded once, products accumulated in
    float32) reaches the float32 fit's test accuracy within 0.01 (and the same per-user accuracies to 0.05)."""
    if kernel and numba is None:
        pytest.skip("numba not installed")
    if not kernel:
        monkeypatch.setattr(kernels, "numba", None)
    train, test, _, _ = planted()
    pairs = utils.Pairs.from_list(train)
    accs = {}
    for dtype in (torch.float32, torch.bfloat16):
        utils.set_seed(0)
        W, V = utils.LoRe(None, 0, len(train), 32, 3, 300, 0.5).train(pairs.to_dtype(dtype), device="cpu")
        accs[dtype] = user_accuracies(utils.Pairs.from_list(test).to_dtype(dtype), V, W)
    assert accs[torch.float32].mean() > 0.85
    assert abs(accs[torch.bfloat16].mean() - accs[torch.float32].mean()) < 0.01


@pytest.mark.skipif(numba is None, reason="numba not installed")
def test_bf16_kernel_equals_the_float32_kernel_on_the_rounded_values():
    """The bf16 kernel (uint16 bits widened in registers, 4-row groups, 3-column blocks, 512-column tiles) == the
    float32 kernel on X.bfloat16().float(), to float32 rounding: each sum of n products within
    4 eps sqrt(n) sum|terms|. Odd sizes cover partial groups and tiles and K not a multiple of 3. Against X moved
    by less than one bf16 step the same check fails: it can tell a wrong widening."""
    g = torch.Generator().manual_seed(0)
    eps = float(np.finfo(np.float32).eps)
    for M, F_dim, K in [(1003, 300, 3), (57, 1030, 5), (6, 16, 1), (9, 70, 7)]:
        X = (3 * torch.randn(M, F_dim, generator=g)).bfloat16()
        Vt = torch.randn(K, F_dim, generator=g)
        Wu = torch.softmax(torch.randn(M, K, generator=g), 1)
        pw = torch.rand(M, generator=g)
        args = (Vt.numpy(), Wu.numpy(), pw.numpy(), utils.LOGIT_SCALE)
        loss, dVt, XV, gr = kernels.bt_loss_kernel_bf16(X.view(torch.int16).numpy().view(np.uint16), *args)
        Xr = X.float()
        ref = kernels.bt_loss_kernel(Xr.numpy(), *args)
        tol_XV = 4 * eps * np.sqrt(F_dim) * (Xr.abs() @ Vt.abs().T).numpy()
        tol_dV = 4 * eps * np.sqrt(M) * ((ref[3][:, None] * Wu.numpy()).T.__abs__() @ Xr.abs().numpy())
        assert (np.abs(XV - ref[2]) <= tol_XV + 1e-30).all() and (np.abs(dVt - ref[1]) <= tol_dV + 1e-30).all()
        assert loss == pytest.approx(ref[0], rel=1e-5) and np.allclose(gr, ref[3], rtol=1e-4, atol=1e-9)
        moved = kernels.bt_loss_kernel((Xr + 0.01 * torch.randn(M, F_dim, generator=g)).numpy(), *args)
        assert not (np.abs(XV - moved[2]) <= tol_XV).all()
