"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, with no GPU and no spills."""

import importlib
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
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    print(f"\n{'kernel':60} arch  regs  spill  shared  warps")
    for row in compiled:
        print(f"{row['kernel']:60} sm_{row['arch']}  {row['registers']:4}  {row['spilled_bytes']:5}  "
              f"{row['shared_bytes']:6}  {row['num_warps']:5}")
    from fastrlhf.kernels import NAMES

    expected = {case[0] for name in NAMES for case in importlib.import_module(f"fastrlhf.kernels.{name}").aot_cases()}
    assert {row["kernel"] for row in compiled} == expected
    assert {row["arch"] for row in compiled} == {80, 90}


def test_no_spills_and_shared_memory_fits(compiled):
    for row in compiled:
        assert row["spilled_bytes"] == 0, row
        assert row["shared_bytes"] <= SHARED_LIMIT[row["arch"]], row
