"""Ahead-of-time compilation of a Triton kernel for an NVIDIA architecture, with no GPU present.

Compiling catches what the interpreter forgives (types, layouts, unsupported ops) and tells the
resources a kernel needs: registers per thread, spilled bytes and shared memory.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCHS = (80, 90)


@dataclass(frozen=True)
class Resources:
    arch: int
    registers: int
    spilled_bytes: int
    shared_bytes: int
    num_warps: int


def compile_for_gpu(kernel, signature: dict[str, str], constexprs: dict[str, object], arch: int,
                    num_warps: int = 4) -> Resources:
    """Compiles ``kernel`` (a ``triton.jit`` function, not interpreted) to a cubin for ``sm_<arch>``.

    ``signature`` maps every argument to a Triton type (``"*fp32"``, ``"i32"``, ``"fp32"``) or to
    ``"constexpr"``; ``constexprs`` gives the values of the constexpr arguments.
    """
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    usage = _resource_usage(compiled.asm["cubin"])
    return Resources(arch, usage["REG"], usage["LOCAL"], compiled.metadata.shared + usage["SHARED"], num_warps)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|LOCAL|SHARED):(\d+)", text)}


def compile_all() -> list[dict]:
    """Every kernel of every op (``aot_cases()`` of each module in ``NAMES``) for each of ``ARCHS``,
    with the module's ``NUM_WARPS`` (default 4). Run where the interpreter is off (``TRITON_INTERPRET=0``).
    """
    import importlib

    from fastrlhf.kernels import NAMES

    rows = []
    for name in NAMES:
        module = importlib.import_module(f"fastrlhf.kernels.{name}")
        warps = getattr(module, "NUM_WARPS", 4)
        for case, kernel, signature, constexprs in module.aot_cases():
            for arch in ARCHS:
                rows.append({"kernel": case, **vars(compile_for_gpu(kernel, signature, constexprs, arch, warps))})
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(compile_all()))
