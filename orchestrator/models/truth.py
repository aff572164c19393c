"""Ground-truth simulated subjects: `build_truth(protocol, "MODEL:param=value,...")`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from orchestrator.models.candidate import Candidate, build_candidates
from orchestrator.models.space import StimulusEncoding


@dataclass
class Truth:
    """A simulated subject answering from one protocol model with fixed parameter values."""

    model_name: str
    params: dict[str, float]
    candidate: Candidate
    space: StimulusEncoding

    def mean(self, stimulus: dict[str, Any]) -> float:
        """The response mean (p, rate or mean) this subject has at `stimulus`."""
        X = self.space.stimulus_to_raw(stimulus).unsqueeze(0)
        theta = {p: torch.tensor([v], dtype=torch.float64) for p, v in self.params.items()}
        return float(self.candidate.mean(X, theta)[0, 0])

    def sample(self, stimulus: dict[str, Any], rng: np.random.Generator) -> float:
        """One response to `stimulus`, drawn with `rng` (use numpy.random.default_rng([seed, trial]))."""
        noise = self.params.get("noise_sd", self.candidate.fixed.get("noise_sd"))
        return self.candidate.likelihood.sample(self.mean(stimulus), rng, noise)

    def spec(self) -> str:
        return f"{self.model_name}:" + ",".join(f"{k}={v:g}" for k, v in self.params.items())


def parse_truth_spec(text: str) -> tuple[str, dict[str, float]]:
    """'power:a=0.9,b=0.5' -> ('power', {'a': 0.9, 'b': 0.5}); raises ValueError on bad syntax."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("truth must look like MODEL:param=value,... (got an empty string)")
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"truth {text!r}: missing model name before ':'")
    params: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"truth {text!r}: expected param=value, got {item!r}")
        try:
            v = float(val)
        except ValueError:
            raise ValueError(f"truth {text!r}: value of {key!r} is not a number: {val!r}") from None
        if not math.isfinite(v):
            raise ValueError(f"truth {text!r}: value of {key!r} must be finite")
        if key in params:
            raise ValueError(f"truth {text!r}: parameter {key!r} given twice")
        params[key] = v
    return name, params


def build_truth(protocol: Any, spec: str) -> Truth:
    """Simulated subject from a protocol model; unspecified parameters take their prior medians."""
    name, given = parse_truth_spec(spec)
    candidates = {c.name: c for c in build_candidates(protocol)}
    if name not in candidates:
        raise ValueError(f"truth: unknown model {name!r}; the protocol defines {sorted(candidates)}")
    cand = candidates[name]
    if cand.is_gp:
        raise ValueError(f"truth: model {name!r} is the nonparametric gaussian_process and cannot be a ground truth")
    unknown = sorted(set(given) - set(cand.priors) - set(cand.fixed))
    if unknown:
        raise ValueError(f"truth: model {name!r} has no parameter(s) {unknown}; parameters: {sorted(cand.priors)}")
    params: dict[str, float] = {}
    for p, prior in cand.priors.items():
        v = given.get(p, prior.median())
        lp = float(prior.log_prob(torch.tensor([v], dtype=torch.float64))[0])
        if not math.isfinite(lp):
            raise ValueError(f"truth: {name}.{p}={v:g} is outside the support of its {prior.dist_name} prior")
        params[p] = v
    for p in cand.fixed:
        if p in given and given[p] != cand.fixed[p]:
            raise ValueError(f"truth: {name}.{p} is fixed at {cand.fixed[p]:g} by the protocol")
    return Truth(name, params, cand, StimulusEncoding(protocol))
