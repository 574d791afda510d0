"""Mutation testing of one module, in bounded time: `python tests/mutate.py intervals` (after
`pip install -r requirements-dev.txt`; not part of CI).

Runs mutmut (configured in pyproject.toml, [tool.mutmut]) on the mutants of lorelib/<module>.py only, each against
only the tests that called the mutated function in mutmut's recorded pass of the suite, then prints each surviving
mutant's diff and the killed / survived / timeout counts. A mutant is stopped after mutmut's per-mutant limit
(timeout_multiplier x (the recorded time of its tests + timeout_constant)); the whole run after --budget seconds
(what finished is reported, the rest counts as not checked). The first run, or one after a test was added, records
which tests call which function: the whole suite once, on one process (kept in mutants/mutmut-stats.json).
"no tests": no test calls that function in the test process (scripts run in subprocesses are not seen).
Known equivalent mutants: tests/mutation_equivalents.md.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["killed", "survived", "timeout", "suspicious", "segfault", "no tests", "not checked"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("module", help="a lorelib module named in [tool.mutmut] only_mutate, e.g. intervals")
    ap.add_argument("--budget", type=float, default=1800.0, help="seconds for the whole run (default 1800)")
    ap.add_argument("--children", type=int, default=1, help="mutants run in parallel (default 1)")
    a = ap.parse_args()
    os.chdir(ROOT)
    try:  # mutmut 3.8's own reading of its configuration and results (requirements-dev.txt pins it)
        from mutmut.configuration import config
        from mutmut.mutation.data import SourceFileMutationData
        from mutmut.mutation.diff_apply import get_diff_for_mutant
        from mutmut.stats import status_by_exit_code
    except ImportError:
        sys.exit("mutmut is not installed: pip install -r requirements-dev.txt")
    path = f"lorelib/{a.module}.py"
    if not Path(path).is_file() or not config().should_mutate(path):
        sys.exit(f"{path}: not a module that [tool.mutmut] only_mutate names in pyproject.toml")
    stats = Path("mutants/mutmut-stats.json")
    if stats.is_file() and not json.loads(stats.read_text()).get("tests_by_mangled_function_name"):
        stats.unlink()  # tests recorded without a function each (`mutmut print-time-estimates` empties it): record anew

    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mutmut"), "run", "--max-children", str(a.children),
                             f"lorelib.{a.module}.*"], env=env, start_new_session=True)
    try:
        proc.wait(timeout=a.budget)
    except subprocess.TimeoutExpired:
        print(f"\nbudget of {a.budget:.0f} s spent: stopping mutmut", flush=True)
        os.killpg(proc.pid, signal.SIGINT)  # mutmut stops its workers and keeps the results it has
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    elapsed = time.monotonic() - start

    data = SourceFileMutationData(path=Path(path))
    data.load()
    status = {name: status_by_exit_code[code] for name, code in data.exit_code_by_key.items()}
    for name in sorted(n for n, s in status.items() if s in ("survived", "timeout", "suspicious", "segfault")):
        print(f"\n======== {name}: {status[name]}")
        print(get_diff_for_mutant(name, path=data.path).rstrip())
    untested = Counter(n.rpartition("__mutmut_")[0] for n, s in status.items() if s == "no tests")
    if untested:
        print("\nno test calls (mutants): " + ", ".join(f"{f.removeprefix(f'lorelib.{a.module}.')} ({n})"
                                                       for f, n in sorted(untested.items())))
    counts = Counter(status.values())
    checked = counts["killed"] + counts["survived"] + counts["timeout"] + counts["suspicious"] + counts["segfault"]
    print(f"\n{path}: {len(status)} mutants in {elapsed:.0f} s (mutmut exit {proc.returncode}): "
          + ", ".join(f"{counts[s]} {s}" for s in ORDER + sorted(set(counts) - set(ORDER)) if counts[s])
          + (f"; killed {counts['killed'] + counts['timeout']} of the {checked} run (timeouts count as killed)"
             if checked else ""))
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
