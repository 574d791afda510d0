"""The library's shape: utils.py keeps every public name it had, lorelib's modules import only the modules below
them, and no file outgrows one sitting."""
import ast
import os

import pytest

import utils
from conftest import REPO_ROOT

# Every public name of `dir(utils)` and `from utils import *` before the package split (frozen on 2026-12-03):
# notebooks written for utils.py may use any of them. The numba internals are there only when numba is installed.
PUBLIC_NAMES = """
EXPORT_BASE_PREFIX EXPORT_COPIED_FILES EXPORT_HEAD_FILE EXPORT_INDEX_FILE F F_nn FolderInUseError InputError
LOGIT_SCALE LoRe LoRe_regularized MODEL_FORMAT MissingFileError NONE_DEFAULT_TYPES PRIOR_SCALE PUBLISHED_REFERENCE
Pairs Path PerUserBT PersonalizeBatch PersonalizedReward PreferenceData RESULT_NAMES RULES accuracy_by_user
all_finite as_conversation as_pairs ast atomic_write_bytes base_weight_files check_counts check_shapes check_users
check_value check_values choose_reference choose_shots comparison_scores configure contextlib cpu_kernel
create_dataset_prism create_dataset_prism_shots create_sparse_tensor dataclasses datetime device dist dist_info
embed_batch embed_token_ids eval_multiple evaluate_model expected_information export_reward_model extract_embeddings
generate_population generate_popupulation get_device hashlib holdout_pairs importlib inspect is_main_process json
laplace_posterior learn_multiple learn_multiple_few_shot learn_multiple_few_shot_weighted learn_single_reward
learn_single_reward_regularized load_file load_lore_model load_metadata load_pickle load_reward_model load_split
load_tensors math matmul_f32 nn note_finished np numba numbers optim os personalize_users print0 print_table random
read_comparisons read_published_reference read_score_weight report_run report_shots require_columns reward_head
reward_model_info run run_few_shot_vary_shots run_regularized safe_open sample_population_pairs sample_shots
save_file save_json save_lore_model save_models save_or_fallback save_plot save_tensors script_out_dir
select_comparisons select_rank select_shots set_seed shot_units shutil simulate_population simulate_user solve
solve_multi_reward solve_regularized solve_regularized_simplex stack_trials stand_in_reference struct sys tempfile
tensor_shapes time tokenize_conversations torch tqdm user_accuracies write_report
""".split()
NUMBA_NAMES = ["cgutils", "intrinsic", "ir", "types"]

# lorelib's modules, bottom first: each may import only modules before it in this list (CONTRIBUTING.md's map)
ORDER = ["config", "files", "kernels", "data", "intervals", "report", "model", "bt", "selection", "pipelines",
         "extract", "export", "learned", "choice", "baseline", "vpl", "pal", "tuning",
         "baselines"]


def test_utils_keeps_every_public_name():
    names = PUBLIC_NAMES + (NUMBA_NAMES if utils.numba is not None else [])
    star = {}
    exec("from utils import *", star)
    assert [n for n in names if n not in dir(utils)] == []
    assert [n for n in names if n not in star] == []
    assert len(PUBLIC_NAMES) == 138 and utils.device.type in ("cpu", "cuda") and utils.F is torch_functional()


def torch_functional():
    import torch.nn.functional
    return torch.nn.functional


def lorelib_imports(name):
    """The lorelib modules that lorelib/<name>.py imports (from . import x, from .x import y, lorelib.x)."""
    tree = ast.parse(open(os.path.join(REPO_ROOT, "lorelib", f"{name}.py")).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                out |= {node.module} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith("lorelib"):
                out.add(node.module.split(".")[1] if "." in node.module else node.names[0].name)
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lorelib.")}
    return out


def test_every_module_imports_only_the_modules_below_it():
    files = sorted(f[:-3] for f in os.listdir(os.path.join(REPO_ROOT, "lorelib"))
                   if f.endswith(".py") and f != "__init__.py")
    assert sorted(ORDER) == files  # a new module takes its place in ORDER (and in CONTRIBUTING.md's map)
    for i, name in enumerate(ORDER):
        above = sorted(lorelib_imports(name) - set(ORDER[:i]))
        assert above == [], f"lorelib/{name}.py imports {above}, which are not below it"
    assert lorelib_imports("kernels") == set()  # loadable alone, under another name (the numba cache test)


@pytest.mark.parametrize("limit, files", [(450, ["utils.py"]), (800, None)])
def test_no_file_outgrows_one_sitting(limit, files):
    if files is None:
        files = [os.path.relpath(os.path.join(d, f), REPO_ROOT) for d, _, fs in os.walk(REPO_ROOT) for f in fs
                 if f.endswith(".py") and not d.startswith(os.path.join(REPO_ROOT, "tests"))
                 and not d.startswith(os.path.join(REPO_ROOT, "mutants"))  # mutmut's copy (tests/mutate.py)
                 and "/." not in d.replace(REPO_ROOT, "")]
    sizes = {f: sum(1 for _ in open(os.path.join(REPO_ROOT, f))) for f in files}
    assert {f: n for f, n in sizes.items() if n > limit} == {}
