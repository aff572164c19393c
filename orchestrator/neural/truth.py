"""Simulated populations: one candidate's features, seeded readout weights, noise, optional misfits.

``MODEL:ev=0.3,seed=1,saturation=0,sparse=0,rate=5`` answers like a recorded population whose
units read out MODEL's features. Weights are drawn from ``seed``; each unit's signal is scaled so
that, over the pool, signal variance / total variance = ``ev`` (the explainable variance). Options:

- ``saturation=s`` (> 0): the signal passes through s * tanh(signal / s) (in units of its pool SD),
  so images that drive the features far beyond the pool are answered more weakly than a linear
  readout predicts: the misspecification that unconstrained synthesis walks into.
- ``sparse=k`` (> 0): each unit reads only k features (a localized readout) instead of all.
- ``rate=r`` (poisson protocols): the mean count for a zero signal. Counts are Poisson with mean
  drive^2, the drive linear in the features (rectified at 0): linear on the square-root scale,
  which is what the readout assumes after the Anscombe transform; ``ev`` is the signal's share
  of the variance on that scale.
- ``softplus=1`` (poisson): mean count softplus(drive) instead, linear on the rate scale; the
  readout's linear-on-sqrt assumption is then wrong (a misspecified truth).

Trial i is answered with numpy.random.default_rng([seed, i]) like every simulated subject.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from orchestrator.neural.features import FeatureModel, pool_tensor

OPTIONS = {"ev": 0.3, "seed": 0.0, "saturation": 0.0, "sparse": 0.0, "rate": 5.0, "noise_sd": 1.0, "softplus": 0.0}


@dataclass
class PopulationTruth:
    """A simulated population answering from `model_name`'s features with fixed seeded readouts."""

    model_name: str
    params: dict[str, float]
    features: FeatureModel
    weights: np.ndarray  # (N, d_raw)
    offset: np.ndarray  # (N,)
    gain: np.ndarray  # (N,) scales raw signal to the wanted explainable variance
    noise: str
    pool_sd: np.ndarray  # (N,) SD of the raw signal over the pool
    resolve: Callable[[str], np.ndarray] | None = None

    def signal(self, pixels: np.ndarray) -> np.ndarray:
        """Noise-free responses (N,) to one image (0..1 floats or uint8)."""
        arr = np.asarray(pixels)
        arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr
        with torch.no_grad():
            f = self.features(pool_tensor(arr[None]))[0].numpy()
        return self.signal_of_features(f)

    def signal_of_features(self, features: np.ndarray) -> np.ndarray:
        """Noise-free responses (N,) given the true model's standardised features (d + 1,) of an image."""
        raw = (self.weights @ features[:-1]) / self.pool_sd
        sat = self.params["saturation"]
        if sat > 0:
            raw = sat * np.tanh(raw / sat)
        return raw * self.gain + self.offset

    def sample(self, stimulus: dict[str, Any], rng: np.random.Generator, pixels: np.ndarray | None = None,
               features: np.ndarray | None = None) -> list[float]:
        """One population response (list of N numbers) to a stimulus {"image": sha}, its pixels or its features."""
        if features is not None:
            mu = self.signal_of_features(features)
        else:
            if pixels is None:
                if self.resolve is None:
                    raise RuntimeError("this simulated population cannot resolve image references")
                pixels = self.resolve(stimulus["image"])
            mu = self.signal(pixels)
        if self.noise == "poisson":
            if self.params["softplus"]:
                rate = np.log1p(np.exp(np.clip(mu, -30, 30)))
            else:
                rate = np.maximum(mu, 0.0) ** 2
            return [float(v) for v in rng.poisson(rate)]
        return [float(v) for v in mu + rng.standard_normal(mu.shape) * self.params["noise_sd"]]

    def spec(self) -> str:
        return f"{self.model_name}:" + ",".join(f"{k}={v:g}" for k, v in self.params.items())


def parse_population_truth(protocol: Any, text: str) -> tuple[str, dict[str, float]]:
    """``MODEL:opt=value,...`` -> (model name, every option); ValueError naming what is wrong.

    Cheap (no network is built), so a command can refuse a bad --truth before it writes anything.
    """
    from orchestrator.models.truth import parse_truth_spec

    name, given = parse_truth_spec(text)
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ValueError(f"truth {text!r}: unknown option(s) {unknown}; known: {', '.join(OPTIONS)}")
    names = [model.name for model in protocol.models]
    if name not in names:
        raise ValueError(f"truth {text!r}: unknown model {name!r}; the protocol defines {names}")
    params = {**OPTIONS, **given}
    if not 0 < params["ev"] < 1:
        raise ValueError(f"truth {text!r}: ev (explainable variance) must be in (0, 1)")
    return name, params


def build_population_truth(protocol: Any, text: str, comparison: Any) -> PopulationTruth:
    """Parse ``MODEL:opt=value,...`` and draw the population (features from `comparison`'s candidate)."""
    name, params = parse_population_truth(protocol, text)
    fm = comparison.candidates[comparison.model_names.index(name)].features
    n = protocol.response.n_units
    rng = np.random.default_rng([int(params["seed"]), 0x7A0])
    d = fm.d - 1
    W = rng.standard_normal((n, d))
    k = int(params["sparse"])
    if k > 0:
        mask = np.zeros((n, d), dtype=bool)
        for u in range(n):
            mask[u, rng.choice(d, size=min(k, d), replace=False)] = True
        W = np.where(mask, W, 0.0)
    with torch.no_grad():
        pool_f = fm(pool_tensor(comparison.pool))[:, :-1].numpy()
    raw = pool_f @ W.T
    pool_sd = raw.std(0) + 1e-12
    ev = params["ev"]
    if protocol.response.noise == "poisson" and not params["softplus"]:
        # Anscombe(y) ~ 2 drive + N(0, 1): signal variance 4 gain^2 over total 4 gain^2 + 1 = ev
        gain = np.full(n, 0.5 * np.sqrt(ev / (1 - ev)))
        offset = np.sqrt(params["rate"] * (1 + rng.uniform(-0.3, 0.3, n)))
    elif protocol.response.noise == "poisson":
        rate = params["rate"]
        # count variance ~ rate; signal SD on the rate scale so that var(signal) / (var + rate) = ev
        gain = np.full(n, np.sqrt(ev / (1 - ev) * rate))
        offset = np.full(n, rate) + rng.uniform(-0.3, 0.3, n) * rate
        offset = np.log(np.expm1(np.maximum(offset, 0.5)))  # softplus^-1: zero signal -> rate
        gain = gain / (1 / (1 + np.exp(-offset)))  # first-order: softplus' slope at the offset
    else:
        gain = np.full(n, params["noise_sd"] * np.sqrt(ev / (1 - ev)))
        offset = rng.normal(0.0, 1.0, n)
    return PopulationTruth(name, params, fm, W, offset, gain, protocol.response.noise, pool_sd)
