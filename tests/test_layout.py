"""The library's shape: utils.py is the published face (the published names and the documented ones), lorelib's
modules import only the modules below them, and no file outgrows one sitting."""
import ast
import os

import pytest

import utils
from conftest import REPO_ROOT

# Every name the published utils.py defines (../shared/docs/published-api.md: module level, functions, classes)
PUBLISHED = """
torch nn optim F np random device simulate_user simulate_population generate_popupulation create_sparse_tensor
sample_shots evaluate_model eval_multiple create_dataset_prism create_dataset_prism_shots learn_multiple
learn_multiple_few_shot learn_multiple_few_shot_weighted solve solve_regularized solve_regularized_simplex
solve_multi_reward learn_single_reward learn_single_reward_regularized run run_regularized run_few_shot_vary_shots
LoRe LoRe_regularized PersonalizeBatch
""".split()
# and the names the README documents beside them
DOCUMENTED = """
Pairs PreferenceData InputError MissingFileError configure set_seed get_device generate_population
sample_population_pairs personalize_users LOGIT_SCALE fit_ranks select_rank vary_shots PersonalizedReward
read_comparisons save_lore_model load_lore_model export_reward_model extract_embeddings
""".split()

# lorelib's core modules, bottom first: each may import only modules before it in this list (CONTRIBUTING.md's map).
# A registered method's own module (methods.METHODS) that is not here may import core modules up to "baseline", and
# only the registry imports it: a new method is its module and one registry line, nothing here.
ORDER = ["config", "files", "kernels", "data", "populations", "metrics", "intervals", "report", "report_shots", "model",
         "method", "lore", "bt", "selection", "evaluate", "compare", "tuning", "newusers", "fewshot", "study",
         "pipelines", "extract", "export", "learned", "choice", "baseline", "methods", "experiment"]


def test_utils_is_the_published_face():
    star = {}
    exec("from utils import *", star)
    assert sorted(utils.__all__) == sorted(PUBLISHED + DOCUMENTED)
    assert [n for n in PUBLISHED + DOCUMENTED if n not in star] == []
    assert utils.device.type in ("cpu", "cuda") and utils.F is torch_functional()
    public = {n for n in dir(utils) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(utils, n)).__name__ == "module"}
    assert modules == {"torch", "nn", "optim", "F", "np", "random"}  # no re-export of other modules


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
    from lorelib.methods import METHODS
    files = sorted(f[:-3] for f in os.listdir(os.path.join(REPO_ROOT, "lorelib"))
                   if f.endswith(".py") and f != "__init__.py")
    plugins = sorted({cls.__module__.split(".")[1] for cls in METHODS.values()} - set(ORDER))
    assert sorted(ORDER + plugins) == files  # a new core module takes its place in ORDER (and in CONTRIBUTING's map)
    for i, name in enumerate(ORDER):
        above = sorted(lorelib_imports(name) - set(ORDER[:i]) - (set(plugins) if name == "methods" else set()))
        assert above == [], f"lorelib/{name}.py imports {above}, which are not below it"
    allowed = set(ORDER[:ORDER.index("baseline") + 1])
    for name in plugins:
        assert lorelib_imports(name) <= allowed, f"lorelib/{name}.py imports {sorted(lorelib_imports(name) - allowed)}"
    assert [n for n in ORDER if set(plugins) & lorelib_imports(n) and n != "methods"] == []
    assert lorelib_imports("kernels") == set()  # loadable alone, under another name (the numba cache test)


@pytest.mark.parametrize("limit, files", [(450, ["utils.py"]), (600, None)])
def test_no_file_outgrows_one_sitting(limit, files):
    if files is None:
        files = [os.path.relpath(os.path.join(d, f), REPO_ROOT) for d, _, fs in os.walk(REPO_ROOT) for f in fs
                 if f.endswith(".py") and not d.startswith(os.path.join(REPO_ROOT, "tests"))
                 and not d.startswith(os.path.join(REPO_ROOT, "mutants"))  # mutmut's copy (tests/mutate.py)
                 and "/." not in d.replace(REPO_ROOT, "")]
    sizes = {f: sum(1 for _ in open(os.path.join(REPO_ROOT, f))) for f in files}
    assert {f: n for f, n in sizes.items() if n > limit} == {}
