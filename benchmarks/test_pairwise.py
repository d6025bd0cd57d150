"""pytest-benchmark suite: fastrlhf.reward_model_loss (forward + backward) against the unfused reference.

Run with ``python -m pytest benchmarks --benchmark-enable``; in the default test run each case runs
once, untimed, so the suite cannot rot.
"""

import pytest

from fastrlhf.bench import pairwise as cases

CASES = cases.cases(quick=False)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.shape}" for c in CASES])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_pairwise(benchmark, case, impl):
    inputs = case.make_inputs()
    fn = case.fused if impl == "fused" else next(iter(case.references.values()))
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    benchmark(fn, *inputs)
