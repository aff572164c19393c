"""Simulated subjects: rigs without hardware, for rehearsing a protocol end to end and for tests.

``SimulatedAdapter`` answers from a ground-truth model of the protocol it receives at session
start; the response to trial index ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` so a
re-run (or a retry on another simulated rig with the same seed) gives the same answer.
``NullAdapter`` answers every trial at once with a constant: it measures the network itself.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from orchestrator.messages import Trial
from rig_adapters.base import RESPONSE_KINDS, Adapter, AdapterError, AdapterResult, SessionInfo

_DISCRETE = {"bernoulli", "binomial", "poisson"}


def _number(options: dict[str, str], key: str, kind: type, default: Any) -> Any:
    if key not in options or options[key] in (None, ""):
        return default
    try:
        return kind(options[key])
    except (TypeError, ValueError):
        raise AdapterError(f"option {key}={options[key]!r} is not a valid {kind.__name__}") from None


class SimulatedAdapter(Adapter):
    """A simulated subject whose responses follow ``truth`` (``MODEL:param=value,...``)."""

    name = "simulated"

    def __init__(self, truth: str, seed: int = 0, trial_seconds: float = 0.0) -> None:
        if not truth or ":" not in truth and not truth.strip():
            raise AdapterError("the simulated adapter needs --truth MODEL[:param=value,...]")
        if trial_seconds < 0:
            raise AdapterError("trial_seconds must be >= 0")
        # Import the model library now (it pulls in torch): doing it later, with the network thread
        # running, would hold the GIL long enough to miss heartbeats.
        from orchestrator.models import parse_truth_spec

        try:
            parse_truth_spec(truth)
        except ValueError as exc:
            raise AdapterError(f"--truth {truth!r}: {exc}") from None
        self.truth_spec = truth
        self.seed = int(seed)
        self.trial_seconds = float(trial_seconds)
        self._truth: Any = None
        self._session: str | None = None

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "SimulatedAdapter":
        unknown = set(options) - {"truth", "seed", "trial_seconds"}
        if unknown:
            raise AdapterError(f"the simulated adapter has no option(s) {sorted(unknown)}")
        if not options.get("truth"):
            raise AdapterError("the simulated adapter needs --truth MODEL[:param=value,...]")
        return cls(truth=options["truth"], seed=_number(options, "seed", int, 0),
                   trial_seconds=_number(options, "trial_seconds", float, 0.0))

    def capabilities(self) -> dict[str, list[str]]:
        return {"stimulus_types": ["*"], "response_kinds": list(RESPONSE_KINDS)}

    def start(self, session: SessionInfo) -> None:
        from orchestrator.models import build_truth
        from orchestrator.protocol import parse_protocol_text

        loaded = parse_protocol_text(session.protocol_text, source=f"<session {session.session_id}>")
        try:
            if loaded.protocol.is_population:  # a simulated population answering images
                from orchestrator.neural.comparison import PopulationComparison
                from orchestrator.neural.truth import build_population_truth

                models = PopulationComparison.from_protocol(loaded.protocol, self.seed)
                self._truth = build_population_truth(loaded.protocol, self.truth_spec, models)
            else:
                self._truth = build_truth(loaded.protocol, self.truth_spec)
        except ValueError as exc:
            raise AdapterError(str(exc)) from None
        self._session = session.session_id

    def present(self, cmd: Trial) -> AdapterResult:
        if self._truth is None:
            raise AdapterError("no session started: the simulated subject has no protocol yet")
        presented_at = time.time()
        rng = np.random.default_rng([self.seed, cmd.index])
        if cmd.response_kind == "population":
            from orchestrator.wire_images import image_array

            pixels = image_array(cmd.stimulus["image"], "stimulus.image")
            counts = self._truth.sample(cmd.stimulus, rng, pixels=pixels)
            if self.trial_seconds:
                time.sleep(self.trial_seconds)
            return AdapterResult(response={"value": counts}, timing={"presented_at": presented_at,
                                                                     "responded_at": time.time()},
                                 meta={"truth": self.truth_spec, "seed": self.seed})
        value: float | int = float(self._truth.sample(cmd.stimulus, rng))
        if self.trial_seconds:
            time.sleep(self.trial_seconds)
        if cmd.response_kind in _DISCRETE and float(value).is_integer():
            value = int(value)
        return AdapterResult(response={"value": value}, timing={"presented_at": presented_at,
                                                                "responded_at": time.time()},
                             meta={"truth": self.truth_spec, "seed": self.seed})


class NullAdapter(Adapter):
    """Answers ``{"value": value}`` immediately: an 'empty trial' for network tests and benchmarks."""

    name = "null"

    def __init__(self, value: float = 0.0, trial_seconds: float = 0.0, inline: bool | None = None) -> None:
        self.value = value
        self.trial_seconds = float(trial_seconds)
        self.inline = (self.trial_seconds == 0) if inline is None else bool(inline)

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "NullAdapter":
        unknown = set(options) - {"value", "trial_seconds", "truth", "seed", "inline"}
        if unknown:
            raise AdapterError(f"the null adapter has no option(s) {sorted(unknown)}")
        inline = options.get("inline")
        if inline not in (None, "", "true", "false"):
            raise AdapterError(f"option inline={inline!r} must be true or false")
        return cls(value=_number(options, "value", float, 0.0),
                   trial_seconds=_number(options, "trial_seconds", float, 0.0),
                   inline=None if not inline else inline == "true")

    def capabilities(self) -> dict[str, list[str]]:
        return {"stimulus_types": ["*"], "response_kinds": list(RESPONSE_KINDS)}

    def start(self, session: SessionInfo) -> None:
        pass

    def present(self, cmd: Trial) -> AdapterResult:
        t = time.time()
        if self.trial_seconds:
            time.sleep(self.trial_seconds)
        return AdapterResult(response={"value": self.value}, timing={"presented_at": t, "responded_at": time.time()})
