"""pytest-benchmark suite: fastrlhf.linear_logprobs forward+backward against the unfused path and torch's
chunked linear_cross_entropy, same inputs.

Run with ``python -m pytest benchmarks --benchmark-enable``. In the default test run the quick case runs
once, untimed, so the suite cannot rot; the issue's shapes (seconds to a minute per call on 2 cores, ~5 GB
for the unfused path at V=151936) are marked slow and run only with benchmarking enabled.
"""

import pytest

from fastrlhf.bench import linear_logprobs as cases

QUICK, FULL = cases.cases(quick=True), cases.cases(quick=False)
CASES = QUICK + [pytest.param(c, marks=pytest.mark.slow, id=f"{c.op}-{c.shape}") for c in FULL]
IMPLS = {"fused": lambda c: c.fused, "unfused": lambda c: c.references["unfused log_softmax+gather"],
         "torch chunked": lambda c: c.references["torch chunked linear_cross_entropy"]}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.shape}")
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs(benchmark, case, impl):
    if case in FULL and benchmark.disabled:
        pytest.skip("the issue's shapes run with --benchmark-enable only")
    inputs = case.make_inputs()
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    benchmark(IMPLS[impl](case), *inputs)
