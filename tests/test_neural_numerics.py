"""Denormal flushing for the networks' CPU work: on inside the block, nested blocks included, off after."""
from __future__ import annotations

import torch

from orchestrator.neural.numerics import flushed_denormals


def _flushing() -> bool:
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a float32 subnormal
    return float(tiny * 1.0) == 0.0


def test_nested_blocks_keep_flushing_until_the_outermost_ends() -> None:
    assert not _flushing()
    with flushed_denormals():
        assert _flushing()
        with flushed_denormals():
            assert _flushing()
        assert _flushing()  # the inner block's end must not switch IEEE arithmetic back on
    assert not _flushing()
