"""fastrlhf.masked_whiten against verl's formula (fastrlhf.reference.masked_whiten)."""

import math

import pytest
import torch

import fastrlhf
from fastrlhf import reference


def inputs(B, T, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, generator=g, dtype=dtype) * 3 + 1, torch.rand(B, T, generator=g) > 0.3


def test_masked_whiten_matches_verl():
    x, mask = inputs(8, 50, seed=21)
    for shift_mean in (True, False):
        torch.testing.assert_close(fastrlhf.masked_whiten(x, mask, shift_mean=shift_mean),
                                   reference.masked_whiten(x, mask, shift_mean=shift_mean))


def test_masked_whiten_ignores_garbage():
    x, mask = inputs(4, 30, seed=22)
    dirty = x.masked_fill(~mask, math.nan)
    torch.testing.assert_close(fastrlhf.masked_whiten(dirty, mask)[mask], fastrlhf.masked_whiten(x, mask)[mask])



def test_bad_input_names_the_argument():
    x, mask = inputs(3, 4, seed=23)
    with pytest.raises(TypeError, match="x"):
        fastrlhf.masked_whiten(mask, mask)
    with pytest.raises(ValueError, match="mask"):
        fastrlhf.masked_whiten(x, mask[:1])
