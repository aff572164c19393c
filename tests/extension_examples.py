"""One small example of each extension point, exactly as docs/extending.md shows them.

tests/plugins/ holds the package metadata that registers them as entry points, the way an installed
lab package would (tests/test_extending.py puts that directory on the path).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch

from orchestrator.design.base import BaseStrategy, Decision
from orchestrator.models.base import EncodingModel
from rig_adapters.base import Adapter, AdapterResult, SessionInfo
from rig_adapters.responses import ResponseSource
from stimuli.schema import ParamSpec, StimulusType


class RetentionHyperbolic(EncodingModel):
    """Hyperbolic forgetting, p = a / (1 + b t): one more hypothesis for the retention protocol."""

    id = "retention_hyperbolic"
    parameters = ("a", "b")
    variables = ("t",)
    doc = "p = a / (1 + b t)"

    def mean(self, x: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return theta["a"] / (1.0 + theta["b"] * x["t"])


class CountingAdapter(Adapter):
    """A rig that answers every trial with the trial index modulo `modulus` (a wiring check)."""

    name = "counting"

    def __init__(self, modulus: str = "10") -> None:
        self.modulus = int(modulus)
        self.session: SessionInfo | None = None

    def capabilities(self) -> dict[str, list[str]]:
        return {"stimulus_types": ["*"], "response_kinds": ["binomial", "poisson"]}

    def start(self, session: SessionInfo) -> None:
        self.session = session

    def present(self, cmd: Any) -> AdapterResult:
        now = time.time()
        return AdapterResult(response={"value": cmd.index % self.modulus},
                             timing={"presented_at": now, "responded_at": now})


class ConstantResponse(ResponseSource):
    """A response source that answers `value` as soon as the stimulus is on."""

    name = "constant"

    def __init__(self, *, rig: Any, truth: str | None = None, seed: int = 0, value: float = 1.0) -> None:
        self.value = value
        self._onset: float | None = None

    def begin(self, cmd: Any, onset: float) -> None:
        self._onset = onset

    def poll(self, now: float) -> dict[str, Any] | None:
        if self._onset is None:
            return None
        self._onset = None
        return {"value": self.value, "responded_at": now}


CHECKERBOARD = StimulusType(
    name="checkerboard",
    modality="visual",
    description="A contrast-reversing checkerboard.",
    params={
        "contrast": ParamSpec("contrast", "continuous", "fraction", 1.0, "Michelson contrast", low=0.0, high=1.0),
        "check_size": ParamSpec("check_size", "continuous", "deg", 2.0, "side of one check", low=0.0, high=45.0,
                                low_open=True),
    },
)


class AlternatingExtremes(BaseStrategy):
    """Alternates between the lower and upper safety limits of every parameter."""

    name = "alternating_extremes"

    def propose(self, comparison: Any, trial_index: int) -> Decision:
        t0 = time.perf_counter()
        bounds = self.space.design_bounds()  # (2, d): lower and upper limits in design coordinates
        return self.finish(bounds[trial_index % 2], "alternating limits", None, t0)
