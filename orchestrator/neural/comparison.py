"""P(model | population responses): every candidate's readout refitted after every trial.

Each candidate is a feature model with its own Bayesian readout (orchestrator.neural.readout); its
log evidence is the exact sum of its one-step-ahead log predictive densities, so
P(model) = prior x exp(log evidence), normalised. All candidates see the same transformed
responses, so a transform's Jacobian cancels between them. Poisson counts are transformed with
Anscombe's 2 sqrt(y + 3/8), whose variance is close to 1 for rates above a few counts per window
(benchmarks/population_calibration.py measures the calibration of the resulting P(model)).

The first trial is not compared: it sets each candidate's centre (the mean transformed response
over units), which the readouts' offsets are relative to, so the offset prior means "spread
around the population's level" whatever the units' overall rate, and its scale (the units' mean
squared deviation from the centre), which the learned noise levels are relative to
(orchestrator.neural.hyper), so P(model) does not depend on the units responses come in. A model
is declared only when its own held-out predictions pass orchestrator.neural.check and its lead
over every rival holds trial by trial, not only summed over units: by more than
``stopping.rival_lead`` standard errors (default 1.5, so that one or two trials do not carry it),
or with ``stopping.rival_test`` by the Student-t test, and P(model) must still reach the stopping
threshold with each rival's evidence gap cut by ``stopping.evidence_margin`` standard errors of it
(default 1; ``declaration_blocker``).

The object quacks like orchestrator.inference.ModelComparison (update / probabilities / summary),
so the engine, the simulator and the designs treat both alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from orchestrator.neural.check import PredictiveCheck, RivalTest
from orchestrator.neural.features import FeatureModel, FeatureSpecError, fit_feature_model, pool_tensor
from orchestrator.neural.pool import load_pool
from orchestrator.neural.hyper import NoiseGrid, ReadoutGrid
from orchestrator.neural.numerics import flushed_denormals
from orchestrator.neural.readout import ReadoutState

ImageResolver = Callable[[str], np.ndarray]
TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "anscombe": lambda y: 2.0 * np.sqrt(y + 0.375),
    "sqrt": np.sqrt,
    "none": lambda y: y,
}


def response_transform(protocol: Any, spec: Any) -> str:
    """The entry's transform, defaulting to anscombe for counts and none for continuous responses."""
    readout = spec.readout
    if readout is not None and readout.transform is not None:
        return readout.transform
    return "anscombe" if protocol.response.noise == "poisson" else "none"


def readout_grid(spec: Any, n_units: int, d_raw: int) -> ReadoutGrid:
    """The readout's prior grid, weight scale x offset spread x noise level, every component exact.

    Weights ~ N(0, s^2 weight_sd^2 / d_raw) per standardised feature (prior SNR ~ weight_sd^2);
    each unit's offset from the session's centre (the first trial's mean response) ~
    N(0, s^2 bias_sd^2). A single broad offset prior (bias_sd = 10 noise SDs) against a population
    whose offsets spread by ~1 noise SD gave the evidence a spurious high-SNR, low-noise mode in
    which the model whose features look most like white noise (the most diffuse feature space)
    wins, 100 units multiplying the error (benchmarks/population_calibration.py measures it), so
    by default the offset spread is a grid marginalised like weight_sd, from 1/8 noise SD (units
    whose rates barely differ, e.g. the Anscombe-transformed counts of similar units) to 8.
    The noise variance s^2 is, by default, a population level learned across units
    (``noise_levels``, relative to the session's scale; orchestrator.neural.hyper), or with
    ``noise_levels: null`` the fixed per-unit InvGamma(noise_shape, noise_scale).
    """
    from orchestrator.protocol import ReadoutPrior

    prior = spec.readout.prior if spec.readout is not None else ReadoutPrior()
    biases = prior.bias_sd if isinstance(prior.bias_sd, list) else [prior.bias_sd]
    weights = prior.weight_sd if isinstance(prior.weight_sd, list) else [prior.weight_sd]
    precisions = [np.r_[np.full(d_raw, d_raw / float(sd) ** 2), 1.0] for sd in weights]
    noise = (NoiseGrid.fixed(prior.noise_shape, prior.noise_scale) if prior.noise_levels is None
             else NoiseGrid.learned(prior.noise_levels, prior.noise_level_shape))
    return ReadoutGrid(n_units, precisions, [1.0 / float(b) ** 2 for b in biases], noise)


def session_scale(centred: np.ndarray, centre: float) -> float:
    """The response scale the learned noise levels are relative to: the first trial's mean squared
    deviation of the units from their centre (with one unit, or all equal, the centre's square; else 1)."""
    seen = centred[np.isfinite(centred)]
    for value in (float(np.mean(seen ** 2)) if seen.size else 0.0, centre ** 2, 1.0):
        if math.isfinite(value) and value > 1e-300:
            return value
    return 1.0  # pragma: no cover - the loop always returns


@dataclass
class Candidate:
    """One hypothesis: its features, its readout, how it transforms responses."""

    name: str
    features: FeatureModel
    readout: ReadoutGrid
    transform: str
    log_prior: float


class PopulationComparison:
    """Posterior over feature models given images and population responses, updated per trial."""

    def __init__(self, protocol: Any, candidates: list[Candidate], pool: np.ndarray, seed: int,
                 images: ImageResolver | None = None) -> None:
        self.protocol, self.candidates, self.pool, self.seed = protocol, candidates, pool, int(seed)
        self.images = images
        self.model_names = [c.name for c in candidates]
        self.n_observations = 0
        self.n_masked = 0
        self.previous: list[tuple[ReadoutState, float]] | None = None  # (state, log prob) before the latest trial
        self._cache: dict[str, list[np.ndarray]] = {}
        self.checks = [PredictiveCheck(lambda grid=c.readout: grid.best_index) for c in candidates]
        self.rivals = RivalTest([c.name for c in candidates])
        self.centres: list[float] | None = None  # each candidate's centre: the first trial's mean response
        self.latest_features: list[np.ndarray] | None = None  # every candidate's features of the latest trial's image

    @classmethod
    def from_protocol(cls, protocol: Any, seed: int, images: ImageResolver | None = None,
                      pool: np.ndarray | None = None) -> "PopulationComparison":
        """Build every candidate (networks, standardisation on the pool, readout priors)."""
        with flushed_denormals():
            return cls._build(protocol, seed, images, pool)

    @classmethod
    def _build(cls, protocol: Any, seed: int, images: ImageResolver | None,
               pool: np.ndarray | None) -> "PopulationComparison":
        pool = load_pool(protocol, seed=0) if pool is None else pool
        tensor = pool_tensor(pool)
        probs = protocol.model_prior_probabilities()
        n = protocol.response.n_units
        candidates: list[Candidate] = []
        problems: list[tuple[str, str]] = []
        for i, spec in enumerate(protocol.models):
            try:
                fm = fit_feature_model(spec, f"models.{i}", tensor, protocol.stimulus.channels)
            except FeatureSpecError as exc:
                problems.extend(exc.problems)
                continue
            readout = readout_grid(spec, n, fm.d - 1)
            candidates.append(Candidate(spec.name, fm, readout, response_transform(protocol, spec),
                                        math.log(probs[spec.name])))
        if problems:
            raise FeatureSpecError(problems)
        return cls(protocol, candidates, pool, seed, images)

    def fresh(self, seed: int | None = None) -> "PopulationComparison":
        """The same feature models with prior readouts (no trials): a new session without refitting the pool."""
        candidates = [Candidate(c.name, c.features, c.readout.fresh(),
                                c.transform, c.log_prior) for c in self.candidates]
        return PopulationComparison(self.protocol, candidates, self.pool, self.seed if seed is None else seed,
                                    self.images)

    # -- data ------------------------------------------------------------------------------------

    def pixels(self, stimulus: dict[str, Any]) -> np.ndarray:
        """Pixels (0..1 floats) of a stored stimulus {"image": sha256}."""
        if self.images is None:
            raise RuntimeError("this comparison has no image store to resolve image references")
        arr = np.asarray(self.images(stimulus["image"]))
        return arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)

    def features_of(self, pixels: np.ndarray) -> list[np.ndarray]:
        """Every candidate's standardised features (d_m,) of one image (denormals flushed: a live
        session's network pass must not crawl through subnormal activations)."""
        t = pool_tensor(pixels[None])
        with torch.no_grad(), flushed_denormals():
            return [c.features(t)[0].numpy() for c in self.candidates]

    def remember_features(self, image_ref: str, features: list[np.ndarray]) -> None:
        """Features of an image about to be shown, computed elsewhere (the background planner needs
        them for the pending trial), so :meth:`update` does not run the networks on it again."""
        self._cache[image_ref] = features

    def update(self, stimulus: dict[str, Any], response: Any, pixels: np.ndarray | None = None) -> None:
        """Absorb one trial: the image (by reference, or its pixels) and the (N,) response, NaN masked."""
        y = np.asarray(response, dtype=np.float64)
        if y.shape != (self.protocol.response.n_units,):
            raise ValueError(f"response has shape {y.shape}, expected ({self.protocol.response.n_units},)")
        ref = stimulus.get("image")
        feats = self._cache.get(ref) if ref is not None else None
        if feats is None:
            feats = self.features_of(self.pixels(stimulus) if pixels is None else pixels)
            if ref is not None:
                self._cache[ref] = feats
        self.previous = self.design_states(copy=True)
        self.latest_features = feats
        transformed = [TRANSFORMS[c.transform](y) for c in self.candidates]
        if self.centres is None:  # the first trial sets the centre and is not compared
            if np.isnan(y).all():
                raise ValueError("the first response has every unit masked: it cannot set the centre")
            self.centres = [float(np.nanmean(ty)) for ty in transformed]
            for cand, ty, c in zip(self.candidates, transformed, self.centres):
                cand.readout.set_scale(session_scale(ty - c, c))
        else:
            before = [cand.readout.log_evidence for cand in self.candidates]
            for cand, check, x, ty, c in zip(self.candidates, self.checks, feats, transformed, self.centres):
                with np.errstate(invalid="ignore"):
                    check.add(cand.readout.held_out(x, ty - c))
                    cand.readout.update(x, ty - c)
            self.rivals.add([cand.readout.log_evidence - b for cand, b in zip(self.candidates, before)])
        self.n_observations += 1
        self.n_masked += int(np.isnan(y).sum())

    def _trial_level_lead(self, name: str) -> float | None:
        """The smallest standard-error lead of `name` over a rival, trial by trial (None before 2 trials)."""
        leads = [self.rivals.advantage(name, other) for other in self.model_names if other != name]
        value = min(leads) if leads else float("nan")
        return round(value, 3) if math.isfinite(value) else None

    def declaration_blocker(self, name: str) -> str | None:
        """Why `name` may not be declared now (orchestrator.neural.check): its held-out predictions misfit,
        its lead over a rival rests on too few trials (``stopping.rival_lead`` standard errors, or
        with ``stopping.rival_test`` the Student-t test), or its probability falls below the
        stopping threshold once each rival's evidence gap is cut by ``stopping.evidence_margin``
        standard errors."""
        own = self.checks[self.model_names.index(name)].blocker()
        stopping = self.protocol.stopping
        if own is not None:
            return own
        if stopping.rival_test:
            lead = self.rivals.blocker(name)
        else:
            lead = self.rivals.blocker(name, min_lead=stopping.rival_lead) if stopping.rival_lead > 0 else None
        if lead is not None or not stopping.evidence_margin or stopping.model_probability is None:
            return lead
        return self.rivals.margin_blocker(name, self.log_probabilities().tolist(), stopping.evidence_margin,
                                          stopping.model_probability)

    # -- model probabilities ------------------------------------------------------------------------

    def log_probabilities(self) -> torch.Tensor:
        lp = torch.tensor([c.log_prior + c.readout.log_evidence for c in self.candidates], dtype=torch.float64)
        return lp - torch.logsumexp(lp, 0)

    def probabilities(self) -> dict[str, float]:
        return {n: float(v) for n, v in zip(self.model_names, self.log_probabilities().exp())}

    def leader(self) -> tuple[str, float]:
        probs = self.probabilities()
        name = max(self.model_names, key=lambda n: probs[n])
        return name, probs[name]

    def design_states(self, lagged: bool = False, copy: bool = False) -> list[tuple[ReadoutState, float]]:
        """Each model's most probable readout and unnormalised log probability: now, or before the latest trial."""
        if lagged and self.previous is not None:
            return self.previous
        return [(c.readout.state.copy() if copy else c.readout.state, c.log_prior + c.readout.log_evidence)
                for c in self.candidates]

    def summary(self) -> dict[str, Any]:
        """JSON-safe per-model state: probability, log evidence, features, weights hash, noise."""
        probs = self.probabilities()
        out: dict[str, Any] = {}
        for c in self.candidates:
            noise = c.readout.noise_variance()
            out[c.name] = {"kind": "population_readout", "probability": probs[c.name],
                           "log_evidence": float(c.readout.log_evidence), "features": c.features.d,
                           "weight_sd_posterior": [round(float(w), 4) for w in c.readout.marginal(0)],
                           "bias_sd_posterior": [round(float(w), 4) for w in c.readout.marginal(1)],
                           "noise_level_posterior": [round(float(w), 4) for w in c.readout.marginal(2)],
                           "weights_sha256": c.features.weights_sha256, "transform": c.transform,
                           "noise_sd_median": float(np.sqrt(np.median(noise))),
                           "trial_level_lead": self._trial_level_lead(c.name),
                           "masked_units": len(c.readout.state.private)}
        return out
