"""PRISM/rewardbench.py: the RewardBench 2 scoring rules and prompt loading (CPU, no download). The scripts
that use it end to end (PRISM/eval_rb2.py) are tested in test_prism.py."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import write_rb2
from PRISM import rewardbench


def test_rb2_scoring_rules():
    assert rewardbench.prompt_score([2.0], [1.0, 1.5, 0.0], "Math") == 1.0
    assert rewardbench.prompt_score([1.5], [1.0, 1.5], "Focus") == 0.0  # a tie is wrong
    assert rewardbench.prompt_score([3.0, 2.9], [1.0], "Ties") == 1.0  # margin 1.9 > spread 0.1
    assert rewardbench.prompt_score([3.0, 1.5], [1.0], "Ties") == 0.5  # margin 0.5 < spread 1.5
    assert rewardbench.prompt_score([3.0, 0.5], [1.0], "Ties") == 0.0
    rewards = [2, 1, 0, 1, 3, 5, 4, 0]  # prompt 0 (Math) right, prompt 1 (Math) wrong, prompt 2 (Ties) full
    acc = rewardbench.accuracy(rewards, [0, 0, 0, 1, 1, 2, 2, 2], [1, 0, 0, 1, 0, 1, 1, 0], ["Math", "Math", "Ties"])
    assert acc == {"Math": 0.5, "Ties": 1.0, "overall": 0.75, "overall_published": 0.75}


def test_load_prompts_checks_and_limits(tmp_path, capsys):
    folder = write_rb2(tmp_path / "rb2")
    df = pd.read_parquet(os.path.join(folder, "test-00000-of-00001.parquet"))
    df.at[1, "rejected"] = []  # no rejected response: skipped
    df.loc[2, "subset"] = "Unknown"  # not scored
    df.to_parquet(os.path.join(folder, "test-00000-of-00001.parquet"))
    out = rewardbench.load_prompts("rb2", folder)
    log = capsys.readouterr().out
    assert "skipping 1 prompts" in log and "subsets ['Unknown'] are not scored" in log
    assert len(out) == 3 * len(rewardbench.SUBSETS) - 2
    assert rewardbench.load_prompts("rb2", folder, limit=1)["subset"].tolist() == rewardbench.SUBSETS
    convs, prompt_row, is_chosen = rewardbench.conversations(out.iloc[:2])
    assert len(convs) == 2 * 4 and prompt_row.tolist() == [0] * 4 + [1] * 4
    assert is_chosen.tolist() == [True, False, False, False] * 2
    assert convs[1] == [{"role": "user", "content": out["prompt"][0]},
                        {"role": "assistant", "content": out["rejected"][0][0]}]
    pd.DataFrame({"id": ["x"], "prompt": ["p"]}).to_parquet(tmp_path / "test.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['chosen', 'rejected', 'subset'\]"):
        rewardbench.load_prompts("bad", tmp_path / "test.parquet")


def test_overall_published_and_head_files(tmp_path):
    rewards = [1.0, 0.0, 2.0, 0.0, 3.0, 1.5, 1.0]  # prompts 0, 1 (Math): right, wrong; prompt 2 (Ties): 0.5
    acc = rewardbench.accuracy(rewards, [0, 0, 1, 1, 2, 2, 2], [1, 0, 0, 1, 1, 1, 0], ["Math", "Math", "Ties"])
    assert acc["Math"] == 0.5 and acc["Ties"] == 0.5 and acc["overall_published"] == 0.5
    acc = rewardbench.accuracy(rewards + [0.0, 1.0], [0, 0, 1, 1, 2, 2, 2, 3, 3], [1, 0, 0, 1, 1, 1, 0, 1, 0],
                               ["Math", "Math", "Ties", "Safety"])
    assert acc["overall"] == pytest.approx(1 / 3) and acc["overall_published"] == pytest.approx((0.25 + 0.5) / 2)
    V = torch.randn(6, 3)
    np.save(tmp_path / "V.npy", V.numpy())
    torch.save(V, tmp_path / "V.pt")
    torch.save({"other": torch.zeros(2), "V": V}, tmp_path / "V.bin")
    torch.save({"weights": V}, tmp_path / "V.pth")
    for name in ["V.npy", "V.pt", "V.bin"]:
        assert torch.equal(rewardbench.load_head(tmp_path / name)[0], V)
    assert torch.equal(rewardbench.load_head(tmp_path / "V.pth", head_key="weights")[0], V)
    with pytest.raises(ValueError, match="head_key"):
        rewardbench.load_head(tmp_path / "V.bin", head_key="missing")

    class Evil:  # a pickle that runs code when loaded: refused
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"V": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        rewardbench.load_head(tmp_path / "evil.pt")
