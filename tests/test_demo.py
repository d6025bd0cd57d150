import json

import pytest
import torch

from fastrlhf.cli import main
from fastrlhf.demo import EOS, PAD, hidden_score


def test_hidden_score():
    d = [t + 2 for t in range(10)]  # the tokens of the digits 0..9
    prompts = torch.tensor([[d[9], d[2]]] * 4)
    responses = torch.tensor([[d[3], d[5], d[4], EOS, PAD],  # 3 > 2, 5 > 3, 4 < 5: 2/3
                              [EOS, PAD, PAD, PAD, PAD],  # no digit: 0
                              [d[1], d[2], d[3], d[4], d[5]],  # no EOS: 0
                              [d[3], EOS, d[9], PAD, PAD]])  # only what comes before the EOS counts
    torch.testing.assert_close(hidden_score(prompts, responses), torch.tensor([2 / 3, 0.0, 0.0, 1.0]))


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_quick_demo_learns(tmp_path, algo):
    chosen = [] if algo == "ppo" else ["--algo", algo]  # ppo is the default
    assert main(["demo", "--quick", "--out", str(tmp_path), *chosen]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["algo"] == algo and summary["impl"] == "fused"
    assert summary["rm_heldout_accuracy"] >= 0.8
    assert summary["hidden_score_after"] >= summary["hidden_score_before"] + 0.15
    assert summary["kl_to_reference"] > 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {line["stage"] for line in lines} == {"pretrain", "rm", algo}
    assert (tmp_path / "demo.png").stat().st_size > 0
