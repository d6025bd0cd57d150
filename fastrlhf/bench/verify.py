"""``fastrlhf verify``: every op on every backend this machine has, against float64 references."""

from __future__ import annotations

import importlib
import importlib.util

import torch
from rich.console import Console
from rich.table import Table

from fastrlhf import backend
from fastrlhf.bench import OPS


def available_backends(interpret: bool) -> list[tuple[str, torch.device]]:
    """(backend, device) pairs to verify: C++ on CPU if built, Triton on CUDA, or interpreted on request."""
    found = []
    if importlib.util.find_spec("fastrlhf._C") is not None:
        found.append(("cpp", torch.device("cpu")))
    if importlib.util.find_spec("triton") is not None:
        if torch.cuda.is_available():
            found.append(("triton", torch.device("cuda")))
        elif interpret:
            found.append(("triton", torch.device("cpu")))
    return found


def run(interpret: bool, ops: tuple[str, ...] = OPS, console: Console | None = None) -> tuple[Table, bool]:
    console = console or Console()
    out = Table(title="fastrlhf verify: error against float64 on the rounded inputs, at the element nearest its bound (K roundings of the compute dtype on its magnitudes + half an ulp of its dtype)")
    for column in ("op", "shape", "dtype", "backend", "output", "error", "bound", "ok"):
        out.add_column(column)
    all_ok = True
    for name, device in available_backends(interpret):
        for op in ops:
            for check in importlib.import_module(f"fastrlhf.bench.{op}").checks():
                if device.type == "cpu" and name == "triton" and check.dtype == torch.bfloat16:
                    continue  # the Triton interpreter stores bf16 as raw 16-bit patterns
                with console.status(f"{name} {check.op} {check.shape} {check.dtype}"), backend.use_backend(name):
                    results = check.run(device)
                for output, (error, bound) in results.items():
                    ok = error <= bound
                    all_ok &= ok
                    out.add_row(check.op, check.shape, str(check.dtype).removeprefix("torch."),
                                f"{name} ({device.type})", output, f"{error:.2e}", f"{bound:.2e}",
                                "[green]yes[/]" if ok else "[red]NO[/]")
    return out, all_ok


def main(args) -> int:
    console = Console(width=160)
    table, ok = run(args.interpret, tuple(args.ops) if args.ops else OPS, console)
    console.print(table)
    console.print("all checks passed" if ok else "[red]some checks FAILED[/]")
    return 0 if ok else 1
