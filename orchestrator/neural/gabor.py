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


def fast_length(n: int) -> int:
    """The smallest m >= n whose only prime factors are 2, 3 and 5 (FFT lengths that are fast)."""
    m = int(n)
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


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
        self.half = max(h for _, _, h in kernels)
        size = 2 * self.half + 1
        bank = torch.zeros(2 * len(kernels), size, size)
        for k, (even, odd, h) in enumerate(kernels):
            sl = slice(self.half - h, self.half + h + 1)
            bank[2 * k, sl, sl], bank[2 * k + 1, sl, sl] = even, odd
        self.register_buffer("bank", bank)
        self.grid = int(grid)
        self.channels = int(channels)
        self._spectra: dict[tuple[int, int], torch.Tensor] = {}

    def _spectrum(self, h: int, w: int) -> torch.Tensor:
        """FFT of the filter bank on an (h, w) grid, centred at the origin (cached per size)."""
        if (h, w) not in self._spectra:
            grid = torch.zeros(self.bank.shape[0], h, w, dtype=torch.float32)
            size = self.bank.shape[-1]
            grid[:, :size, :size] = self.bank
            grid = torch.roll(grid, shifts=(-self.half, -self.half), dims=(1, 2))
            self._spectra[(h, w)] = torch.fft.rfft2(grid)
        return self._spectra[(h, w)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Filtering by FFT on a reflect-padded image: one transform for the whole bank.

        When the padding covers the filters' half-width, the transform is zero-padded further to a
        length with small prime factors (62 -> 64 for 32 x 32 images): the cropped responses are
        the same, and the transforms several times faster than at a length with a large prime.
        """
        grey = images.mean(dim=1) - 0.5
        H, W = grey.shape[-2:]
        pad = min(self.half, H - 1, W - 1)
        padded = nn.functional.pad(grey[:, None], (pad,) * 4, mode="reflect")[:, 0].to(torch.float32)
        h, w = padded.shape[-2:]
        if pad == self.half:  # no circular wrap reaches the crop, so extra zeros change nothing
            h, w = fast_length(h), fast_length(w)
        resp = torch.fft.irfft2(torch.fft.rfft2(padded, s=(h, w))[:, None] * self._spectrum(h, w)[None], s=(h, w))
        resp = resp[..., pad:pad + H, pad:pad + W]
        energy = resp[:, 0::2] ** 2 + resp[:, 1::2] ** 2
        return nn.functional.adaptive_avg_pool2d(energy, self.grid).flatten(1).to(images.dtype)
