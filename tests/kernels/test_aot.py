"""The Triton kernel variants that the ops launch compile ahead of time for sm_80 and sm_90, with no GPU: no
spills, shared memory within each GPU's limit.

``fastrlhf.kernels.compile`` captures the launches of each kernel module's ``aot_cases()`` (the public ops on
CPU tensors shaped like training batches, fp32 and bf16) and specialises each as Triton's runtime does
(int32/int64 from the values, divisibility by 16, constants), so these are the kernels a GPU would run;
bf16, which the interpreter cannot run, is covered here.
"""

import importlib
import inspect
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def compiled():
    # A fresh process: the interpreter that the other tests use would replace the compiler.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "fastrlhf.kernels.compile"], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_every_launched_variant_compiles_for_sm80_and_sm90(compiled):
    print(f"\n{'variant (case that first launched it)':100} arch  regs  spill  shared  warps")
    for row in compiled:
        print(f"{row['variant'][:100]:100} sm_{row['arch']}  {row['registers']:4}  {row['spilled_bytes']:5}  "
              f"{row['shared_bytes']:6}  {row['num_warps']:5}\n    ({row['case']})")
    variants = {row["variant"] for row in compiled}
    for variant in variants:
        assert {row["arch"] for row in compiled if row["variant"] == variant} == {80, 90}, variant


def test_every_kernel_of_every_module_is_launched_by_its_cases(compiled):
    from fastrlhf.kernels import NAMES

    for name in NAMES:
        module = importlib.import_module(f"fastrlhf.kernels.{name}")
        kernels = {n for n, _ in inspect.getmembers(module) if n.endswith("_kernel")}
        launched = {row["kernel"] for row in compiled if row["module"] == name}
        assert kernels and kernels <= launched, (name, kernels - launched)
        # The interpreter cannot run bf16, so this compile is where the bf16 variants are checked at all.
        assert any("*bf16" in row["variant"] for row in compiled if row["module"] == name), name


def test_no_spills_and_shared_memory_fits(compiled):
    for row in compiled:
        assert row["spilled_bytes"] == 0, row
        assert row["shared_bytes"] <= SHARED_LIMIT[row["arch"]], row
