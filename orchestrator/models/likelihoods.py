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

    def outcome_grid(self, means: torch.Tensor, weights: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None) -> "OutcomeGrid":
        """The outcomes the design sums over, sized for all component means in play.

        Poisson: counts 0..K where K covers the weighted 99.9% quantile of the rates (the tail beyond
        is folded into the last outcome); when K is large, exact counts 0..11 plus ~20 bins
        equally spaced in sqrt(count) (the variance-stabilised scale), so the cost stays ~32
        outcomes whatever the rates. Gaussian: a grid spanning every component's +-5 SD.
        """
        dtype = torch.float64
        if self.kind in ("bernoulli", "binomial"):
            return OutcomeGrid(torch.arange(self.n + 1, dtype=dtype))
        if self.kind == "poisson":
            m = means.detach().reshape(-1).clamp_min(0.0)
            if weights is not None and m.numel() > 1:
                w = weights.detach().reshape(-1).to(dtype)
                order = torch.argsort(m)
                cw = torch.cumsum(w[order], 0) / w.sum()
                hi = float(m[order][int(torch.searchsorted(cw, torch.tensor([0.999], dtype=dtype)).clamp(max=m.numel() - 1))])
            else:
                hi = float(m.max())
            k = int(math.ceil(hi + 6 * math.sqrt(hi + 1) + 6))
            if k + 1 <= POISSON_EXACT_MAX:
                return OutcomeGrid(torch.arange(k + 1, dtype=dtype))
            r = torch.linspace(math.sqrt(POISSON_EXACT_HEAD), math.sqrt(k), POISSON_TAIL_BINS + 1, dtype=dtype)
            edges = torch.unique(torch.round(r * r))
            return OutcomeGrid(torch.arange(POISSON_EXACT_HEAD, dtype=dtype), tail_edges=edges)
        assert noise is not None
        s = noise.detach()
        lo = float((means.detach() - 5 * s).min())
        hi = float((means.detach() + 5 * s).max())
        grid = torch.linspace(lo, hi, GAUSSIAN_GRID, dtype=dtype)
        return OutcomeGrid(grid, spacing=grid[1] - grid[0])

    def outcome_log_probs(self, mean: torch.Tensor, grid: "OutcomeGrid", noise: torch.Tensor | None = None,
                          compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """log P(outcome k | mean) for every outcome of `grid` (last dim); each row sums to 1.

        Each kind's log density is linear in a few features of the mean (e.g. binomial:
        y logit(p) + n log(1-p) + log C(n, y)), so the whole (..., K) table is one matrix product.
        """
        ys = grid.values
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
            assert noise is not None and grid.spacing is not None
            sd = noise.clamp_min(EPS)
            inv = 1.0 / (sd * sd)
            feats = torch.stack([-0.5 * inv, mean * inv, -0.5 * mean * mean * inv - torch.log(sd)], -1)
            basis = torch.stack([ys * ys, ys, torch.ones_like(ys)])
            const = torch.zeros_like(ys)
        else:
            raise ValueError(f"unknown response kind {self.kind!r}")
        ones = torch.ones(feats.shape[:-1] + (1,), dtype=feats.dtype)
        feats = torch.cat([feats, ones], -1).reshape(-1, basis.shape[0] + 1)
        basis = torch.cat([basis, const.unsqueeze(0)], 0)
        lp = (feats.to(compute_dtype) @ basis.to(compute_dtype)).reshape(*shape, ys.shape[0])
        if self.kind == "poisson":
            head = lp.exp().sum(-1, keepdim=True)
            tail_mass = (1.0 - head).clamp_min(0.0)
            if grid.tail_edges is None:
                # fold P(Y >= K) into the last count so each row is a distribution
                last = torch.log((lp[..., -1:].exp() + tail_mass).clamp_min(torch.finfo(lp.dtype).tiny))
                lp = torch.cat([lp[..., :-1], last], dim=-1)
            else:
                lp = torch.cat([lp, self._tail_bins(mean, grid.tail_edges, tail_mass, lp.dtype)], dim=-1)
        elif self.kind == "gaussian":
            lp = lp - torch.logsumexp(lp, dim=-1, keepdim=True)  # normalise the discretised density
        return lp

    @staticmethod
    def _tail_bins(mean: torch.Tensor, edges: torch.Tensor, tail_mass: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """log P(count in bin j) for bins [e_j, e_j+1) (last open): the exact tail mass split across
        bins by the Anscombe normal approximation 2 sqrt(Y + 3/8) ~ N(2 sqrt(lam + 3/8), 1)."""
        lam = mean.clamp_min(EPS).to(dtype).unsqueeze(-1)
        e = edges.to(dtype)
        z = 2 * torch.sqrt(e - 0.5 + 0.375) - 2 * torch.sqrt(lam + 0.375)
        cdf = torch.special.ndtr(z)  # (..., B+1)
        upper = torch.cat([cdf[..., 1:], torch.ones_like(cdf[..., :1])], -1)
        mass = (upper - cdf).clamp_min(0.0)
        # a geometric floor keeps the split defined when every bin underflows (tail mass ~ 0 then)
        floor = torch.finfo(dtype).tiny * torch.pow(torch.tensor(0.5, dtype=dtype), torch.arange(e.shape[0], dtype=dtype))
        mass = mass + floor
        share = mass / mass.sum(-1, keepdim=True)
        return torch.log((tail_mass * share).clamp_min(torch.finfo(dtype).tiny))


POISSON_EXACT_MAX = 40
POISSON_EXACT_HEAD = 12
POISSON_TAIL_BINS = 20
GAUSSIAN_GRID = 48


@dataclass(frozen=True)
class OutcomeGrid:
    """Outcomes to sum over: exact values (+ Gaussian spacing) and, for large Poisson rates, tail bins."""

    values: torch.Tensor
    spacing: torch.Tensor | None = None
    tail_edges: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.values.shape[0]) + (0 if self.tail_edges is None else int(self.tail_edges.shape[0]))


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
