"""PersonalLLM/: prepare.py end to end on a tiny dataset and model, train_basis.py and
vary_fewshot.py on prepared and synthetic data, and their input errors."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

import utils
from conftest import FAST_BASELINES, run_script
from lorelib.extract import load_reward_model
from lorelib.files import PUBLISHED_REFERENCE, load_tensors, read_published_reference, save_tensors
from PersonalLLM import personalllm

MODELS = ["gemma_2b", "gemma_7b", "mistral_raft", "llama3_sfairx", "oasst_deberta_v3",
          "beaver_7b", "oasst_pythia_7b", "oasst_pythia_1b", "mistral_ray", "mistral_weqweasdas"]


def personalllm_frame(num_prompts, seed):
    """A DataFrame in the PersonalLLM schema: prompt, response_1..8, response_{i}_{model} scores."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(num_prompts):
        row = {"prompt": f"prompt {p}: " + " ".join(rng.choice(["why", "how", "sky", "tea", "ünï"], 4))}
        for i in range(1, 9):
            row[f"response_{i}"] = f"answer {i} to {p} " + "x" * int(rng.integers(1, 30))
            for m in MODELS:
                row[f"response_{i}_{m}"] = float(rng.normal())
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_reward_model):
    """A tiny PersonalLLM copy as parquet files (one score None) embedded by prepare.py."""
    root = tmp_path_factory.mktemp("personalllm")
    train, test = personalllm_frame(40, 0), personalllm_frame(12, 1)
    train.loc[3, "response_5_beaver_7b"] = None
    train.to_parquet(root / "train.parquet")
    test.to_parquet(root / "test.parquet")
    proc = run_script("PersonalLLM/prepare.py", f"model_name={tiny_reward_model}", f"dataset_path={root}",
                      f"data_dir={root / 'data'}", "shard_size=64")
    return root, train, test, proc


def test_prepare_writes_both_splits_prompt_major_with_true_head(prepared, tiny_reward_model):
    root, train, test, _ = prepared
    t = load_tensors(root / "data" / "train.safetensors", allow_nan=("scores",))
    assert t["embeddings"].shape == (40 * 8, 64) and t["scores"].shape == (40, 8, 10)
    assert t["head"].shape == (64, 1) and torch.equal(t["prompt_index"], torch.arange(40))
    assert torch.isnan(t["scores"][3, 4, MODELS.index("beaver_7b")])
    assert t["scores"][2, 6, 1].item() == pytest.approx(train.loc[2, "response_7_gemma_7b"])
    assert load_tensors(root / "data" / "test.safetensors")["embeddings"].shape == (12 * 8, 64)
    # row 8 p + i is response i + 1 of prompt p, and embedding @ head is the model's own reward
    tokenizer, model = load_reward_model(tiny_reward_model)
    p, i = 5, 2
    conv = [{"role": "user", "content": train.loc[p, "prompt"]},
            {"role": "assistant", "content": train.loc[p, f"response_{i + 1}"]}]
    ids = tokenizer.apply_chat_template(conv, tokenize=False)
    with torch.no_grad():
        logit = model(**tokenizer(ids, add_special_tokens=False, return_tensors="pt")).logits[0, 0]
    assert (t["embeddings"][8 * p + i] @ t["head"]).item() == pytest.approx(logit.item(), abs=1e-4)


def test_prepare_is_not_recomputed_when_up_to_date(prepared, tiny_reward_model):
    root, *_ = prepared
    before = (root / "data" / "train.safetensors").read_bytes()
    proc = run_script("PersonalLLM/prepare.py", f"model_name={tiny_reward_model}", f"dataset_path={root}",
                      f"data_dir={root / 'data'}", "split=train")
    assert "up to date" in proc.stdout
    assert (root / "data" / "train.safetensors").read_bytes() == before


def test_train_basis_on_prepared_data_skips_nan_prompts(prepared, tmp_path, tiny_reward_model):
    root, *_ = prepared
    proc = run_script("PersonalLLM/train_basis.py", f"data_dir={root / 'data'}", f"out_dir={tmp_path}",
                      "N=6", "N_unseen=4", "train_density=0.5", "fewshot_density=0.25", "K_list=[0,1,2]",
                      "num_iterations=20", "fewshot_iterations=10")
    assert "skipping 1 of 40 prompts with a missing (None/NaN) score" in proc.stdout
    res = json.loads((tmp_path / "train_basis.json").read_text())
    assert [r["K"] for r in res["results"]] == [0, 1, 2]
    # the baselines run on prepared files too, at their released settings: no tuned settings are stored for these
    # files (those stored for the synthetic data are never used here), and the run says so in one line
    assert set(res["baselines"]) == {"per_user_bt", "vpl", "pal", "mrm"}
    assert "no tuned settings stored for this data (PersonalLLM prepared " in proc.stdout
    assert (tmp_path / "train_basis.png").stat().st_size > 1000
    # the learned models, in the common format: simulated users numbered 0..5 (seen), 6..9 (unseen)
    m = utils.load_lore_model(tmp_path / "models" / "K2_alpha0.safetensors")
    assert m["V"].shape == (64, 2) and m["W"].shape == (6, 2) and m["W_unseen"].shape == (4, 2)
    assert m["users"] == list(range(6)) and m["unseen_users"] == list(range(6, 10))
    assert (m["model_name"], m["dataset"], m["n_features"], m["logit_scale"]) == (tiny_reward_model, "PersonalLLM",
                                                                                  64, 100.0)
    assert (m["K"], m["alpha"], m["fewshot_iterations"], m["fewshot_learning_rate"], m["fewshot_pairs"]) == (
        2, 0, 10, 0.1, int(0.25 * 39))
    assert (m["max_length"], m["truncation_side"]) == (4096, "left")
    head = load_tensors(root / "data" / "train.safetensors", allow_nan=("scores",))["head"]
    assert torch.equal(utils.load_lore_model(tmp_path / "models" / "K0_alpha0.safetensors")["V"], head)
    assert res["models"]["K=2 alpha=0"] == str(tmp_path / "models" / "K2_alpha0.safetensors")
    # reference=published: K = 0 is the published scripts' direction, stored by prepare.py
    t = load_tensors(root / "data" / "train.safetensors", allow_nan=("scores",))
    assert torch.equal(t[PUBLISHED_REFERENCE], read_published_reference(tiny_reward_model))
    run_script("PersonalLLM/train_basis.py", f"data_dir={root / 'data'}", f"out_dir={tmp_path / 'pub'}", "N=6",
               "N_unseen=4", "train_density=0.5", "fewshot_density=0.25", "K_list=[0]", "baselines=[]",
               "reference=published")
    V = utils.load_lore_model(tmp_path / "pub" / "models" / "K0_alpha0.safetensors")["V"]
    assert torch.equal(V, t[PUBLISHED_REFERENCE])


def test_missing_column_is_a_clear_error(tmp_path, tiny_reward_model):
    personalllm_frame(3, 0).drop(columns=["response_3"]).to_parquet(tmp_path / "train.parquet")
    proc = run_script("PersonalLLM/prepare.py", f"model_name={tiny_reward_model}", f"dataset_path={tmp_path}",
                      f"data_dir={tmp_path / 'data'}", "split=train", check=False)
    assert proc.returncode != 0 and "missing column(s) ['response_3']" in proc.stderr
    assert not (tmp_path / "data" / "train.safetensors").exists()


def test_missing_or_inconsistent_embeddings_are_clear_errors(tmp_path):
    proc = run_script("PersonalLLM/train_basis.py", f"data_dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "train.safetensors not found" in proc.stderr and "prepare.py" in proc.stderr
    save_tensors(tmp_path / "train.safetensors", {"embeddings": torch.randn(30, 4),
                                                        "scores": torch.randn(4, 8, 10), "head": torch.randn(4, 1)})
    save_tensors(tmp_path / "test.safetensors", {"embeddings": torch.randn(32, 4),
                                                       "scores": torch.randn(4, 8, 10), "head": torch.randn(4, 1)})
    proc = run_script("PersonalLLM/train_basis.py", f"data_dir={tmp_path}", "train_density=0.5", "fewshot_density=0.5",
                      check=False)
    assert proc.returncode != 0 and "30 embeddings do not match scores of shape (4, 8, 10)" in proc.stderr


SMALL = ["synthetic=True", "synthetic_features=48", "synthetic_prompts=[3000,300]", "N=150", "N_unseen=80",
         "num_iterations=300", "fewshot_iterations=300"]


def test_synthetic_train_basis_shows_paper_ordering_and_is_reproducible(tmp_path):
    """ref < BT < LoRe, the same numbers with and without the baselines, and all six methods in one table and
    JSON, where every baseline beats the reward model's own head on unseen users."""
    proc = run_script("PersonalLLM/train_basis.py", *SMALL, "K_list=[0,1,3]", *FAST_BASELINES,
                      f"out_dir={tmp_path / 'a'}")
    run_script("PersonalLLM/train_basis.py", *SMALL, "K_list=[0,1,3]", "baselines=[]", "choice_quality=False",
               f"out_dir={tmp_path / 'b'}")
    a = json.loads((tmp_path / "a" / "train_basis_synthetic.json").read_text())
    b = json.loads((tmp_path / "b" / "train_basis_synthetic.json").read_text())
    assert a["results"] == b["results"] and "baselines" not in b and "choice" not in b  # choice changes no fit
    # choice quality beside it: ref > BT > LoRe in regret, each reference wins half against itself
    choice = a["choice"]
    assert [r["K"] for r in choice["results"]] == [0, 1, 3] and set(choice["baselines"]) == set(a["baselines"])
    regret = [r["unseen"]["regret"]["mean"] for r in choice["results"]]
    assert regret[0] > regret[1] > regret[2] and choice["results"][0]["seen"]["win_vs_ref"]["mean"] == 0.5
    assert choice["results"][1]["unseen"]["win_vs_BT"]["mean"] == 0.5 and "choice quality" in proc.stdout
    assert (tmp_path / "a" / "train_basis_synthetic_choice.png").exists()
    unseen = [r["unseen_test"]["mean"] for r in a["results"]]
    assert unseen[0] < unseen[1] - 0.02 and unseen[1] < unseen[2] - 0.05, unseen  # ref < BT < LoRe
    baselines = {m: r["unseen_test"]["mean"] for m, r in a["baselines"].items()}
    assert set(baselines) == {"per_user_bt", "vpl", "pal", "mrm"}
    assert all(u > unseen[0] + 0.03 for u in baselines.values()), (unseen, baselines)
    assert all(name in proc.stdout for name in ("ref", "BT", "LoRe", "per-user BT", "VPL", "PAL"))
    assert (tmp_path / "a" / "train_basis_synthetic.png").exists()


def test_synthetic_vary_fewshot_writes_outputs(tmp_path):
    proc = run_script("PersonalLLM/vary_fewshot.py", *SMALL, "K=3", "num_shots=[1,5,9,20]", "trials=2",
                      "baselines=['per_user_bt']", f"out_dir={tmp_path}")
    assert "skipping 80 of 80 unseen users with fewer than 20 pairs" in proc.stdout  # pool is 15 pairs
    res = json.loads((tmp_path / "vary_fewshot_synthetic.json").read_text())
    acc = [r["unseen_test"]["mean"] for r in res["results"]]
    assert [r["shots"] for r in res["results"]] == [1, 5, 9, 20] and acc[3] is None
    assert acc[0] < acc[2]  # more shots help
    bt = [r["unseen_test"]["mean"] for r in res["baselines"]["per_user_bt"]["results"]]  # on the same shots
    assert bt[0] < bt[2] and bt[3] is None and "per-user BT unseen test" in proc.stdout
    assert (tmp_path / "vary_fewshot_synthetic.png").exists()


def test_synthetic_data_made_by_blocks_equal_one_draw():
    """make_synthetic draws the embeddings 64 prompts at a time (no [P * R, F] float32 temporary): the same numbers
    and scores as one draw of the whole tensor; in bf16, those numbers rounded once."""
    tr, te, head = personalllm.make_synthetic(200, 30, 16, seed=0)
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(16, 4, generator=g))
    H = U @ torch.randn(4, 10, generator=g)
    H = H / H.norm(dim=0, keepdim=True)
    torch.randn(16, 1, generator=g)  # the head's noise
    prompt = torch.randn(200, 1, 16, generator=g)
    E = (prompt + torch.randn(200, 8, 16, generator=g)).reshape(1600, 16)
    S = (E @ H).reshape(200, 8, 10)
    S = S + 0.05 * S.std() * torch.randn(S.shape, generator=g)
    assert torch.equal(tr["embeddings"], E) and torch.equal(tr["scores"], S)
    tr16, te16, _ = personalllm.make_synthetic(200, 30, 16, seed=0, dtype=torch.bfloat16)
    assert torch.equal(tr16["embeddings"], E.bfloat16()) and torch.equal(tr16["scores"], S)
    assert torch.equal(te16["embeddings"], te["embeddings"].bfloat16())


def test_load_draws_the_protocol_population():
    """personalllm.load == the seed functions by hand: Dirichlet users, int(density * P) pairs each, best vs
    worst response on every test prompt; the pool density replaces the few-shot density."""
    kw = dict(synthetic=True, synthetic_prompts=(200, 30), synthetic_features=16, N=7, N_unseen=5,
              train_density=0.05, fewshot_density=0.02, dirichlet_alpha=0.3)
    utils.set_seed(1)
    data = personalllm.load(**kw)
    assert (data.N, data.N_unseen, data.info["N"]) == (7, 5, 7) and data.head.shape == (16, 1)
    assert data.seen_train.counts().tolist() == [10] * 7 and data.unseen_fewshot.counts().tolist() == [4] * 5
    assert data.seen_test.counts().tolist() == [30] * 7 and data.unseen_test.counts().tolist() == [30] * 5
    tr, te, head = personalllm.make_synthetic(200, 30, 16, seed=0)
    utils.set_seed(1)
    W = utils.generate_population(0.3 * np.ones(10), 7)
    expected = utils.sample_population_pairs(tr["scores"].double().numpy(), tr["embeddings"], W, 0.05)
    assert torch.equal(data.seen_train.dense(), expected.dense()) and torch.equal(data.head, head)
    test = utils.simulate_population(te["scores"].double().numpy(), te["embeddings"].reshape(30, 8, 16), W)
    assert torch.equal(data.seen_test.dense(), test.reshape(-1, 16))
    utils.set_seed(1)
    pooled = personalllm.load(**kw, fewshot_pool_density=0.1)
    assert pooled.unseen_fewshot.counts().tolist() == [20] * 5 and pooled.info["fewshot_density"] == 0.1
    assert torch.equal(pooled.seen_train.dense(), data.seen_train.dense())
    utils.set_seed(1)  # synthetic data made in bf16 == the float32 data rounded once: the same users, pairs, scores
    bf16 = personalllm.load(**kw, pairs_dtype="bfloat16")
    assert bf16.seen_train.table.dtype == torch.bfloat16 and bf16.info["pairs_dtype"] == "bfloat16"
    assert torch.equal(bf16.seen_train.table, data.seen_train.table.bfloat16())
    assert torch.equal(bf16.unseen_test.chosen, data.unseen_test.chosen)



def test_bf16_prepared_files_load_with_their_dtype(prepared, tiny_reward_model, tmp_path, capsys):
    """prepare.py embedding_dtype=bfloat16 writes bf16 embeddings (the float32 ones rounded once); load keeps them
    in bf16 (pairs_dtype=auto) and says so, or converts them; the NaN and shape checks work on bf16 files."""
    root, *_ = prepared
    run_script("PersonalLLM/prepare.py", f"model_name={tiny_reward_model}", f"dataset_path={root}",
               f"data_dir={tmp_path}", "shard_size=64", "embedding_dtype=bfloat16")
    f32 = load_tensors(root / "data" / "train.safetensors", allow_nan=("scores",))
    bf16 = load_tensors(tmp_path / "train.safetensors", allow_nan=("scores",))
    assert bf16["embeddings"].dtype == torch.bfloat16 and bf16["head"].dtype == torch.float32
    assert torch.equal(bf16["embeddings"], f32["embeddings"].bfloat16())
    assert (tmp_path / "train.safetensors").stat().st_size < 0.6 * (root / "data" / "train.safetensors").stat().st_size
    utils.set_seed(0)
    data = personalllm.load(data_dir=tmp_path, N=6, N_unseen=4, train_density=0.5, fewshot_density=0.25)
    assert "F = 64, bfloat16" in capsys.readouterr().out and data.info["pairs_dtype"] == "bfloat16"
    assert data.seen_train.table.dtype == torch.bfloat16
    utils.set_seed(0)
    as_f32 = personalllm.load(data_dir=tmp_path, N=6, N_unseen=4, train_density=0.5, fewshot_density=0.25,
                              pairs_dtype="float32")
    assert as_f32.seen_train.table.dtype == torch.float32 and torch.equal(as_f32.seen_train.user, data.seen_train.user)
    bad = dict(bf16)
    bad["embeddings"] = bad["embeddings"].clone()
    bad["embeddings"][5, 3] = float("nan")
    save_tensors(tmp_path / "nan" / "train.safetensors", bad)
    with pytest.raises(utils.InputError, match="NaN"):
        personalllm.read_split(tmp_path / "nan" / "train.safetensors", "python prepare.py")
