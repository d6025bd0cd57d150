"""pytest-benchmark suite: fastrlhf.logprobs (log-probs and entropy, forward and forward+backward) against
log_softmax+gather and TRL's row loop, same inputs.

Run with ``python -m pytest benchmarks --benchmark-enable``. In the default test run (timing disabled)
only the quick shape runs, once, so the suite cannot rot; the full shapes need several GB and minutes.
"""

import pytest

from fastrlhf.bench import logprobs as cases

QUICK = cases.cases(quick=True)
RUNS = [(case, impl) for case in QUICK + cases.cases(quick=False) for impl in ("fused", *case.references)]


@pytest.mark.parametrize(("case", "impl"), RUNS, ids=[f"{c.op}-{c.shape}-{impl}" for c, impl in RUNS])
def test_logprobs(benchmark, case, impl):
    if benchmark.disabled and case not in QUICK:
        pytest.skip("full shapes run only with --benchmark-enable")
    inputs = case.make_inputs()
    fn = case.fused if impl == "fused" else case.references[impl]
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    benchmark(fn, *inputs)
