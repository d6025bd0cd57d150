"""``fastrlhf bench --integrations``: a case for every benchmarked function of each importable package, each
giving the package's result."""

import importlib.util
import warnings

import pytest

from fastrlhf import cli
from fastrlhf.bench import integrations


def test_cases_agree_with_the_packages(monkeypatch):
    monkeypatch.setattr(integrations, "VOCAB", 1000)  # small, so the packages' own loops stay quick
    installed = [p for p in ("verl", "trl") if importlib.util.find_spec(p) is not None]
    if not installed:
        pytest.skip("neither verl nor trl is installed: pip install 'fastrlhf[integrations]'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the packages that are not importable here
        cases = integrations.cases(quick=True)
    benched = {case.op.split()[0] for case in cases}
    assert set(installed) <= benched
    for case in cases:
        inputs = case.make_inputs()
        case.same(case.fused(*inputs), next(iter(case.references.values()))(*inputs))


def test_the_flag_selects_the_integration_cases(monkeypatch):
    seen = []
    monkeypatch.setattr("fastrlhf.bench.runner.run", lambda quick, ops, console: seen.append(ops) or [])
    assert cli.main(["bench", "--integrations", "--quick"]) == 0
    assert seen == [("integrations",)]
