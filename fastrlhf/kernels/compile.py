"""Ahead-of-time compilation of the Triton kernels that the ops launch, for NVIDIA GPUs, with no GPU present.

Compiling catches what the interpreter forgives (types, layouts, unsupported ops, bf16) and tells the
resources a kernel needs: registers per thread, spilled bytes and shared memory.

What is compiled is what runs. Each kernel module's ``aot_cases()`` returns ``(label, launch)`` pairs: a
``launch`` calls the public op (forward and backward) on CPU tensors shaped and typed like a training
batch. Inside ``captured_launches()`` every ``kernel[grid](...)`` records its arguments instead of running,
with the Triton backend forced and the host-side value checks off, as on a GPU. Each recorded launch is
then bound and specialised by Triton's own runtime code (``JITFunction`` binder and ``_pack_args``, as
``JITFunction.run`` does): int32 or int64 from each integer's value, ``tt.divisibility=16`` for pointers
and integers divisible by 16, integers equal to 1 and ``None`` turned into constants. So the cubin's
registers and spills are those of the variant that a GPU run of the same shapes would compile.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from unittest import mock

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

ARCHS = (80, 90)


@dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)`` call, recorded instead of run."""

    kernel: JITFunction
    args: tuple
    kwargs: dict[str, Any]
    case: str = ""


@dataclass(frozen=True)
class Resources:
    arch: int
    registers: int
    spilled_bytes: int
    shared_bytes: int
    num_warps: int


@contextlib.contextmanager
def captured_launches() -> Iterator[list[Launch]]:
    """Inside the block, fastrlhf's ops run on the Triton backend with CPU tensors and every Triton kernel
    launch is appended to the yielded list instead of running (its outputs stay unwritten). Value checks
    that read tensors on the host are off, as they are on a GPU by default. Needs ``TRITON_INTERPRET=0``."""
    from fastrlhf import backend, checks

    if knobs.runtime.interpret:
        raise RuntimeError("captured_launches needs the Triton compiler: run with TRITON_INTERPRET=0")
    launches: list[Launch] = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append(Launch(kernel, args, kwargs))

    def kernels_module(name, device):
        return importlib.import_module(f"fastrlhf.kernels.{name}")

    with mock.patch.object(JITFunction, "run", record), \
            mock.patch.object(backend, "triton_kernels", kernels_module), \
            mock.patch.object(checks, "values_checked", lambda value: False), \
            backend.use_backend("triton"):
        yield launches


def specialise(launch: Launch, arch: int) -> tuple[ASTSource, GPUTarget, dict]:
    """The source, target and options that ``JITFunction.run`` (Triton 3.9) would compile ``launch`` with
    on ``sm_<arch>``."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel, kwargs = launch.kernel, dict(launch.kwargs)
    # The options JITFunction.run adds before binding.
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options.__dict__


def describe(source: ASTSource) -> str:
    """The variant in one line: constexpr values, then each argument's type (``/16``: divisible by 16)."""
    names = [p.name for p in source.fn.params]
    divisible = {path[0] for path, attr in source.attrs.items() if ["tt.divisibility", 16] in attr}
    constants = ", ".join(f"{names[path[0]]}={value}" for path, value in source.constants.items())
    types = ", ".join(f"{name}:{ty}{'/16' if i in divisible else ''}" for i, (name, ty) in
                      enumerate(source.signature.items()) if ty != "constexpr")
    return f"{source.fn.__name__}[{constants}]({types})"


def compile_source(source: ASTSource, target: GPUTarget, options: dict) -> Resources:
    compiled = triton.compile(source, target=target, options=options)
    usage = _resource_usage(compiled.asm["cubin"])
    return Resources(target.arch, usage["REG"], usage["LOCAL"], compiled.metadata.shared + usage["SHARED"],
                     compiled.metadata.num_warps)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|LOCAL|SHARED):(\d+)", text)}


def launches_of(module) -> list[Launch]:
    """Every launch of ``module.aot_cases()``, labelled with its case."""
    out = []
    for label, launch in module.aot_cases():
        with captured_launches() as launches:
            launch()
        for recorded in launches:
            recorded.case = label
        out.extend(launches)
    return out


def compile_all(progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Each distinct variant launched by the ``aot_cases()`` of every module in ``NAMES``, compiled for each of
    ``ARCHS``: one row per variant and arch (``module``, ``kernel``, ``variant``, first ``case``, resources)."""
    from fastrlhf.kernels import NAMES

    rows, seen = [], set()
    for name in NAMES:
        for launch in launches_of(importlib.import_module(f"fastrlhf.kernels.{name}")):
            for arch in ARCHS:
                source, target, options = specialise(launch, arch)
                variant = describe(source)
                key = (variant, arch, repr(sorted(options.items())))
                if key in seen:
                    continue
                seen.add(key)
                progress(f"{variant} sm_{arch}")
                resources = compile_source(source, target, options)
                rows.append({"module": name, "kernel": launch.kernel.fn.__name__, "variant": variant,
                             "case": launch.case, **vars(resources)})
    return rows


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(compile_all(lambda line: print(line, file=sys.stderr, flush=True))))
