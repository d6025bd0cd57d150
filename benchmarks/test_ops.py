"""pytest-benchmark suite: every op's bench cases (``fastrlhf.bench.<op>.cases``), fused and each
reference on the same inputs.

Run with ``python -m pytest benchmarks --benchmark-enable``. Each implementation's result is first checked
against the case's baseline reference (``Case.check``, on fresh inputs for each side), so a wrong kernel
fails here before it is timed. In the default test run (timing disabled) each quick case is checked and
runs once, untimed, so the suite cannot rot; the full shapes (up to minutes and several GB a call on 2
cores) run only with benchmarking enabled.
"""

import importlib

import pytest

from fastrlhf.bench import OPS


def _runs(quick):
    for op in OPS:
        for case in importlib.import_module(f"fastrlhf.bench.{op}").cases(quick):
            for impl in ("fused", *case.references):
                yield pytest.param(case, impl, quick, id=f"{case.op}-{case.shape}-{impl}-{'quick' if quick else 'full'}")


@pytest.mark.parametrize(("case", "impl", "quick"), [*_runs(True), *_runs(False)])
def test_op(benchmark, case, impl, quick):
    if benchmark.disabled and not quick:
        pytest.skip("full shapes run only with --benchmark-enable")
    fn = case.fused if impl == "fused" else case.references[impl]
    case.check(fn)
    inputs = case.make_inputs()
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    benchmark(fn, *inputs)
