"""Bad input: one `error:` line (exit status 2) before any work; finished results are never lost; Ctrl-C stops
cleanly; concurrent writers never leave a half-written file."""
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import utils
from conftest import REPO_ROOT, run_script
from lorelib.files import save_json, save_tensors
from PersonalLLM import personalllm
from PRISM import prism
from RedditTLDR import tldr

# PersonalLLM/train_basis.py on tiny synthetic data (about a second of fitting)
TINY = ["synthetic=True", "synthetic_prompts=[500,100]", "synthetic_features=16", "fewshot_density=0.01", "N=50",
        "N_unseen=20", "K_list=[0,2]", "num_iterations=30", "fewshot_iterations=20", "baselines=[]"]


def assert_one_line_error(proc, *names):
    """Exit status 2, one `error:` line naming every string of `names`, no traceback, nothing trained."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(errors) == 1 and all(name in errors[0] for name in names), proc.stderr
    assert "Traceback" not in proc.stderr
    assert "alpha=" not in proc.stdout and "accuracy" not in proc.stdout  # no fit, no table


def run_inline(script, *overrides):
    """Run a script in this process (runpy, imports already loaded: fast) until it stops
    -> subprocess.CompletedProcess-like (returncode, stdout, stderr). A ValueError / FileNotFoundError that
    ends it is turned into the one line the script's excepthook prints (that hook is tested in subprocesses)."""
    import contextlib
    import io
    import runpy
    out, err, code = io.StringIO(), io.StringIO(), 0
    hook, argv = sys.excepthook, sys.argv
    sys.argv = [script, *map(str, overrides)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(os.path.join(REPO_ROOT, script), run_name="__main__")
            except SystemExit as e:
                code = e.code
            except utils.InputError as e:
                print(f"error: {e}", file=sys.stderr)
                code = 2
    finally:
        sys.excepthook, sys.argv = hook, argv
    return subprocess.CompletedProcess(script, code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("override, names", [
    ("K_list=[-1]", ["K_list=[-1]", "integer >= 0"]),
    ("train_density=2.0", ["train_density=2.0", "(0, 1]"]),
    ("N=0", ["N=0", ">= 1"]),
    ("fewshot_density=0.001", ["fewshot_density=0.001", "int(0.001 x 500 train prompts) = 0"]),
    ("out_dir=/etc/passwd/x", ["out_dir=/etc/passwd/x", "writable"]),
    ("num_iterations=-5", ["num_iterations=-5", ">= 1"]),
    ("synthetic_prompts=[500]", ["synthetic_prompts=[500]", "[train prompts, test prompts]"]),
    ("baselines=['vlp']", ["'vlp'", "per_user_bt"]),
    ("baseline_settings={'vpl':{'learning_rate':0.0}}", ["baseline_settings['vpl']", "learning_rate=0.0", "> 0"]),
    ("baseline_settings={'pal':{'variant':'C'}}", ["baseline_settings['pal']", "variant='C'", "A, B"]),
    ("baseline_settings={'pal':{'dimm':8}}", ["baseline_settings['pal']", "'dimm'", "no PAL setting"]),
])
def test_bad_settings_fail_before_any_work(override, names, tmp_path):
    out = [] if override.startswith("out_dir") else [f"out_dir={tmp_path / 'out'}"]
    assert_one_line_error(run_inline("PersonalLLM/train_basis.py", *TINY, *out, override), *names)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []  # the write test leaves nothing


@pytest.mark.parametrize("override, names", [
    ("N=0", ["N=0", ">= 1"]),
    ("N=many", ["N='many'", "must be of type int"]),  # configure's own type check
    ("fewshot_density=0.001", ["fewshot_density=0.001", "int(0.001 x 500 train prompts) = 0"]),
])
def test_bad_settings_exit_status_in_a_real_process(override, names, tmp_path):
    proc = run_script("PersonalLLM/train_basis.py", *TINY, f"out_dir={tmp_path}", override, check=False)
    assert_one_line_error(proc, *names)


@pytest.mark.parametrize("planted, code, shown", [
    ("ValueError('planted bug')", 1, "ValueError: planted bug"),  # a bug: its full traceback, exit status 1
    ("utils.InputError('planted input')", 2, "error: planted input"),  # bad input: one line, exit status 2
])
def test_a_bug_keeps_its_traceback_and_bad_input_is_one_line(planted, code, shown, tmp_path):
    """An exception planted inside a library function (LoRe.train), in a real process: only InputError is
    turned into the one-line `error:` form; anything else is a bug and ends the script with its traceback."""
    script = os.path.join(REPO_ROOT, "PersonalLLM/train_basis.py")
    program = (f"import runpy, sys; sys.path.insert(0, {REPO_ROOT!r}); import utils\n"
               f"def planted(self, *args, **kwargs):\n    raise {planted}\n"
               "utils.LoRe.train = planted\n"
               f"sys.argv = {[script, *TINY, f'out_dir={tmp_path}']!r}\n"
               f"runpy.run_path({script!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert shown in proc.stderr
    if code == 1:
        assert "Traceback (most recent call last)" in proc.stderr and "in planted" in proc.stderr
        assert "error: " not in proc.stderr
    else:
        assert "Traceback" not in proc.stderr
        assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == ["error: planted input"]


def test_corrupted_prepared_file_is_named_with_the_command_that_remakes_it(tmp_path):
    (tmp_path / "train.safetensors").write_bytes(os.urandom(3000))
    proc = run_script("PersonalLLM/train_basis.py", f"data_dir={tmp_path}", f"out_dir={tmp_path / 'out'}",
                      check=False)
    assert_one_line_error(proc, str(tmp_path / "train.safetensors"), "corrupted",
                          f"PersonalLLM/prepare.py data_dir={tmp_path}")


@pytest.mark.parametrize("script, override, names", [
    ("RedditTLDR/train_basis.py", "protocol=papr", ["protocol='papr'", "published, paper"]),
    ("PRISM/train_basis.py", "alpha_list=[-1.0]", ["alpha_list=[-1.0]", ">= 0"]),
    ("PersonalLLM/prepare.py", "shard_size=0", ["shard_size=0", ">= 1"]),
    ("PRISM/vary_fewshot.py", "shot_selection=greedy", ["shot_selection='greedy'", "random, uncertainty, active"]),
    ("RedditTLDR/vary_fewshot.py", "shot_selection=['active','greedy']", ["'greedy'", "random, uncertainty, active"]),
    ("PersonalLLM/vary_fewshot.py", "shot_selection=['random','longest']", ["'longest'", "single pairs"]),
    ("PRISM/vary_fewshot.py", "seeds=[0,-1]", ["seeds=[0, -1]", "an integer >= 0"]),
    ("RedditTLDR/vary_fewshot.py", "stop_thresholds=[0.1,-1]", ["stop_thresholds", "-1"]),
])
def test_other_scripts_check_their_settings(script, override, names, tmp_path):
    proc = run_inline(script, "synthetic=True" if "prepare" not in script else "model_name=/nonexistent",
                      f"{'data_dir' if 'prepare' in script else 'out_dir'}={tmp_path}", override)
    assert_one_line_error(proc, *names)
    assert "prompts x" not in proc.stdout  # prepare.py did not read the dataset


def test_personalize_checks_the_stopping_threshold_first(tmp_path):
    proc = run_inline("PRISM/personalize.py", "stop_below=0", f"model={tmp_path / 'none.safetensors'}",
                      f"suggest={tmp_path / 'none.jsonl'}", f"out_dir={tmp_path}")
    assert_one_line_error(proc, "stop_below=0", "> 0")


def test_eval_rb2_bad_head_file_is_reported_before_embedding(tmp_path):
    head = tmp_path / "K5_alpha10000.safetensors"
    head.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"V\": {\"dtype\":")  # truncated header
    proc = run_script("PRISM/eval_rb2.py", f"rm_head={head}", "model_name=/nonexistent",
                      f"dataset_path={tmp_path / 'no_rb2'}", f"data_dir={tmp_path}", f"out_dir={tmp_path}",
                      check=False)
    assert_one_line_error(proc, str(head), "PRISM/train_basis.py")
    assert "RewardBench 2:" not in proc.stdout


def test_prepared_file_errors_name_the_file():
    """Truncated, wrong keys, wrong shapes, different F in train and test, NaN: ValueError naming the file and
    the command that remakes it (the scripts print it as one line)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        good = {"embeddings": torch.randn(32, 4), "scores": torch.randn(4, 8, 10), "head": torch.randn(4, 1)}
        cases = {"truncated": None, "lacks tensor": {**good, "scores": None},
                 "wrong shape": {**good, "head": torch.randn(4, 2)}, "same reward model": "F",
                 "NaN": {**good, "embeddings": good["embeddings"] * np.nan}}
        for why, train in cases.items():
            folder = os.path.join(d, why.replace(" ", "_"))
            save_tensors(os.path.join(folder, "test.safetensors"), good)
            if train is None:
                save_tensors(os.path.join(folder, "train.safetensors"), good)
                with open(os.path.join(folder, "train.safetensors"), "r+b") as f:
                    f.truncate(200)
            elif train == "F":
                save_tensors(os.path.join(folder, "train.safetensors"), {
                    "embeddings": torch.randn(32, 5), "scores": torch.randn(4, 8, 10), "head": torch.randn(5, 1)})
            else:
                save_tensors(os.path.join(folder, "train.safetensors"),
                                   {k: v for k, v in train.items() if v is not None})
            with pytest.raises(ValueError) as e:
                personalllm.read_splits(folder)
            message = str(e.value)
            assert why in message and folder in message and f"prepare.py data_dir={folder}" in message, message
            assert "\n" not in message


def test_library_range_errors_name_the_argument_and_value():
    X = [torch.randn(5, 4) for _ in range(3)]
    head = torch.randn(4, 1)
    cases = [
        (lambda: utils.LoRe(None, 0, 3, 4, 0), "num_basis_vectors=0"),
        (lambda: utils.LoRe(None, -1.0, 3, 4, 2), "alpha=-1.0"),
        (lambda: utils.LoRe(None, 0, 3, 4, 2, num_iterations=-5), "num_iterations=-5"),
        (lambda: utils.PersonalizeBatch(3, 4, 2, learning_rate=0), "learning_rate=0"),
        (lambda: utils.sample_shots(X, 0), "shots=0"),
        (lambda: utils.run([-1], [0], head, X, X, X, X, 3, 3, "cpu"), "K_list=[-1]"),
        (lambda: utils.run([0], [0], head, X, X, X, X, 0, 3, "cpu"), "N=0"),
        (lambda: utils.run_few_shot_vary_shots(0, [0], [2], [1], X, X, X, head, 3, 3, "cpu"), "trials=0"),
        (lambda: utils.run_few_shot_vary_shots(1, [0], [2], [0, 2], X, X, X, head, 3, 3, "cpu"), "num_shots=[0, 2]"),
        (lambda: personalllm.load(synthetic=True, synthetic_prompts=(500, 100), synthetic_features=8, N=5,
                                  N_unseen=5), "fewshot_density=0.001: int(0.001 x 500 train prompts) = 0"),
        (lambda: personalllm.load(synthetic=True, synthetic_prompts=(50, 10), synthetic_features=8, N=5,
                                  N_unseen=5, train_density=1.5), "train_density=1.5"),
        (lambda: tldr.load(synthetic=True, synthetic_features=0), "synthetic_features=0"),
        (lambda: prism.load(synthetic=True, synthetic_users=1), "synthetic_users=1"),
    ]
    for call, text in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert text in str(e.value), (text, str(e.value))


def test_fewshot_iterations_zero_says_uniform_weights(capsys):
    X = [torch.randn(5, 4) for _ in range(3)]
    res = utils.run([2], [0], torch.randn(4, 1), X, X, X, X, 3, 3, "cpu", num_iterations=5, fewshot_iterations=0)
    assert "no few-shot fit, unseen users keep uniform weights" in capsys.readouterr().out
    assert np.isfinite(res[3]).all()


def test_unwritable_output_keeps_the_results(tmp_path):
    """A folder in the way of the JSON and PNG: the run still succeeds, prints the numbers in full and writes
    both files to a fallback folder in the system temp dir, whose path it prints."""
    (tmp_path / "train_basis_synthetic.json").mkdir()
    (tmp_path / "train_basis_synthetic.png").mkdir()
    proc = run_script("PersonalLLM/train_basis.py", *TINY, "K_list=[0,1]", f"out_dir={tmp_path}")
    assert "results in full" in proc.stdout and "could not write" in proc.stderr
    fallback = [line.split()[1] for line in proc.stdout.splitlines() if "fallback in the system temp" in line]
    assert len(fallback) == 2 and all(os.path.isfile(p) for p in fallback)
    saved = json.loads(open(fallback[0]).read())
    printed = json.loads(proc.stdout.split("results in full (train_basis_synthetic.json):\n")[1].split("\nwrote")[0])
    assert saved == printed and [r["K"] for r in saved["results"]] == [0, 1]
    k2 = saved["results"][1]["unseen_test"]["mean"]
    assert f"{k2:.4f}" in proc.stdout  # the table shows the same numbers


def test_ctrl_c_mid_fit_leaves_no_partial_output_and_a_rerun_succeeds(tmp_path):
    args = [sys.executable, os.path.join(REPO_ROOT, "PersonalLLM/train_basis.py"), *TINY, "num_iterations=1000000",
            f"out_dir={tmp_path / 'out'}"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # K = 0 (no fit) is done: the K = 2 fit is running
        if line.startswith("ref (alpha = 0, K = 0)"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted (Ctrl-C)" in err and "ref (alpha = 0, K = 0)" in err and "nothing was written" in err
    assert "Traceback" not in err and "LoRe (alpha = 0, K = 2)" not in out
    assert os.listdir(tmp_path / "out") == []  # no JSON, no PNG, no temp file
    run_script("PersonalLLM/train_basis.py", *TINY, f"out_dir={tmp_path / 'out'}")
    assert sorted(os.listdir(tmp_path / "out")) == ["models_synthetic", "train_basis_synthetic.json",
                                                    "train_basis_synthetic.png", "train_basis_synthetic_choice.png"]


def test_two_copies_writing_the_same_out_dir(tmp_path):
    args = [sys.executable, os.path.join(REPO_ROOT, "PersonalLLM/train_basis.py"), *TINY, "K_list=[0]",
            f"out_dir={tmp_path}"]
    procs = [subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["models_synthetic", "train_basis_synthetic.json",
                                            "train_basis_synthetic.png", "train_basis_synthetic_choice.png"]
    assert os.listdir(tmp_path / "models_synthetic") == ["K0_alpha0.safetensors"]
    assert len(json.loads((tmp_path / "train_basis_synthetic.json").read_text())["results"]) == 1


def test_readers_never_see_a_half_written_file(tmp_path):
    """Two writers replace the same JSON over and over while a reader checks every version it sees."""
    path = tmp_path / "r.json"
    save_json(path, {"writer": -1, "x": []})
    stop, seen, bad = threading.Event(), set(), []

    def write(w):
        for i in range(40):
            save_json(path, {"writer": w, "x": list(range(20000 + i))})

    def read():
        while not stop.is_set():
            try:
                obj = json.loads(path.read_text())
                seen.add(obj["writer"])
            except ValueError as e:
                bad.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in (0, 1)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert not bad and seen <= {-1, 0, 1} and os.listdir(tmp_path) == ["r.json"]
