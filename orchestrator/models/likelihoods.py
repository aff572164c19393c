"""Response likelihoods: map a model's mean (p, rate or mean) to a distribution over the response.

The design code needs, for every candidate stimulus, the probability of every possible response.
Discrete kinds expose an outcome grid directly (Poisson truncated with the tail folded into the last
outcome); the Gaussian kind is discretised on a grid spanning the predictive range, so one exact
sum over outcomes serves every kind.
"""
from __future__ import annotations

import functools
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
                if m.numel() > QUANTILE_SAMPLE:  # a strided subsample sets the truncation as well
                    step = -(-m.numel() // QUANTILE_SAMPLE) | 1  # odd: no aliasing with a power-of-2 batch
                    m, w = m[::step], w[::step]
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
        lp = self._linear_log_density(mean, grid, noise, compute_dtype)
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

    def outcome_probs(self, mean: torch.Tensor, grid: "OutcomeGrid", noise: torch.Tensor | None = None,
                      compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """P(outcome k | mean) on `grid` (last dim; each row sums to 1), built with one exp per entry
        for the design's particle tables (millions of entries per decision).

        Same outcomes as `outcome_log_probs`; the Poisson tail beyond the exact head gets its exact
        mass 1 - P(head) split across the bins in proportion to bin width x pmf at the bin's middle
        (part of the same matrix product as the head, instead of the normal approximation's erf per
        bin). Log densities are floored at LOG_FLOOR[dtype] before the exp: a float32 exp whose
        result is subnormal runs ~10x slower, and e^-75 is zero for every sum the design takes.
        """
        lp = self._linear_log_density(mean, grid, noise, compute_dtype, with_tail=True)
        inplace = not lp.requires_grad
        if self.kind == "gaussian":
            lp = lp.sub_(lp.amax(-1, keepdim=True)) if inplace else lp - lp.amax(-1, keepdim=True).detach()
        floor = LOG_FLOOR[lp.dtype]
        p = lp.clamp_min_(floor).exp_() if inplace else lp.clamp_min(floor).exp()
        if self.kind == "gaussian":
            return p / p.sum(-1, keepdim=True)
        if self.kind != "poisson":
            return p
        h = grid.values.shape[0]
        if grid.tail_edges is None:  # fold P(Y >= K) into the last count
            tail_mass = (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0)
            return torch.cat([p[..., :-1], p[..., -1:] + tail_mass], dim=-1)
        head, tail = p[..., :h], p[..., h:]
        # (the floor on the bins' sum keeps the gradient finite when the tail is empty: it is ~0 then)
        scale = (1.0 - head.sum(-1, keepdim=True)).clamp_min(0.0) / tail.sum(-1, keepdim=True).clamp_min(1e-15)
        if inplace:
            tail.mul_(scale)
            return p
        return torch.cat([head, tail * scale], dim=-1)

    def _linear_log_density(self, mean: torch.Tensor, grid: "OutcomeGrid", noise: torch.Tensor | None,
                            compute_dtype: torch.dtype, with_tail: bool = False) -> torch.Tensor:
        """The unnormalised log density at every exact outcome of `grid`, linear in a few features of
        the mean: one matrix product (Poisson: one multiply-add; with `with_tail`, its tail bins too:
        log(width) + log pmf at the bin's middle count)."""
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
            ys, const = grid.poisson_counts
            if not with_tail and grid.tail_edges is not None:
                ys, const = ys[: grid.values.shape[0]], const[: grid.values.shape[0]]
            # y log(lam) - lam + const_y: one broadcast multiply-add (a matrix product with an inner
            # dimension of 3 is ~2x slower on CPU)
            lam = lam.to(compute_dtype).unsqueeze(-1)
            return torch.addcmul(const.to(compute_dtype) - lam, torch.log(lam), ys.to(compute_dtype))
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
        return (feats.to(compute_dtype) @ basis.to(compute_dtype)).reshape(*shape, ys.shape[0])

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

    @staticmethod
    def _tail_shares(mean: torch.Tensor, edges: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The split of `_tail_bins` (shares summing to 1 over the bins), without logs or subnormals."""
        lam = mean.clamp_min(EPS).to(dtype).unsqueeze(-1)
        e = edges.to(dtype)
        cdf = torch.special.ndtr(2 * torch.sqrt(e - 0.5 + 0.375) - 2 * torch.sqrt(lam + 0.375))  # (..., B+1)
        mass = torch.cat([cdf[..., 1:], torch.ones_like(cdf[..., :1])], -1).sub_(cdf) if not cdf.requires_grad \
            else torch.cat([cdf[..., 1:], torch.ones_like(cdf[..., :1])], -1) - cdf
        # a small geometric floor keeps the split defined when every bin underflows (tail mass ~ 0 then)
        floor = math.exp(LOG_FLOOR[dtype]) * torch.pow(torch.tensor(0.5, dtype=dtype), torch.arange(e.shape[0], dtype=dtype))
        mass = mass.clamp_min(0.0) + floor
        return mass / mass.sum(-1, keepdim=True)


POISSON_EXACT_MAX = 40
POISSON_EXACT_HEAD = 12
POISSON_TAIL_BINS = 20
GAUSSIAN_GRID = 48
#: at most this many (strided) means set the weighted rate quantile of a Poisson outcome grid
QUANTILE_SAMPLE = 8192
#: log probabilities below this are floored in `outcome_probs` (exp stays in the normal range)
LOG_FLOOR = {torch.float32: -75.0, torch.float64: -700.0}


@dataclass(frozen=True)
class OutcomeGrid:
    """Outcomes to sum over: exact values (+ Gaussian spacing) and, for large Poisson rates, tail bins."""

    values: torch.Tensor
    spacing: torch.Tensor | None = None
    tail_edges: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.values.shape[0]) + (0 if self.tail_edges is None else int(self.tail_edges.shape[0]))

    @functools.cached_property
    def poisson_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Representative counts y and constants -lgamma(y + 1) (+ log bin width for the tail bins:
        their middle count) of every outcome, computed once per grid for every model's table."""
        ys = self.values
        const = -torch.lgamma(ys + 1)
        if self.tail_edges is not None:
            e = self.tail_edges.to(ys.dtype)
            last = e[-1:] - e[-2:-1] if e.shape[0] > 1 else torch.ones(1, dtype=e.dtype)
            width = torch.cat([e[1:] - e[:-1], last])
            mid = e + (width - 1) / 2
            ys = torch.cat([ys, mid])
            const = torch.cat([const, torch.log(width) - torch.lgamma(mid + 1)])
        return ys, const


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
