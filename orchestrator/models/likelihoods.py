"""Response likelihoods: map a model's mean (p, rate or mean) to a distribution over the response.

The design code needs, for every candidate stimulus, the probability of every possible response.
Discrete kinds expose an outcome grid directly (Poisson truncated with the tail folded into the last
outcome); the Gaussian kind is discretised on a grid spanning the predictive range, so one exact
sum over outcomes serves every kind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

EPS = 1e-9


def _field(spec: Any, name: str, default: Any = None) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(name, default)
    return getattr(spec, name, default)


@dataclass(frozen=True)
class Likelihood:
    """Observation model of one response kind. `noise_param` names the Gaussian SD parameter."""

    kind: str
    n: int = 1
    noise_param: str = "sigma"

    # -- density ---------------------------------------------------------------------------------
    def log_prob(self, y: torch.Tensor, mean: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """log p(y | mean) elementwise (broadcasting)."""
        if self.kind in ("bernoulli", "binomial"):
            p = mean.clamp(EPS, 1 - EPS)
            n = float(self.n)
            logc = torch.lgamma(torch.as_tensor(n + 1, dtype=p.dtype)) - torch.lgamma(y + 1) - torch.lgamma(n - y + 1)
            return logc + y * torch.log(p) + (n - y) * torch.log1p(-p)
        if self.kind == "poisson":
            lam = mean.clamp_min(EPS)
            return y * torch.log(lam) - lam - torch.lgamma(y + 1)
        if self.kind == "gaussian":
            if noise is None:
                raise ValueError(f"gaussian likelihood needs the noise parameter {self.noise_param!r}")
            s = noise.clamp_min(EPS)
            return -0.5 * ((y - mean) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)
        raise ValueError(f"unknown response kind {self.kind!r}")

    def sample(self, mean: float, rng: np.random.Generator, noise: float | None = None) -> float:
        """One simulated response for a simulated subject."""
        if self.kind == "bernoulli":
            return float(rng.random() < min(max(mean, 0.0), 1.0))
        if self.kind == "binomial":
            return float(rng.binomial(self.n, min(max(mean, 0.0), 1.0)))
        if self.kind == "poisson":
            return float(rng.poisson(max(mean, 0.0)))
        if self.kind == "gaussian":
            if noise is None:
                raise ValueError(f"gaussian truth needs the noise parameter {self.noise_param!r}")
            return float(rng.normal(mean, noise))
        raise ValueError(f"unknown response kind {self.kind!r}")

    # -- outcome grid for the design -------------------------------------------------------------
    @property
    def discrete(self) -> bool:
        return self.kind != "gaussian"

    def outcomes(self, means: torch.Tensor, noise: torch.Tensor | None = None, k_max: int = 4096,
                 grid_points: int = 48) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Response values to sum over, and (gaussian only) the grid spacing.

        `means` are all component means in play (any shape); Poisson outcomes are truncated where the
        largest rate has negligible tail mass; the Gaussian grid spans every component's +-5 SD.
        """
        dtype = means.dtype
        if self.kind in ("bernoulli", "binomial"):
            return torch.arange(self.n + 1, dtype=dtype), None
        if self.kind == "poisson":
            m = float(means.detach().max().clamp_min(0.0))
            k = int(min(k_max, math.ceil(m + 8 * math.sqrt(m + 1) + 8)))
            return torch.arange(k + 1, dtype=dtype), None
        assert noise is not None
        s = noise.detach()
        lo = float((means.detach() - 5 * s).min())
        hi = float((means.detach() + 5 * s).max())
        grid = torch.linspace(lo, hi, grid_points, dtype=dtype)
        return grid, grid[1] - grid[0]

    def outcome_log_probs(self, mean: torch.Tensor, ys: torch.Tensor, noise: torch.Tensor | None = None,
                          spacing: torch.Tensor | None = None,
                          compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """log P(outcome k | mean) on the grid `ys` (last dim K); rows sum to 1 (Poisson tail folded).

        Each kind's log density is linear in a few features of the mean (e.g. binomial:
        y logit(p) + n log(1-p) + log C(n, y)), so the whole (..., K) table is one matrix product.
        """
        shape = mean.shape
        if self.kind in ("bernoulli", "binomial"):
            p = mean.clamp(EPS, 1 - EPS)
            log1mp = torch.log1p(-p)
            feats = torch.stack([torch.log(p) - log1mp, log1mp], -1)
            basis = torch.stack([ys, torch.full_like(ys, float(self.n))])
            n = torch.as_tensor(float(self.n), dtype=ys.dtype)
            const = torch.lgamma(n + 1) - torch.lgamma(ys + 1) - torch.lgamma(n - ys + 1)
        elif self.kind == "poisson":
            lam = mean.clamp_min(EPS)
            feats = torch.stack([torch.log(lam), -lam], -1)
            basis = torch.stack([ys, torch.ones_like(ys)])
            const = -torch.lgamma(ys + 1)
        elif self.kind == "gaussian":
            assert noise is not None and spacing is not None
            s = noise.clamp_min(EPS)
            inv = 1.0 / (s * s)
            feats = torch.stack([-0.5 * inv, mean * inv, -0.5 * mean * mean * inv - torch.log(s)], -1)
            basis = torch.stack([ys * ys, ys, torch.ones_like(ys)])
            const = torch.zeros_like(ys)
        else:
            raise ValueError(f"unknown response kind {self.kind!r}")
        ones = torch.ones(feats.shape[:-1] + (1,), dtype=feats.dtype)
        feats = torch.cat([feats, ones], -1).reshape(-1, basis.shape[0] + 1)
        basis = torch.cat([basis, const.unsqueeze(0)], 0)
        lp = (feats.to(compute_dtype) @ basis.to(compute_dtype)).reshape(*shape, ys.shape[0])
        if self.kind == "poisson":
            # fold the tail mass P(Y >= K-1) into the last outcome so each row is a distribution
            head = torch.logsumexp(lp[..., :-1], dim=-1, keepdim=True)
            tail = torch.log1p(-head.exp().clamp(max=1 - 1e-12))
            lp = torch.cat([lp[..., :-1], tail], dim=-1)
        elif self.kind == "gaussian":
            lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)  # normalise the discretised density
        return lp


def make_likelihood(response: Any) -> Likelihood:
    """Likelihood from the protocol's `response:` section."""
    kind = str(_field(response, "kind"))
    if kind == "binomial":
        n = _field(response, "n")
        if n is None or int(n) < 1:
            raise ValueError("response.n: binomial responses need n >= 1")
        return Likelihood("binomial", int(n))
    if kind in ("bernoulli", "poisson", "gaussian"):
        noise = _field(response, "noise_param", None) or "sigma"
        return Likelihood(kind, 1, noise)
    raise ValueError(f"response.kind: unknown response kind {kind!r} (bernoulli|binomial|poisson|gaussian)")
