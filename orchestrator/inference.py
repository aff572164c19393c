"""Per-model online posteriors with comparable evidence, and `ModelComparison` across models.

Parametric models use sequential Monte Carlo with adaptive tempering and resample-move: each
observation multiplies the importance weights by its likelihood (raised in stages to powers that
keep the effective sample size above half when one observation is very informative), and
the log marginal likelihood accumulates as  log Z_t = log Z_{t-1} + log sum_i W_i p(y_t | theta_i)^dphi
over the stages. After a resample, random-walk Metropolis moves in the unconstrained parameter
space (proposal scaled by the particle covariance) rejuvenate the particles. Cost per update is
O(particles) and, only when a move happens, O(particles x observations) - never a grid product.

The Gaussian-process candidate (orchestrator.models.gp) reports its evidence prequentially:
sum_t log p(y_t | y_<t), which is the same quantity and therefore comparable.

Everything is deterministic given the seed and the observation sequence: every random draw comes
from a torch.Generator seeded from (seed, model index, observation index, stage).
"""
from __future__ import annotations

import math
from typing import Any, Protocol as TypingProtocol

import numpy as np
import torch

from orchestrator.models.candidate import Candidate, build_candidates
from orchestrator.models.grid import GridPosterior, grid_inference_applies
from orchestrator.models.views import ParticleView
from orchestrator.models.space import StimulusEncoding

DTYPE = torch.float64
#: bounded work per observation: tempering increments are at least MIN_TEMPER_STEP and the
#: MAX_STAGES-th stage takes whatever remains, so one absurd response (1e7 spikes, 2^64 - 1) costs
#: at most MAX_STAGES resample-moves instead of the ~10^7 stages of a relative minimum step
MIN_TEMPER_STEP = 1.0 / 32
MAX_STAGES = 12


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts (stable across runs and platforms)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def ess(logw: torch.Tensor) -> float:
    """Effective sample size of unnormalised log weights."""
    return float(torch.exp(2 * torch.logsumexp(logw, 0) - torch.logsumexp(2 * logw, 0)))


def systematic_resample(logw: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of n particles drawn by systematic resampling (low variance, deterministic given gen)."""
    w = torch.softmax(logw, 0)
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0
    u = (torch.rand(1, dtype=DTYPE, generator=gen) + torch.arange(n, dtype=DTYPE)) / n
    return torch.searchsorted(cdf, u).clamp(max=logw.shape[0] - 1)


class Posterior(TypingProtocol):
    """What ModelComparison and the design code need from a model's posterior."""

    candidate: Candidate
    log_evidence: float

    def update(self, x: torch.Tensor, y: float) -> None: ...
    def predictive(self, max_components: int | None = None, gen: torch.Generator | None = None) -> Any: ...
    def summary(self) -> dict[str, Any]: ...


class SMCPosterior:
    """Weighted particles over one parametric model's free parameters, updated one datum at a time."""

    def __init__(self, candidate: Candidate, seed: int, n_particles: int = 2000, n_moves: int = 4,
                 resample_threshold: float = 0.5) -> None:
        self.candidate = candidate
        self.seed = int(seed)
        self.n = int(n_particles)
        self.n_moves = int(n_moves)
        self.threshold = float(resample_threshold)
        self.names = candidate.free_params
        gen = generator(self.seed, candidate.index, 0, 0)
        self.theta: dict[str, torch.Tensor] = {p: candidate.priors[p].sample(self.n, gen) for p in self.names}
        self.transforms = {p: candidate.priors[p].to_unconstrained() for p in self.names}
        self.logw = torch.full((self.n,), -math.log(self.n), dtype=DTYPE)
        self.past_ll = torch.zeros(self.n, dtype=DTYPE)
        self.log_evidence = 0.0
        self.X = torch.empty((0, 0), dtype=DTYPE)
        self.y = torch.empty(0, dtype=DTYPE)
        self.n_resamples = 0
        self.accept_rate: float | None = None

    # -- likelihood --------------------------------------------------------------------------
    def loglik(self, theta: dict[str, torch.Tensor], X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(y_j | theta_i, x_j) as an (N, T) tensor; NaNs (invalid parameter regions) -> -inf."""
        mean = self.candidate.mean(X, theta)
        noise = self.candidate.noise(theta)
        ll = self.candidate.likelihood.log_prob(y, mean, None if noise is None else noise.unsqueeze(-1))
        return torch.nan_to_num(ll, nan=-math.inf, posinf=-math.inf)

    def log_prior(self, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        lp = torch.zeros(next(iter(theta.values())).shape[0], dtype=DTYPE)
        for p in self.names:
            lp = lp + self.candidate.priors[p].log_prob(theta[p])
        return lp

    # -- update ------------------------------------------------------------------------------
    def update(self, x: torch.Tensor, y: float) -> None:
        """Absorb one observation (raw stimulus x (d,), response y)."""
        t = self.y.shape[0]
        yy = torch.tensor([float(y)], dtype=DTYPE)
        x = x.reshape(1, -1).to(DTYPE)
        ll_new = self.loglik(self.theta, x, yy)[:, 0]
        phi, stage = 0.0, 0
        while phi < 1.0:
            if not torch.isfinite(torch.logsumexp(self.logw + (1 - phi) * ll_new, 0)):
                self.log_evidence = -math.inf  # the observation is impossible under every particle
                break
            delta = self._next_increment(ll_new, 1.0 - phi) if stage < MAX_STAGES - 1 else 1.0 - phi
            inc = torch.where(torch.isfinite(ll_new), delta * ll_new, torch.full_like(ll_new, -math.inf))
            self.log_evidence += float(torch.logsumexp(self.logw + inc, 0) - torch.logsumexp(self.logw, 0))
            self.logw = self.logw + inc
            self.logw = self.logw - torch.logsumexp(self.logw, 0)
            phi = 1.0 if delta >= 1.0 - phi - 1e-12 else phi + delta
            stage += 1
            if ess(self.logw) < self.threshold * self.n:
                ll_new = self._resample_move(x, yy, phi, ll_new,
                                             generator(self.seed, self.candidate.index, t + 1, stage))
        self.X = x if self.X.numel() == 0 else torch.cat([self.X, x], 0)
        self.y = torch.cat([self.y, yy])
        self.past_ll = self.past_ll + ll_new

    def _next_increment(self, ll_new: torch.Tensor, remaining: float) -> float:
        """Largest tempering step <= remaining keeping ESS >= threshold * N (bisection), but never
        below MIN_TEMPER_STEP (the work per observation is bounded whatever its value)."""
        target = self.threshold * self.n
        finite = torch.where(torch.isfinite(ll_new), ll_new, torch.full_like(ll_new, -1e300))
        if ess(self.logw + remaining * finite) >= target:
            return remaining
        lo, hi = 0.0, remaining
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if ess(self.logw + mid * finite) >= target:
                lo = mid
            else:
                hi = mid
        return min(remaining, max(lo, MIN_TEMPER_STEP))

    def _unconstrain(self, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.transforms[p].inv(theta[p]) for p in self.names], -1)

    def _constrain(self, u: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        theta, logdet = {}, torch.zeros(u.shape[0], dtype=DTYPE)
        for j, p in enumerate(self.names):
            tr = self.transforms[p]
            theta[p] = tr(u[:, j])
            logdet = logdet + tr.log_abs_det_jacobian(u[:, j], theta[p])
        return theta, logdet

    def _resample_move(self, x: torch.Tensor, yy: torch.Tensor, phi: float, ll_new: torch.Tensor,
                       gen: torch.Generator) -> torch.Tensor:
        """Resample to equal weights, then Metropolis moves targeting prior x past lik x new lik^phi."""
        idx = systematic_resample(self.logw, self.n, gen)
        self.theta = {p: v[idx] for p, v in self.theta.items()}
        self.past_ll = self.past_ll[idx]
        ll_new = ll_new[idx]
        self.logw = torch.full((self.n,), -math.log(self.n), dtype=DTYPE)
        self.n_resamples += 1
        if self.n_moves <= 0 or not self.names:
            return ll_new
        u = self._unconstrain(self.theta)
        finite = torch.isfinite(u).all(-1)
        if not finite.all():
            fill = u[finite].mean(0) if finite.any() else torch.zeros(u.shape[1], dtype=DTYPE)
            u = torch.where(finite.unsqueeze(-1), u, fill)
        dim = u.shape[1]
        scale = 2.38 / math.sqrt(dim)
        cov = torch.cov(u.T).reshape(dim, dim) + 1e-10 * torch.eye(dim, dtype=DTYPE)
        try:
            chol = torch.linalg.cholesky(cov)
        except RuntimeError:
            chol = torch.diag(cov.diagonal().clamp_min(1e-12).sqrt())
        X_all = torch.cat([self.X, x], 0) if self.X.numel() else x
        y_all = torch.cat([self.y, yy])
        theta, logdet = self._constrain(u)
        self.theta = theta
        cur = self.log_prior(theta) + logdet + self.past_ll + phi * ll_new
        accepted = 0
        for _ in range(self.n_moves):
            z = torch.randn(u.shape, dtype=DTYPE, generator=gen)
            u_prop = u + scale * z @ chol.T
            th_prop, logdet_prop = self._constrain(u_prop)
            ll = self.loglik(th_prop, X_all, y_all)
            past_prop, new_prop = ll[:, :-1].sum(-1), ll[:, -1]
            prop = self.log_prior(th_prop) + logdet_prop + past_prop + phi * new_prop
            log_u = torch.log(torch.rand(self.n, dtype=DTYPE, generator=gen))
            acc = (log_u < prop - cur) & torch.isfinite(prop)
            accepted += int(acc.sum())
            u = torch.where(acc.unsqueeze(-1), u_prop, u)
            cur = torch.where(acc, prop, cur)
            self.past_ll = torch.where(acc, past_prop, self.past_ll)
            ll_new = torch.where(acc, new_prop, ll_new)
            self.theta = {p: torch.where(acc, th_prop[p], self.theta[p]) for p in self.names}
        self.accept_rate = accepted / (self.n * self.n_moves)
        return ll_new

    # -- queries -----------------------------------------------------------------------------
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logw, 0)

    def predictive(self, max_components: int | None = None,
                   gen: torch.Generator | None = None) -> ParticleView:
        """A frozen view of the posterior for the design: with max_components, a systematic
        resample of that many particles (equal weights) bounds the design cost."""
        theta, logw = self.theta, self.logw - torch.logsumexp(self.logw, 0)
        if max_components is not None and self.n > max_components:
            idx = systematic_resample(logw, max_components, gen if gen is not None else generator(self.seed, 7))
            theta = {p: v[idx] for p, v in theta.items()}
            logw = torch.full((max_components,), -math.log(max_components), dtype=DTYPE)
        return ParticleView(self.candidate, theta, logw)

    def param_moments(self) -> dict[str, dict[str, float]]:
        w = self.weights()
        out = {}
        for p in self.names:
            v = self.theta[p]
            m = float((w * v).sum())
            sd = float(((w * (v - m) ** 2).sum()).clamp_min(0).sqrt())
            out[p] = {"mean": m, "sd": sd}
        for p, v in self.candidate.fixed.items():
            out[p] = {"mean": float(v), "sd": 0.0}
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "smc",
            "log_evidence": float(self.log_evidence),
            "ess": ess(self.logw),
            "particles": self.n,
            "resamples": self.n_resamples,
            "params": self.param_moments(),
        }


class ModelComparison:
    """Posterior over competing models: one posterior per candidate plus the prior model odds."""

    def __init__(self, protocol: Any, candidates: list[Candidate], posteriors: list[Any],
                 space: StimulusEncoding, seed: int) -> None:
        self.protocol = protocol
        self.candidates = candidates
        self.posteriors = posteriors
        self.space = space
        self.seed = int(seed)
        self.model_names: list[str] = [c.name for c in candidates]
        self.log_prior = torch.tensor([math.log(c.prior_probability) for c in candidates], dtype=DTYPE)
        self.n_observations = 0
        self.history: list[tuple[torch.Tensor, float]] = []  # (raw stimulus, response) in order

    @classmethod
    def from_protocol(cls, protocol: Any, seed: int, inference: str | None = None) -> "ModelComparison":
        """Build priors/particles for every protocol model (deterministic in `seed`).

        `inference` is "grid" (exact, orchestrator.models.grid), "smc" or "auto" (default, or the
        protocol's `design.settings.inference`): the grid whenever every model is parametric with
        <= 3 free parameters (`grid_inference_applies`), else SMC (and the GP's own posterior).
        """
        space = StimulusEncoding(protocol)
        candidates = build_candidates(protocol)
        mode = inference or str((getattr(protocol.design, "settings", None) or {}).get("inference", "auto"))
        if mode not in ("auto", "grid", "smc"):
            raise ValueError(f"design.settings.inference: must be auto, grid or smc, not {mode!r}")
        if mode == "grid" or (mode == "auto" and grid_inference_applies(candidates)):
            return cls(protocol, candidates, [GridPosterior(c) for c in candidates], space, seed)
        posteriors: list[Any] = []
        for cand in candidates:
            s = cand.settings
            if cand.is_gp:
                from orchestrator.models.gp import GPPosterior

                posteriors.append(GPPosterior(cand, space, seed))
            else:
                n_default = 2000 if len(cand.free_params) <= 3 else 4000
                posteriors.append(SMCPosterior(cand, seed, n_particles=int(s.get("particles", n_default)),
                                               n_moves=int(s.get("moves", 4))))
        return cls(protocol, candidates, posteriors, space, seed)

    @property
    def exact(self) -> bool:
        """True when every posterior is an exact grid posterior."""
        return all(isinstance(p, GridPosterior) for p in self.posteriors)

    def use_grid(self) -> None:
        """Switch every model to its exact grid posterior, replaying the history (deterministic)."""
        if self.exact:
            return
        posteriors = [GridPosterior(c) for c in self.candidates]
        for x, y in self.history:
            for post in posteriors:
                post.update(x, y)
        self.posteriors = posteriors

    def update(self, stimulus: dict[str, Any], response: float) -> None:
        """Absorb one (stimulus, validated response) observation into every model."""
        if not math.isfinite(float(response)):
            raise ValueError(f"response must be finite, got {response!r}")
        x = self.space.stimulus_to_raw(stimulus)
        for post in self.posteriors:
            post.update(x, float(response))
        self.history.append((x, float(response)))
        self.n_observations += 1

    def log_probabilities(self) -> torch.Tensor:
        """Log posterior model probabilities (tensor, candidate order)."""
        ev = torch.tensor([p.log_evidence for p in self.posteriors], dtype=DTYPE)
        lp = self.log_prior + ev
        if not torch.isfinite(lp).any():
            return self.log_prior.clone()
        return lp - torch.logsumexp(lp, 0)

    def probabilities(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.model_names, self.log_probabilities().exp())}

    def leader(self) -> tuple[str, float]:
        probs = self.probabilities()
        name = max(self.model_names, key=lambda n: probs[n])
        return name, probs[name]

    def posterior(self, name: str) -> Any:
        return self.posteriors[self.model_names.index(name)]

    def declaration_blocker(self, name: str) -> str | None:
        """Why model `name` may not be declared now (None: the posterior probability alone decides)."""
        return None

    def summary(self) -> dict[str, Any]:
        """JSON-safe per-model state: probability, log evidence, ESS, parameter mean/sd."""
        probs = self.probabilities()
        out: dict[str, Any] = {}
        for name, post in zip(self.model_names, self.posteriors):
            s = post.summary()
            s["probability"] = probs[name]
            if not math.isfinite(s["log_evidence"]):
                s["log_evidence"] = None
            out[name] = s
        return out
