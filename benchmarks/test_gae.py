"""pytest-benchmark suite: fastrlhf.gae (+ masked_whiten) against the verl-style loop, same inputs.

Run with ``python -m pytest benchmarks --benchmark-enable``; in the default test run each case runs
once, untimed, so the suite cannot rot.
"""

import pytest

from fastrlhf.bench import gae as cases

CASES = cases.cases(quick=False)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.shape}" for c in CASES])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_gae(benchmark, case, impl):
    inputs = case.make_inputs()
    fn = case.fused if impl == "fused" else next(iter(case.references.values()))
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    benchmark(fn, *inputs)
