"""Decision record, the strategy interface, and the single exit point that enforces safety limits."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol as TypingProtocol, runtime_checkable

import numpy as np
import torch

from orchestrator.design.limits import raise_if_too_large
from orchestrator.models.space import StimulusEncoding


@dataclass(frozen=True)
class Decision:
    """One proposed stimulus and why it was chosen."""

    stimulus: dict[str, Any]  # already checked against Protocol.check_safe
    strategy: str  # e.g. "random", "mutual_information"
    reason: str  # human text: why this stimulus
    score: float | None  # acquisition value if any
    compute_ms: float
    batch: tuple[dict[str, Any], ...] = ()  # q > 1: all stimuli of the block (first == stimulus)

    def to_json(self) -> dict[str, Any]:
        return {"stimulus": self.stimulus, "strategy": self.strategy, "reason": self.reason,
                "score": self.score, "compute_ms": self.compute_ms,
                **({"batch": list(self.batch)} if len(self.batch) > 1 else {})}


@runtime_checkable
class DesignStrategy(TypingProtocol):
    name: str

    def propose(self, comparison: Any, trial_index: int) -> Decision: ...


class BaseStrategy:
    """Common plumbing: stimulus encoding, per-trial RNG, and the safety-checked exit."""

    name = "base"

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> None:
        raise_if_too_large(protocol, self.name)
        self.protocol = protocol
        self.seed = int(seed)
        self.settings = dict(settings or {})
        self.space = StimulusEncoding(protocol)
        self.batch_size = int(getattr(getattr(protocol, "design", None), "batch_size", 1) or 1)

    def rng(self, trial_index: int) -> np.random.Generator:
        """Design randomness for trial i; a different stream from the simulated subject's [seed, i]."""
        return np.random.default_rng([self.seed, trial_index, 0xD5])

    def finish(self, points: torch.Tensor, reason: str, score: float | None, t0: float,
               strategy: str | None = None) -> Decision:
        """Convert design points (q, d) into stimuli clipped to the limits, then assert safety.

        A stimulus that still fails `check_safe` here is a bug in the design code and raises.
        """
        pts = points.reshape(-1, self.space.d)
        stimuli = [self.space.design_to_stimulus(p) for p in pts]
        for s in stimuli:
            self.protocol.check_safe(s)
        return Decision(stimulus=stimuli[0], strategy=strategy or self.name, reason=reason,
                        score=None if score is None else float(score),
                        compute_ms=(time.perf_counter() - t0) * 1000.0,
                        batch=tuple(stimuli) if len(stimuli) > 1 else ())
