"""Small convolutional networks whose weights are a function of a seed: example and test hypotheses.

A lab brings its own networks (``module: pkg.mod:Factory`` + ``weights: file``); these exist so the
example protocol, the tests and the benchmark need no downloads and no binary files. ``mixed_cnn``
is a near-miss rival: the weights of ``tiny_cnn(seed)`` mixed ``mix : 1 - mix`` with fresh ones.
"""
from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv(5x5) -> rectify -> conv(3x3) -> rectify -> average pool to grid x grid -> flatten."""

    def __init__(self, channels: int = 1, width: int = 16, grid: int = 4, kernel: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.grid = int(grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(images - 0.5))
        h = torch.relu(self.conv2(h))
        return nn.functional.adaptive_avg_pool2d(h, self.grid).flatten(1)


def _seeded(seed: int, **kwargs: int) -> TinyCNN:
    gen = torch.Generator().manual_seed(int(seed))
    net = TinyCNN(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / (fan_in ** 0.5 if p.dim() > 1 else 10.0))
    return net


def tiny_cnn(seed: int = 0, channels: int = 1, width: int = 16, grid: int = 4, kernel: int = 5) -> TinyCNN:
    """A TinyCNN with Gaussian weights drawn from `seed` (same seed, same network, on any machine)."""
    return _seeded(seed, channels=channels, width=width, grid=grid, kernel=kernel)


def mixed_cnn(seed: int = 0, mix_seed: int = 1, mix: float = 0.95, channels: int = 1, width: int = 16,
              grid: int = 4, kernel: int = 5) -> TinyCNN:
    """tiny_cnn(seed) with every weight replaced by mix * w + sqrt(1 - mix^2) * fresh (a near miss)."""
    base = _seeded(seed, channels=channels, width=width, grid=grid, kernel=kernel)
    other = _seeded(mix_seed, channels=channels, width=width, grid=grid, kernel=kernel)
    with torch.no_grad():
        for p, q in zip(base.parameters(), other.parameters()):
            p.mul_(float(mix)).add_(q, alpha=(1.0 - float(mix) ** 2) ** 0.5)
    return base
