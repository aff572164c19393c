"""The built-in "V1" hypothesis: a bank of quadrature Gabor energy filters pooled on a coarse grid.

Each feature is the local energy (squared even + squared odd response) of one orientation and
spatial frequency, averaged over one cell of a ``grid x grid`` partition of the image: the classic
complex-cell model (Adelson & Bergen 1985). Settings: ``orientations`` (count), ``frequencies``
(cycles per pixel), ``grid``, ``sigma_cycles`` (envelope SD in wavelengths).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class GaborEnergy(nn.Module):
    """Quadrature-pair energy features: (B, C, H, W) images -> (B, orientations x frequencies x grid^2)."""

    def __init__(self, orientations: int = 8, frequencies: Sequence[float] = (0.1, 0.2), grid: int = 4,
                 sigma_cycles: float = 0.6, channels: int = 1) -> None:
        super().__init__()
        if int(orientations) < 1 or not frequencies or int(grid) < 1:
            raise ValueError("orientations, frequencies and grid must be positive")
        if any(not 0 < float(f) <= 0.5 for f in frequencies):
            raise ValueError(f"frequencies must be in (0, 0.5] cycles/pixel, got {list(frequencies)}")
        kernels = []
        for f in frequencies:
            sigma = float(sigma_cycles) / float(f)
            half = max(2, int(math.ceil(2.5 * sigma)))
            r = torch.arange(-half, half + 1, dtype=torch.float32)
            yy, xx = torch.meshgrid(r, r, indexing="ij")
            for k in range(int(orientations)):
                theta = math.pi * k / int(orientations)
                u = xx * math.cos(theta) + yy * math.sin(theta)
                env = torch.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
                even = env * torch.cos(2 * math.pi * float(f) * u)
                odd = env * torch.sin(2 * math.pi * float(f) * u)
                even = even - even.mean()
                kernels.append((even / even.norm(), odd / odd.norm(), half))
        self.kernels = nn.ParameterList()
        self._pads: list[int] = []
        for even, odd, half in kernels:
            w = torch.stack([even, odd]).unsqueeze(1).repeat(1, 1, 1, 1)
            self.kernels.append(nn.Parameter(w, requires_grad=False))
            self._pads.append(half)
        self.grid = int(grid)
        self.channels = int(channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grey = images.mean(dim=1, keepdim=True) - 0.5
        outs = []
        for w, pad in zip(self.kernels, self._pads):
            resp = nn.functional.conv2d(nn.functional.pad(grey, (pad,) * 4, mode="reflect"), w.to(grey.dtype))
            energy = (resp ** 2).sum(dim=1, keepdim=True)
            outs.append(nn.functional.adaptive_avg_pool2d(energy, self.grid))
        return torch.cat(outs, dim=1).flatten(1)
