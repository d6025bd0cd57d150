"""The measurements that ``fastrlhf bench`` reports: peak memory, timing, the copy floor."""

import time

import pytest
import torch

from fastrlhf.bench import measure


@pytest.mark.parametrize("mib", [8, 64])
def test_peak_extra_bytes_sees_a_known_allocation(mib):
    peak = measure.peak_extra_bytes(lambda: torch.ones(mib * 2**18))
    assert abs(peak / 2**20 - mib) < 1.5, peak / 2**20


def test_peak_counts_freed_temporaries():

    def temporary_then_small():
        big = torch.ones(32 * 2**18)
        del big
        return torch.ones(10)

    assert measure.peak_extra_bytes(temporary_then_small) / 2**20 > 30


def test_seconds_measures_the_median():
    assert 0.004 < measure.seconds(lambda: time.sleep(0.005), budget=0.05) < 0.02


def test_copy_bandwidth_is_plausible():
    assert 0.5e9 < measure.copy_bandwidth(64 << 20) < 1e12
