"""Time, peak memory and the copy floor of a piece of work, measured in this process on the CPU."""

from __future__ import annotations

import ctypes
import statistics
import time
from typing import Callable

import torch

_M_MMAP_THRESHOLD = -3


def fix_allocator() -> None:
    """Serve every allocation of 128 KiB or more by mmap, so freed tensors go back to the OS at once.

    glibc otherwise raises its mmap threshold after large frees and keeps the memory, which would hide
    a later region's peak behind pages that are already resident.
    """
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 17)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Resident memory that ``fn()`` adds at its peak, its result included (call ``fix_allocator`` first)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status("VmRSS:")
    fn()
    return max(0, _status("VmHWM:") - before)


def seconds(fn: Callable[[], object], budget: float = 0.3, max_repeats: int = 50) -> float:
    """Median wall time of ``fn()`` over repeats that fill about ``budget`` seconds, after one warm-up."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    repeats = max(3, min(max_repeats, int(budget / max(first, 1e-6))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_seconds(nbytes: int) -> float:
    """Time to copy ``nbytes`` once (half read, half written) into fresh memory, as a kernel's outputs are."""
    source = torch.empty(max(1, nbytes // 2), dtype=torch.uint8).fill_(1)
    return seconds(lambda: source.clone())
