"""A frozen mixture view of a model's posterior, the input of the design's acquisition functions."""
from __future__ import annotations

import torch

from orchestrator.models.candidate import Candidate


class ParticleView:
    """Mixture components of a model's predictive: weights fixed, means evaluated at any stimuli."""

    def __init__(self, candidate: Candidate, theta: dict[str, torch.Tensor], logw: torch.Tensor) -> None:
        self.candidate, self.theta, self.logw = candidate, theta, logw
        self.noise = candidate.noise(theta)

    def __call__(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log weights (N,), response means (N, S) at raw stimuli X (S, d), noise SD (N,) or None)."""
        return self.logw, self.candidate.mean(X, self.theta), self.noise


__all__ = ["ParticleView"]
