"""Intervals and the comparison of methods (lorelib/intervals.py, compare.py) against by-hand t-intervals, and
several seeds giving the per-seed values of separate single-seed runs (lorelib/experiment.py)."""
import json
import math

import numpy as np
import pytest

from conftest import run_script
from lorelib.compare import comparison
from lorelib.evaluate import MethodResult, Run
from lorelib.intervals import mean_interval, t_cdf, t_quantile, worst_share

# Student's t 97.5% quantiles from a printed table (df: quantile)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 19: 2.093, 29: 2.045, 120: 1.980}


def test_t_quantiles_match_the_printed_table_and_invert_the_cdf():
    for df, q in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-3)
        assert t_cdf(q, df) == pytest.approx(0.975, abs=2e-4)
    assert t_cdf(0.0, 5) == 0.5 and t_cdf(-1.0, 3) == pytest.approx(1 - t_cdf(1.0, 3), abs=1e-12)


def test_mean_interval_is_the_t_interval_by_hand():
    x = [0.61, 0.72, 0.58, 0.69, 0.74]  # five seeds' means
    m, lo, hi = mean_interval(x)
    sd = math.sqrt(sum((v - 0.668) ** 2 for v in x) / 4)
    half = 2.776445 * sd / math.sqrt(5)
    assert m == pytest.approx(0.668) and (lo, hi) == (pytest.approx(0.668 - half), pytest.approx(0.668 + half))
    assert np.isnan(mean_interval([0.5])[1]) and mean_interval([0.5, np.nan, 0.7])[0] == pytest.approx(0.6)
    assert worst_share(list(range(1, 21))) == 1.5 and worst_share([3.0, 1.0, 2.0], 0.5) == 1.5  # ceil(0.1 n)


def result(family, seen, unseen, entry=None):
    """A MethodResult of per-user accuracies (one seed)."""
    users = {"seen_test": {"accuracy": np.asarray(seen, float)}, "unseen_test": {"accuracy": np.asarray(unseen, float)}}
    return MethodResult(Run(entry or family, "x", family, None), users, 0.0)


def test_one_seed_pairs_by_user_and_several_by_seed():
    a = [0.9, 0.8, 0.7, 0.6]
    b = [0.8, 0.8, 0.6, 0.7]
    one = comparison([[result("A", a, a), result("B", b, b)]])
    assert one["over"] == "users"
    vs = one["rows"]["A"]["vs_best"]["unseen_test"]
    d = np.subtract(a, b)  # paired by user: mean 0.025, sd of the differences
    half = 3.182446 * d.std(ddof=1) / 2
    assert vs["other"] == "B" and vs["mean"] == pytest.approx(0.025)
    assert vs["ci95"] == [pytest.approx(0.025 - half), pytest.approx(0.025 + half)] and not vs["clear"]
    assert one["rows"]["A"]["unseen_test"]["worst10"]["mean"] == 0.6  # the worst of 4 users (ceil(0.4) = 1)
    seeds = [[result("A", [m + 0.1], [m + 0.1]), result("B", [m], [m])] for m in (0.5, 0.6, 0.62)]
    many = comparison(seeds, [0, 1, 2])
    assert many["over"] == "seeds" and many["rows"]["A"]["unseen_test"]["per_seed"] == pytest.approx([0.6, 0.7, 0.72])
    vs = many["rows"]["A"]["vs_best"]["unseen_test"]  # paired by seed: +0.1 every time, no spread
    assert vs["mean"] == pytest.approx(0.1) and vs["ci95"] == [pytest.approx(0.1), pytest.approx(0.1)] and vs["clear"]
    m, lo, hi = mean_interval([0.6, 0.7, 0.72])
    assert many["rows"]["A"]["unseen_test"]["ci95"] == [pytest.approx(lo), pytest.approx(hi)]


def test_several_seeds_give_the_per_seed_values_of_single_seed_runs(tmp_path):
    """seeds=[0, 1] with a baseline: each seed's numbers are those of a run with seed=s alone."""
    small = ["synthetic=True", "synthetic_prompts=[200,40]", "synthetic_features=16", "N=12", "N_unseen=8",
             "train_density=0.1", "fewshot_density=0.05", "K_list=[0,1,2]", "num_iterations=60",
             "fewshot_iterations=30", "baselines=['per_user_bt']", "choice_prompts=10", "save_models=False"]
    run_script("PersonalLLM/train_basis.py", *small, "seeds=[0,1]", f"out_dir={tmp_path / 'both'}")
    both = json.loads((tmp_path / "both" / "train_basis_synthetic.json").read_text())
    assert both["seeds"] == [0, 1] and both["comparison"]["over"] == "seeds"
    for i, s in enumerate((0, 1)):
        run_script("PersonalLLM/train_basis.py", *small, f"seed={s}", f"out_dir={tmp_path / str(s)}")
        alone = json.loads((tmp_path / str(s) / "train_basis_synthetic.json").read_text())
        assert both["per_seed"][i]["seed"] == s
        for key in ("results", "summary"):
            assert both["per_seed"][i][key] == alone[key]
        for entry, b in alone["baselines"].items():
            assert {k: v for k, v in both["per_seed"][i]["baselines"][entry].items() if k != "seconds"} == \
                {k: v for k, v in b.items() if k != "seconds"}
        for family, row in both["comparison"]["rows"].items():
            assert row["unseen_test"]["per_seed"][i] == pytest.approx(alone["summary"][family]["unseen_test"])
