"""``fastrlhf bench`` on a small case: the row it measures, the table, the JSON and the plot."""

import json

import pytest
import torch

from fastrlhf import cli
from fastrlhf.bench import runner
from fastrlhf.bench.case import Case


def small_case(same=torch.testing.assert_close):
    return Case("double", "n=1M", lambda: (torch.randn(2**20, generator=torch.Generator().manual_seed(0)),),
                lambda x: x * 2, {"slow": lambda x: x.clone().mul_(2)}, bytes_moved=8 * 2**20, same=same, x=2**20)


def test_measure_reports_time_speedup_memory_and_floor():
    row = runner.measure(small_case(), 1e10)
    assert row["fused_s"] > 0 and row["floor_s"] > 0
    assert 3.5 < row["fused_peak_bytes"] / 2**20 < 5.5  # the 4 MiB output
    ref = row["references"]["slow"]
    assert ref["speedup"] == pytest.approx(ref["seconds"] / row["fused_s"])


def test_measure_refuses_a_wrong_fused_result():
    bad = small_case()
    bad.fused = lambda x: x * 3
    with pytest.raises(AssertionError):
        runner.measure(bad, 1e10)


def test_check_compares_an_in_place_op_on_its_own_inputs():
    case = small_case()
    case.fused = lambda x: x.mul_(2)  # overwrites its input: the baseline must not see the doubled one
    case.check(case.fused)
    case.fused = lambda x: x.mul_(3)
    with pytest.raises(AssertionError):
        case.check(case.fused)


def test_table_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run", lambda quick, ops, console: [runner.measure(small_case(), 1e10)])
    out = tmp_path / "sub" / "bench.json"
    assert cli.main(["bench", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows[0]["op"] == "double" and "achieved_bytes_per_s" in rows[0]
    assert out.with_suffix(".png").stat().st_size > 1000
