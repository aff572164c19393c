"""Information-theoretic designs: discriminate between models, then characterize the winner.

Optimisation follows the stimulus space:
- all-discrete spaces up to `exhaustive_limit` combinations: every candidate scored in one
  vectorised pass (`optimize_acqf_discrete`);
- continuous spaces, one stimulus per decision: a batched search (the default `optimizer: batched`):
  `raw_samples` scrambled-Sobol points scored in one table, then `refine_rounds` (2) pattern-search
  rounds around the best `refine_keep` points (the step halved each round), each one table; the
  cost is a few large tables instead of one autograd pass per L-BFGS-B evaluation;
- other continuous spaces (or `optimizer: lbfgs`): `optimize_acqf` (L-BFGS-B) from the best of
  `raw_samples` seeded draws;
- all-discrete spaces beyond `exhaustive_limit`: a seeded sample of `exhaustive_limit` points;
- mixed spaces: `optimize_acqf_mixed` over the discrete combinations when there are at most
  `mixed_limit`, else a continuous relaxation rounded to the grid.
Initial points come from the strategy's own seeded RNG, so proposals are deterministic given
the seed and the observation history.
"""
from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from botorch.optim import optimize_acqf, optimize_acqf_discrete, optimize_acqf_mixed

from orchestrator.design.acquisition import ModelDiscriminationMI, ParameterInformation
from orchestrator.design.base import BaseStrategy, Decision
from orchestrator.inference import derive_seed, generator

#: model probabilities below this are left out of the discrimination mixture (they cannot matter)
NEGLIGIBLE = 1e-6


class InformationDesign(BaseStrategy):
    """Mutual-information design. `mode` is "auto" (discriminate, then characterize past the
    protocol's characterize_threshold), "discriminate", or "characterize" (settings.model or the leader)."""

    name = "mutual_information"

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None, mode: str = "auto") -> None:
        super().__init__(protocol, seed, settings)
        s = self.settings
        self.mode = s.get("mode", mode)
        if self.mode not in ("auto", "discriminate", "characterize"):
            raise ValueError(f"design.settings.mode: must be auto, discriminate or characterize, not {self.mode!r}")
        self.threshold = getattr(protocol.design, "characterize_threshold", None)
        self.target_model = s.get("model")
        self.exhaustive_limit = int(s.get("exhaustive_limit", 5000))
        self.mixed_limit = int(s.get("mixed_limit", 32))
        discrete_only = not any(d.kind == "continuous" for d in self.space.dims)
        self.optimizer = str(s.get("optimizer", "batched"))
        if self.optimizer not in ("batched", "lbfgs"):
            raise ValueError(f"design.settings.optimizer: must be batched or lbfgs, not {self.optimizer!r}")
        self.refine_rounds = int(s.get("refine_rounds", 2))
        self.refine_keep = int(s.get("refine_keep", 2))
        batched = (self.optimizer == "batched" and self.batch_size == 1
                   and all(d.kind == "continuous" for d in self.space.dims))
        # Defaults by phase, from the benchmarks (benchmarks/README.md, section 3): discrimination in
        # continuous spaces scores 128 seeded points; with the batched search 128 particles per model
        # cost no more regret than 512 (the L-BFGS-B path keeps 512). Characterizing one model stays
        # cheap (128 particles, 32 points) so late-session decisions are fast. Settings override both.
        self.max_components = int(s.get("max_components", 256 if discrete_only else 128 if batched else 512))
        self.char_components = int(s.get("max_components", 256 if discrete_only else 128))
        self.char_raw_samples = int(s.get("raw_samples", 32))
        self.num_restarts = int(s.get("num_restarts", 1))
        self.raw_samples = int(s.get("raw_samples", 128))
        self.maxiter = int(s.get("maxiter", 5))
        self.float32 = bool(s.get("float32", True))
        if discrete_only and self.space.n_discrete_combinations() <= self.exhaustive_limit:
            self._choices = self.space.enumerate_discrete()
        else:
            self._choices = None

    # -- which question to ask ---------------------------------------------------------------
    def _acquisition(self, comparison: Any, trial_index: int) -> tuple[Any, str, str]:
        names = comparison.model_names
        logp = comparison.log_probabilities()
        probs = logp.exp()
        lead = int(torch.argmax(probs))
        gen = generator(self.seed, trial_index, 0xACE)
        characterize = self.mode == "characterize" or (
            self.mode == "auto" and self.threshold is not None and float(probs[lead]) >= self.threshold)
        alive = [i for i in range(len(names)) if float(probs[i]) >= NEGLIGIBLE]
        if not characterize and len(alive) < 2:
            characterize = True
        if characterize:
            target = names.index(self.target_model) if self.target_model in names else lead
            view = comparison.posteriors[target].predictive(self.char_components, gen)
            acq = ParameterInformation(view, self.space, comparison.candidates[target].likelihood)
            why = f"characterize {names[target]} (P={float(probs[target]):.3f}): max parameter information"
            return acq, why, "parameter_estimation"
        views = [comparison.posteriors[i].predictive(self.max_components, gen) for i in alive]
        acq = ModelDiscriminationMI(views, logp[alive], self.space, comparison.candidates[0].likelihood)
        ptxt = ", ".join(f"P({names[i]})={float(probs[i]):.3f}" for i in alive)
        return acq, f"discriminate models ({ptxt}): max I(model; response)", "mutual_information"

    # -- where to ask it ---------------------------------------------------------------------
    def _optimize(self, acq: Any, trial_index: int) -> tuple[torch.Tensor, float]:
        q = self.batch_size
        n_raw = self.char_raw_samples if isinstance(acq, ParameterInformation) else self.raw_samples
        # float32 tables: ample for ranking stimuli and ~2x faster; BoTorch still sees float64 X
        acq.compute_dtype = torch.float32 if self.float32 else torch.float64
        if self._choices is not None:
            with torch.no_grad():
                x, val = optimize_acqf_discrete(acq, q=q, choices=self._choices, max_batch_size=4096,
                                                unique=q <= self._choices.shape[0])
            return x, float(acq(x.unsqueeze(0)).reshape(-1)[0]) if q > 1 else float(val.reshape(-1)[0])
        bounds = self.space.design_bounds()
        rng = self.rng(trial_index)
        disc = self.space.discrete_dims()
        if len(disc) == self.space.d:
            # a discrete space too large to enumerate: score a seeded sample of its points (there is
            # no gradient to follow in a space without continuous dimensions)
            choices = torch.unique(self.space.random_design(rng, self.exhaustive_limit), dim=0)
            with torch.no_grad():
                x, val = optimize_acqf_discrete(acq, q=q, choices=choices, max_batch_size=4096,
                                                unique=q <= choices.shape[0])
            return x, float(acq(x.unsqueeze(0)).reshape(-1)[0]) if q > 1 else float(val.reshape(-1)[0])
        if not disc and q == 1 and self.optimizer == "batched":
            return self._batched_search(acq, n_raw, rng)
        # seeded raw samples -> best num_restarts as initial conditions (deterministic)
        raw = self.space.random_design(rng, n_raw * q).reshape(n_raw, q, self.space.d)
        with torch.no_grad():
            vals = acq(raw)
        init = raw[torch.argsort(vals, descending=True)[: self.num_restarts]]
        # bounded work per decision: L-BFGS-B iterations, line-search steps (BoTorch's batched L-BFGS-B
        # does not honour maxfun) and no retries on optimisation warnings
        options = {"maxiter": self.maxiter, "maxfun": 2 * self.maxiter, "maxls": 3}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if disc and self.space.n_discrete_combinations() <= self.mixed_limit:
                # optimise the continuous dims for the discrete combinations of the best raw samples
                # (all combinations would multiply the cost by their number)
                combos: list[tuple[float, ...]] = []
                for pt in init.reshape(-1, q, self.space.d)[:, 0, :]:
                    c = tuple(float(pt[i]) for i in disc)
                    if c not in combos:
                        combos.append(c)
                fixed = [{i: v for i, v in zip(disc, c)} for c in combos]
                x, val = optimize_acqf_mixed(acq, bounds=bounds, q=q, num_restarts=self.num_restarts,
                                             raw_samples=n_raw, fixed_features_list=fixed,
                                             options=options, retry_on_optimization_warning=False)
            else:
                x, val = optimize_acqf(acq, bounds=bounds, q=q, num_restarts=self.num_restarts,
                                       batch_initial_conditions=init, options=options,
                                       retry_on_optimization_warning=False)
                if disc:  # relaxed integer/categorical dims: round, then rescore
                    x = x.clone()
                    x[..., disc] = x[..., disc].round()
                    with torch.no_grad():
                        val = acq(x.unsqueeze(0) if x.dim() == 2 else x)
        # never worse than the best raw sample (L-BFGS-B can stall on flat regions)
        best_raw = float(vals.max())
        v = float(torch.as_tensor(val).reshape(-1)[0])
        if best_raw > v:
            x, v = raw[int(torch.argmax(vals))], best_raw
        return x.reshape(q, self.space.d), v

    def _batched_search(self, acq: Any, n_raw: int, rng: Any) -> tuple[torch.Tensor, float]:
        """Best of a scrambled Sobol set, refined by pattern search (continuous space, q = 1).

        Every stage is one no-gradient table over many candidates; deterministic given `rng`.
        """
        d = self.space.d
        sobol = torch.quasirandom.SobolEngine(d, scramble=True, seed=int(rng.integers(2 ** 31)))
        X = sobol.draw(n_raw, dtype=torch.float64)
        with torch.no_grad():
            vals = acq(X.unsqueeze(1))
            offsets = _pattern(d)
            step = 0.5 * n_raw ** (-1.0 / d)
            for _ in range(self.refine_rounds):
                top = X[torch.argsort(vals, descending=True)[: self.refine_keep]]
                cand = (top.unsqueeze(1) + step * offsets.unsqueeze(0)).reshape(-1, d).clamp(0.0, 1.0)
                X, vals = torch.cat([X, cand]), torch.cat([vals, acq(cand.unsqueeze(1))])
                step /= 2
        best = int(torch.argmax(vals))
        return X[best].reshape(1, d), float(vals[best])

    def propose(self, comparison: Any, trial_index: int) -> Decision:
        t0 = time.perf_counter()
        acq, why, strategy = self._acquisition(comparison, trial_index)
        # BoTorch draws restarts from torch's global RNG: seed it from (seed, trial) inside a fork so
        # proposals are reproducible and the caller's RNG state is untouched
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.seed, trial_index, 0x0B7))
            x, score = self._optimize(acq, trial_index)
        return self.finish(x, f"{why} = {score:.4f} nats", score, t0, strategy=strategy)


def _pattern(d: int) -> torch.Tensor:
    """Pattern-search moves in d dimensions: the 2d axis steps, plus the 2^d corners up to d = 3."""
    eye = torch.eye(d, dtype=torch.float64)
    moves = [eye, -eye]
    if d <= 3:
        moves.append(torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * d).reshape(-1, d))
    return torch.cat(moves)


class ParameterEstimationDesign(InformationDesign):
    """Always characterize (settings.model, default the current leader)."""

    name = "parameter_estimation"

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> None:
        super().__init__(protocol, seed, settings, mode="characterize")


__all__ = ["InformationDesign", "ParameterEstimationDesign"]
