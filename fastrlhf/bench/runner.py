"""``fastrlhf bench``: every op's cases, fused against references on the same inputs in one process."""

from __future__ import annotations

import gc
import importlib
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fastrlhf.bench import OPS
from fastrlhf.bench.case import Case
from fastrlhf.bench.measure import copy_bandwidth, peak_extra_bytes, seconds, steady_state_allocator


def measure(case: Case, bandwidth: float) -> dict:
    """Checks the fused result against the baseline, then times both and takes their peak memory.

    ``bandwidth`` is the machine's copy bandwidth: the floor is the time to move the case's bytes once
    at that speed.
    """
    case.check(case.fused)
    inputs = case.make_inputs()
    fused_s = seconds(lambda: case.fused(*inputs))
    row = {"op": case.op, "shape": case.shape, "x": case.x, "fused_s": fused_s,
           "fused_peak_bytes": _peak(case.fused, inputs), "bytes_moved": case.bytes_moved,
           "floor_s": case.bytes_moved / bandwidth, "achieved_bytes_per_s": case.bytes_moved / fused_s,
           "copy_bytes_per_s": bandwidth, "references": {}}
    for name, reference in case.references.items():
        ref_s = seconds(lambda: reference(*inputs), budget=0.2, max_repeats=5)
        row["references"][name] = {"seconds": ref_s, "speedup": ref_s / fused_s,
                                   "peak_bytes": _peak(reference, inputs)}
    return row


def _peak(fn, inputs) -> int:
    gc.collect()
    return peak_extra_bytes(lambda: fn(*inputs))


def run(quick: bool, ops: tuple[str, ...] = OPS, console: Console | None = None) -> list[dict]:
    steady_state_allocator()
    console = console or Console()
    with console.status("copy bandwidth"):
        bandwidth = copy_bandwidth()
    rows = []
    for op in ops:
        for case in importlib.import_module(f"fastrlhf.bench.{op}").cases(quick):
            with console.status(f"{case.op} {case.shape}"):
                rows.append(measure(case, bandwidth))
    return rows


def table(rows: list[dict]) -> Table:
    out = Table(title="fastrlhf bench (CPU, one process: fused vs references on the same inputs)")
    for column in ("op", "shape", "reference", "ref time", "fused time", "speed-up", "ref peak", "fused peak",
                   "achieved", "copy", "x floor"):
        out.add_column(column, justify="left" if column in ("op", "shape", "reference") else "right")
    for row in rows:
        for name, ref in row["references"].items():
            out.add_row(row["op"], row["shape"], name, _time(ref["seconds"]), _time(row["fused_s"]),
                        f"{ref['speedup']:.1f}x", _mib(ref["peak_bytes"]), _mib(row["fused_peak_bytes"]),
                        f"{row['achieved_bytes_per_s'] / 1e9:.1f} GB/s", f"{row['copy_bytes_per_s'] / 1e9:.1f} GB/s",
                        f"{row['fused_s'] / row['floor_s']:.2f}")
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Speed-up over the first reference against the case's x (e.g. T), one line per op and reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        if row["x"] is not None:
            for name, ref in row["references"].items():
                lines.setdefault((row["op"], name), []).append((row["x"], ref["speedup"]))
    for (op, name), points in lines.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=f"{op} vs {name}")
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (or tokens)", ylabel="speed-up (x)",
           title="fastrlhf: fused vs reference, CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    console = Console(width=160)
    ops = ("integrations",) if args.integrations else tuple(args.ops) if args.ops else OPS
    rows = run(args.quick, ops, console)
    console.print(table(rows))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2))
        plot(rows, path.with_suffix(".png"))
        console.print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def _time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f} MiB"
