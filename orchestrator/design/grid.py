"""Exact ADO on parameter grids: every stimulus scored by its exact mutual information.

The model posteriors are the exact grid posteriors of orchestrator.models.grid (the design switches
the session's ModelComparison to them, replaying its history). For every candidate stimulus x and
every grid point g the outcome probabilities p(y | g, x) are tabulated once (float32, G x S x K per
model); a decision is then one matrix product per model:

- discriminate:  I(M; Y_x) = sum_m pi_m KL(p_m(.|x) || p(.|x)),  p_m(.|x) = sum_g w_mg p(.|g, x)
- characterize:  I(theta; Y_x | m) = H(p_m(.|x)) - sum_g w_mg H(p(.|g, x))

Candidate stimuli: every point of a discrete space; continuous dimensions are discretised on
`settings.points` evenly spaced design coordinates (log axis honoured; default 101 for one
continuous dimension, 33 for two, 9 beyond). Outcomes: bernoulli / binomial 0..n; Poisson exact counts
0..K (K covers every tabulated rate + 6 SD, the tail folded into K) while the tables fit, else the
binned tail of Likelihood.outcome_grid; Gaussian a grid spanning every mean +-5 SD with spacing at
most half the smallest noise SD (at most 256 outcomes).

Memory bound: sum over models of grid points x stimuli x outcomes <= MAX_TABLE_ENTRIES (2^25 float32
entries, 128 MiB); the rule and the limits are in orchestrator.models.grid. No random draws: the
proposal is a function of the observation history.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from orchestrator.design.base import BaseStrategy, Decision
from orchestrator.models.candidate import build_candidates
from orchestrator.models.grid import MAX_STIMULI, MAX_TABLE_ENTRIES, GridPosterior, grid_plan, grid_points
from orchestrator.models.likelihoods import OutcomeGrid

NEGLIGIBLE = 1e-6
POISSON_EXACT_LIMIT = 2000
GAUSSIAN_MAX_OUTCOMES = 256
CHUNK = 2 ** 22
#: protocols whose outcome tables are kept between sessions of one process (simulations, benchmarks)
TABLE_CACHE = 2
_TABLES: dict[tuple[int, str], tuple[Any, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = {}


def default_points(n_continuous: int) -> int:
    """Discretisation of each continuous dimension for the exact grid."""
    return {0: 1, 1: 101, 2: 33}.get(n_continuous, 9)


def candidate_stimuli(space: Any, points: int | None = None) -> torch.Tensor:
    """All candidate stimuli in design coordinates (S, d): discrete values x continuous grid."""
    n_cont = sum(1 for d in space.dims if d.kind == "continuous")
    n = int(points or default_points(n_cont))
    axes = [torch.linspace(0.0, 1.0, n, dtype=torch.float64) if d.kind == "continuous"
            else torch.arange(int(d.lo), int(d.hi) + 1, dtype=torch.float64) for d in space.dims]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], -1)


def count_stimuli(space: Any, points: int | None = None) -> int:
    """Number of candidate stimuli without building them (validation must not enumerate)."""
    n_cont = sum(1 for d in space.dims if d.kind == "continuous")
    n = int(points or default_points(n_cont))
    total = 1
    for d in space.dims:
        total *= n if d.kind == "continuous" else int(d.hi - d.lo) + 1
    return total


class ExactGridDesign(BaseStrategy):
    """Exact grid ADO (discriminate, then characterize past characterize_threshold, like
    mutual_information). `label` is the strategy name reported in decisions."""

    name = "exact_grid"

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None, mode: str = "auto",
                 label: str | None = None) -> None:
        super().__init__(protocol, seed, settings)
        self.mode = self.settings.get("mode", mode)
        if self.mode not in ("auto", "discriminate", "characterize"):
            raise ValueError(f"design.settings.mode: must be auto, discriminate or characterize, not {self.mode!r}")
        self.label = label
        self.threshold = getattr(protocol.design, "characterize_threshold", None)
        self.target_model = self.settings.get("model")
        self.points = self.settings.get("points")
        self.candidates = build_candidates(protocol)
        n = count_stimuli(self.space, self.points)
        plan = grid_plan(self.candidates, n, self.batch_size)
        if not plan.ok:
            raise ValueError(f"design.strategy: exact_grid cannot run this protocol: {plan.reason}")
        self._Z: torch.Tensor | None = None
        self._tables: list[torch.Tensor] = []
        self._entropy: list[torch.Tensor] = []

    # -- tables ------------------------------------------------------------------------------
    def _outcomes(self, means: list[torch.Tensor], noises: list[torch.Tensor | None]) -> OutcomeGrid:
        lik = self.candidates[0].likelihood
        cells = sum(m.numel() for m in means)
        if lik.kind in ("bernoulli", "binomial"):
            return OutcomeGrid(torch.arange(lik.n + 1, dtype=torch.float64))
        hi = max(float(m.max()) for m in means)
        if lik.kind == "poisson":
            k = int(math.ceil(max(hi, 0.0) + 6 * math.sqrt(max(hi, 0.0) + 1) + 6))
            if k <= POISSON_EXACT_LIMIT and cells * (k + 1) <= MAX_TABLE_ENTRIES:
                return OutcomeGrid(torch.arange(k + 1, dtype=torch.float64))
            return lik.outcome_grid(torch.cat([m.reshape(-1) for m in means]))
        sds = [n.reshape(-1, 1).expand_as(m) for n, m in zip(noises, means)]  # type: ignore[union-attr]
        lo = min(float((m - 5 * s).min()) for m, s in zip(means, sds))
        hi = max(float((m + 5 * s).max()) for m, s in zip(means, sds))
        smallest = min(float(s.min()) for s in sds)
        k = int(min(GAUSSIAN_MAX_OUTCOMES, max(32, math.ceil((hi - lo) / max(smallest / 2, 1e-12))),
                    max(2, MAX_TABLE_ENTRIES // max(cells, 1))))
        grid = torch.linspace(lo, hi, k, dtype=torch.float64)
        return OutcomeGrid(grid, spacing=grid[1] - grid[0])

    def _build(self) -> None:
        """Tabulate p(y | g, x) for every model, grid point and candidate stimulus (once per
        protocol: the last TABLE_CACHE protocols' tables are kept, they depend on nothing else)."""
        key = (id(self.protocol), str(self.points))
        hit = _TABLES.get(key)
        if hit is not None and hit[0] is self.protocol:
            self._Z, self._tables, self._entropy = hit[1], hit[2], hit[3]
            return
        Z = candidate_stimuli(self.space, self.points)
        raw = self.space.design_to_raw(Z)
        thetas = [GridPosterior(c).theta for c in self.candidates]
        means = [c.mean(raw, th) if th else c.mean(raw, {}).reshape(1, -1) for c, th in zip(self.candidates, thetas)]
        means = [torch.nan_to_num(m, nan=0.0) for m in means]
        noises = [c.noise(th) if th else c.noise({}) for c, th in zip(self.candidates, thetas)]
        grid = self._outcomes(means, noises)
        lik = self.candidates[0].likelihood
        self._tables, self._entropy = [], []
        for m, nz in zip(means, noises):
            G, S = m.shape
            K = grid.size
            rows = max(1, CHUNK // max(S * K, 1))
            table = torch.empty((G, S, K), dtype=torch.float32)
            for a in range(0, G, rows):
                b = min(G, a + rows)
                noise = None if nz is None else nz.reshape(-1, 1)[a:b].expand(b - a, S)
                lp = lik.outcome_log_probs(m[a:b], grid, noise, torch.float64)
                table[a:b] = lp.exp().to(torch.float32)
            p = table.clamp_min(1e-30)
            self._entropy.append(-(table * torch.log(p)).sum(-1))
            self._tables.append(table)
        self._Z = Z
        _TABLES[key] = (self.protocol, Z, self._tables, self._entropy)
        while len(_TABLES) > TABLE_CACHE:
            _TABLES.pop(next(iter(_TABLES)))

    # -- scoring -----------------------------------------------------------------------------
    def _mixture(self, m: int, post: GridPosterior) -> torch.Tensor:
        """p_m(y | x) for every candidate stimulus (S, K), float64, over the grid points in play."""
        table = self._tables[m]
        idx = post.active()
        if idx.numel() * 8 > table.shape[0]:  # most points in play: one product, no copy
            w = torch.softmax(post.logw, 0).to(torch.float32)
            return (w @ table.reshape(table.shape[0], -1)).reshape(table.shape[1:]).to(torch.float64)
        w = post.logw[idx].exp()
        w = (w / w.sum()).to(torch.float32)
        sub = table.index_select(0, idx)
        return (w @ sub.reshape(sub.shape[0], -1)).reshape(table.shape[1:]).to(torch.float64)

    @staticmethod
    def _entropy_of(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)

    def scores(self, comparison: Any) -> tuple[torch.Tensor, str, str]:
        """Exact MI of every candidate stimulus (S,), the reason text and the phase's strategy name."""
        comparison.use_grid()
        if self._Z is None:
            self._build()
        names = comparison.model_names
        probs = comparison.log_probabilities().exp()
        lead = int(torch.argmax(probs))
        characterize = self.mode == "characterize" or (
            self.mode == "auto" and self.threshold is not None and float(probs[lead]) >= self.threshold)
        alive = [i for i in range(len(names)) if float(probs[i]) >= NEGLIGIBLE]
        if not characterize and len(alive) < 2:
            characterize = True
        if characterize:
            t = names.index(self.target_model) if self.target_model in names else lead
            post = comparison.posteriors[t]
            pm = self._mixture(t, post)
            w = torch.softmax(post.logw, 0).to(torch.float32)
            cond = (w @ self._entropy[t]).to(torch.float64)
            info = (self._entropy_of(pm) - cond).clamp_min(0.0)
            return info, f"characterize {names[t]} (P={float(probs[t]):.3f}): max exact parameter information", \
                "parameter_estimation"
        pi = probs[alive] / probs[alive].sum()
        pms = torch.stack([self._mixture(i, comparison.posteriors[i]) for i in alive])  # (M, S, K)
        total = torch.einsum("m,msk->sk", pi, pms)
        logr = torch.log(pms.clamp_min(1e-300)) - torch.log(total.clamp_min(1e-300)).unsqueeze(0)
        kl = torch.where(pms > 0, pms * logr, torch.zeros_like(pms)).sum(-1)  # (M, S)
        mi = (pi.unsqueeze(-1) * kl).sum(0).clamp_min(0.0)
        ptxt = ", ".join(f"P({names[i]})={float(probs[i]):.3f}" for i in alive)
        return mi, f"discriminate models ({ptxt}): max exact I(model; response)", "mutual_information"

    def propose(self, comparison: Any, trial_index: int) -> Decision:
        t0 = time.perf_counter()
        mi, why, strategy = self.scores(comparison)
        best = int(torch.argmax(mi))
        assert self._Z is not None
        score = float(mi[best])
        return self.finish(self._Z[best].reshape(1, -1), f"{why} = {score:.4f} nats (exact grid)", score, t0,
                           strategy=self.label or strategy)


def exact_grid_applies(protocol: Any) -> bool:
    """True when mutual-information designs run as exact grid ADO: the rule of
    orchestrator.models.grid (<= 3 parameters per model, one stimulus per decision, at most
    MAX_STIMULI candidate stimuli with continuous dimensions discretised, tables within the bound)."""
    from orchestrator.models.space import StimulusEncoding

    space = StimulusEncoding(protocol)
    settings = dict(getattr(protocol.design, "settings", None) or {})
    n = count_stimuli(space, settings.get("points"))
    batch = int(getattr(protocol.design, "batch_size", 1) or 1)
    return grid_plan(build_candidates(protocol), n, batch).ok


__all__ = ["ExactGridDesign", "exact_grid_applies", "candidate_stimuli", "count_stimuli", "grid_points"]
