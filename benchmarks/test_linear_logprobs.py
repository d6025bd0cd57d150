"""pytest-benchmark suite: fastrlhf.linear_logprobs forward+backward against the unfused path and torch's
chunked linear_cross_entropy, same inputs.

Run with ``python -m pytest benchmarks --benchmark-enable``; in the default test run each case runs
once, untimed, so the suite cannot rot. The issue's shapes (several seconds and up to ~5 GB for the
unfused path each) are marked slow: deselect them with ``-m "not slow"``.
"""

import pytest

from fastrlhf.bench import linear_logprobs as cases

CASES = cases.cases(quick=True) + [pytest.param(c, marks=pytest.mark.slow) for c in cases.cases(quick=False)]


def _id(case):
    return f"{case.op}-{case.shape}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c.values[0] if hasattr(c, "values") else c) for c in CASES])
@pytest.mark.parametrize("impl", ["fused", "unfused", "torch chunked"])
def test_linear_logprobs(benchmark, case, impl):
    inputs = case.make_inputs()
    fn = case.fused if impl == "fused" else list(case.references.values())[impl == "torch chunked"]
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    benchmark(fn, *inputs)
