"""Exact inference on a parameter grid: the reference every approximate path is measured against.

Each model's free parameters are laid on an equal-prior-mass grid (the prior quantiles at
(i + 1/2) / n in every dimension, so every grid point carries prior weight 1/n^p). Bayes' rule is
then a weighted sum: the posterior weights are w_g p(y | g, x) normalised, and the log evidence is
log Z_t = log Z_{t-1} + log sum_g w_g p(y_t | g, x_t) - exact up to the quadrature. One update
costs O(grid points) whatever the response value, with no random draws: the state is a function
of the observation sequence alone.

When the grid is used: the posteriors (`grid_inference_applies`) whenever every candidate is
parametric (no Gaussian process) with at most `MAX_GRID_PARAMS` free parameters; the exact design
(`grid_plan`) when in addition the design proposes one stimulus at a time, the stimulus space
(continuous dimensions discretised by the exact-grid design) has at most `MAX_STIMULI` points, and
the outcome tables fit: sum over models of grid points x stimuli x outcomes <= `MAX_TABLE_ENTRIES`
float32 entries (128 MiB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.models.candidate import Candidate
from orchestrator.models.views import ParticleView

DTYPE = torch.float64
#: grid points per parameter dimension, by the number of free parameters (64^2 = 4096 = 16^3)
GRID_POINTS = {0: 1, 1: 512, 2: 64, 3: 16}
MAX_GRID_PARAMS = 3
MAX_STIMULI = 20_000
MAX_TABLE_ENTRIES = 2 ** 25
#: points below exp(-PRUNE) x the largest weight are left out of predictive views (weight < 1e-13)
PRUNE = 30.0


def grid_params(candidate: Candidate) -> tuple[str, ...]:
    """The parameters laid on the grid: free parameters whose prior is a distribution (a
    `dist: fixed` prior is a constant, not an axis)."""
    return tuple(p for p in candidate.free_params if not candidate.priors[p].fixed)


class GridPosterior:
    """Posterior weights of one parametric model on a fixed parameter grid (exact evidence)."""

    def __init__(self, candidate: Candidate, points_per_dim: int | None = None) -> None:
        if candidate.is_gp:
            raise ValueError("the Gaussian-process candidate has no parameter grid")
        self.candidate = candidate
        self.names = grid_params(candidate)
        if len(self.names) > MAX_GRID_PARAMS:
            raise ValueError(f"{candidate.name}: {len(self.names)} free parameters; the grid takes at most "
                             f"{MAX_GRID_PARAMS}")
        n = int(points_per_dim or GRID_POINTS[len(self.names)])
        u = (torch.arange(n, dtype=DTYPE) + 0.5) / n
        axes = [candidate.priors[p].icdf(u).to(DTYPE) for p in self.names]
        mesh = torch.meshgrid(*axes, indexing="ij") if axes else []
        self.theta: dict[str, torch.Tensor] = {p: m.reshape(-1).clone() for p, m in zip(self.names, mesh)}
        self.size = int(self.theta[self.names[0]].shape[0]) if self.names else 1
        for p in candidate.free_params:
            if p not in self.theta:  # `dist: fixed`: the same value at every grid point
                self.theta[p] = torch.full((self.size,), float(candidate.priors[p].args["value"]), dtype=DTYPE)
        self.logw = torch.full((self.size,), -math.log(self.size), dtype=DTYPE)
        self.log_evidence = 0.0
        self.n_observations = 0

    def loglik(self, x: torch.Tensor, y: float) -> torch.Tensor:
        """log p(y | g, x) for every grid point g; invalid parameter regions give -inf."""
        X = x.reshape(1, -1).to(DTYPE)
        mean = self.candidate.mean(X, self.theta)[:, 0]
        noise = self.candidate.noise(self.theta)
        ll = self.candidate.likelihood.log_prob(torch.tensor(float(y), dtype=DTYPE), mean, noise)
        return torch.nan_to_num(ll, nan=-math.inf, posinf=-math.inf)

    def update(self, x: torch.Tensor, y: float) -> None:
        """Absorb one observation: one weighted sum, O(grid points)."""
        new = self.logw + self.loglik(x, y)
        total = torch.logsumexp(new, 0)
        self.n_observations += 1
        if not torch.isfinite(total):
            self.log_evidence = -math.inf  # impossible under every grid point; weights kept
            return
        self.log_evidence += float(total)
        self.logw = new - total

    def weights(self) -> torch.Tensor:
        return self.logw.exp()

    def active(self) -> torch.Tensor:
        """Indices of grid points whose weight matters (above exp(-PRUNE) x the largest)."""
        return torch.nonzero(self.logw >= self.logw.max() - PRUNE).reshape(-1)

    def predictive(self, max_components: int | None = None, gen: torch.Generator | None = None) -> Any:
        """The posterior as a mixture over the grid points that carry weight; with max_components
        and more points than that, a systematic resample of that many (bounds the design's cost)."""
        idx = self.active()
        logw = self.logw[idx] - torch.logsumexp(self.logw[idx], 0)
        if max_components is not None and idx.numel() > max_components:
            w = torch.softmax(logw, 0)
            cdf = torch.cumsum(w, 0)
            cdf[-1] = 1.0
            u0 = torch.rand(1, dtype=DTYPE, generator=gen) if gen is not None else torch.full((1,), 0.5, dtype=DTYPE)
            pick = torch.searchsorted(cdf, (u0 + torch.arange(max_components, dtype=DTYPE)) / max_components)
            idx = idx[pick.clamp(max=idx.numel() - 1)]
            logw = torch.full((max_components,), -math.log(max_components), dtype=DTYPE)
        theta = {p: v[idx] for p, v in self.theta.items()}
        return ParticleView(self.candidate, theta, logw)

    def param_moments(self) -> dict[str, dict[str, float]]:
        w = self.weights()
        out = {}
        for p in self.candidate.free_params:
            v = self.theta[p]
            m = float((w * v).sum())
            out[p] = {"mean": m, "sd": float(((w * (v - m) ** 2).sum()).clamp_min(0).sqrt())}
        for p, v in self.candidate.fixed.items():
            out[p] = {"mean": float(v), "sd": 0.0}
        return out

    def summary(self) -> dict[str, Any]:
        ess = float(torch.exp(-torch.logsumexp(2 * self.logw, 0)))
        return {"kind": "grid", "log_evidence": float(self.log_evidence), "ess": ess,
                "particles": self.size, "resamples": 0, "params": self.param_moments()}


@dataclass(frozen=True)
class GridPlan:
    """Whether the exact grid applies, and why not when it does not."""

    ok: bool
    reason: str
    stimuli: int = 0
    table_entries: int = 0


def grid_points(candidate: Candidate) -> int:
    """Number of grid points of a candidate (GRID_POINTS[p] ** p)."""
    p = len(grid_params(candidate))
    return GRID_POINTS[p] ** p if p else 1


def outcome_count_floor(candidate: Candidate) -> int:
    """Fewest outcomes a table needs for this response kind (the exact count is known later)."""
    lik = candidate.likelihood
    return lik.n + 1 if lik.kind in ("bernoulli", "binomial") else 32


def grid_inference_applies(candidates: list[Candidate]) -> bool:
    """Exact grid posteriors are used for every model when all are parametric with <= 3 free
    parameters, whatever the stimulus space (an update costs O(grid points))."""
    return all(not c.is_gp and len(grid_params(c)) <= MAX_GRID_PARAMS for c in candidates)


def grid_plan(candidates: list[Candidate], n_stimuli: int | None, batch_size: int = 1) -> GridPlan:
    """The rule for the exact path (see the module docstring). `n_stimuli` None = continuous space."""
    for c in candidates:
        if c.is_gp:
            return GridPlan(False, f"model {c.name!r} is a Gaussian process")
        if len(grid_params(c)) > MAX_GRID_PARAMS:
            return GridPlan(False, f"model {c.name!r} has {len(grid_params(c))} free parameters "
                                   f"(the grid takes at most {MAX_GRID_PARAMS})")
    if batch_size != 1:
        return GridPlan(False, f"design.batch_size is {batch_size} (the exact grid proposes one stimulus)")
    if n_stimuli is None:
        return GridPlan(False, "the stimulus space has continuous dimensions")
    if n_stimuli > MAX_STIMULI:
        return GridPlan(False, f"{n_stimuli} stimuli (limit {MAX_STIMULI})")
    entries = sum(grid_points(c) * n_stimuli * outcome_count_floor(c) for c in candidates)
    if entries > MAX_TABLE_ENTRIES:
        return GridPlan(False, f"outcome tables of {entries} entries (limit {MAX_TABLE_ENTRIES})", n_stimuli, entries)
    return GridPlan(True, "every model has <= 3 parameters and the stimulus space is small and discrete",
                    n_stimuli, entries)


__all__ = ["GridPosterior", "GridPlan", "grid_plan", "grid_inference_applies", "grid_params", "grid_points", "GRID_POINTS", "MAX_GRID_PARAMS",
           "MAX_STIMULI", "MAX_TABLE_ENTRIES"]
