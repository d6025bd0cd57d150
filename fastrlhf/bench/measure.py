"""Time, peak memory and the copy floor of a piece of work, measured in this process on the CPU."""

from __future__ import annotations

import ctypes
import statistics
import time
from typing import Callable

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(mmap_threshold: int, trim_threshold: int) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


def steady_state_allocator() -> None:
    """Keep freed buffers of up to 32 MiB in the heap for reuse, as glibc does in a training loop once its
    dynamic thresholds have grown, so that timings do not include first-touch page faults of fresh
    memory on every call (costly in a VM) unless a buffer is too large to be reused anyway."""
    _mallopt(32 << 20, 256 << 20)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Resident memory that ``fn()`` adds at its peak, its result included.

    Meanwhile every buffer of 128 KiB or more is mmapped and unmapped when freed, so the peak is not
    hidden behind heap pages that an earlier region left resident. Read from the kernel's resident-set
    high-water mark: exact for large regions, within about 1 MiB for small ones.
    """
    _mallopt(128 << 10, 128 << 10)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back free heap pages, so reusing them counts again
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = _status("VmRSS:")
        fn()
        return max(0, _status("VmHWM:") - before)
    finally:
        steady_state_allocator()


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


def copy_bandwidth(nbytes: int = 512 << 20) -> float:
    """The machine's memory copy bandwidth in bytes/s (read + written), STREAM-style: a copy of
    ``nbytes`` (far beyond the last-level cache) into memory that is already resident, all threads."""
    source = torch.ones(nbytes // 8, dtype=torch.float32)
    target = torch.empty_like(source)
    return 2 * source.nbytes / seconds(lambda: target.copy_(source), budget=1.0, max_repeats=10)
