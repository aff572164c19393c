"""Stimulator adapter: delivers ``pulse_train`` stimuli through a device driver, within hard limits.

``cloop rig --adapter stimulator -o rig_config=rig.yaml -o response=zmq``

Defence in depth: the protocol's safety limits are checked by the orchestrator before dispatch,
and this adapter checks every command again against the limits in the *rig's own* config (which a
protocol cannot change). A command outside them is refused before anything reaches the device and
the trial fails with the reason (:class:`StimulusRefused`, worker error code ``refused``).

Devices implement :class:`rig_adapters.stimulator_device.StimulatorDevice` (:class:`SimulatedStimulator`
is in-process),
:class:`rig_adapters.serial_driver.SerialStimulator` speaks a line protocol over pyserial.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

from orchestrator.messages import Trial
from rig_adapters.base import Adapter, AdapterError, AdapterResult, SessionInfo, StimulusRefused
from rig_adapters.responses import ResponseSource, make_response_source, wait_for_response
from rig_adapters.rig_config import RigConfig, RigConfigError, StimulatorConfig, load_rig_config
from rig_adapters.stimulator_device import (Delivery, DeviceError, PulseTrain, SimulatedStimulator,
                                            StimulatorDevice)
from stimuli import StimulusParameterError, get_stimulus_type

__all__ = [
    "PulseTrain",
    "Delivery",
    "StimulatorDevice",
    "SimulatedStimulator",
    "StimulusRefused",
    "DeviceError",
    "limit_violations",
    "StimulatorAdapter",
]


def limit_violations(train: PulseTrain, config: StimulatorConfig) -> list[str]:
    """Every way ``train`` breaks the rig's hard limits (empty list = allowed)."""
    problems: list[str] = []
    values = {"amplitude": train.amplitude, "frequency": train.frequency, "pulse_width": train.pulse_width,
              "train_duration": train.train_duration, "channel": float(train.channel)}
    units = {"amplitude": "uA", "frequency": "Hz", "pulse_width": "us", "train_duration": "ms", "channel": ""}
    for name, value in values.items():
        limit = config.limits[name]
        if not math.isfinite(value) or not (limit.min <= value <= limit.max):
            problems.append(f"{name}={value:g}{units[name]} outside rig limit [{limit.min:g}, {limit.max:g}]")
    if config.max_charge_nc is not None and train.charge_nc > config.max_charge_nc:
        problems.append(f"charge per phase {train.charge_nc:g} nC exceeds rig limit {config.max_charge_nc:g} nC")
    if train.pulse_width * 2 > 1e6 / train.frequency:
        problems.append(f"pulse_width {train.pulse_width:g}us x 2 phases does not fit a {train.frequency:g} Hz period")
    return problems


class StimulatorAdapter(Adapter):
    """Delivers pulse trains, refusing anything outside the rig config's hard limits."""

    name = "stimulator"

    def __init__(self, rig: RigConfig, response: ResponseSource, device: StimulatorDevice | None = None) -> None:
        if rig.stimulator is None:
            raise AdapterError("the stimulator adapter needs a `stimulator:` section with hard limits in the rig config")
        self.rig = rig
        self.config = rig.stimulator
        self.response = response
        self.device = device if device is not None else self._device_from_config(rig.stimulator)
        self.identity: str | None = None
        self._fixed: dict[str, Any] = {}
        self.refused = 0

    @staticmethod
    def _device_from_config(config: StimulatorConfig) -> StimulatorDevice:
        if config.driver == "serial":
            from rig_adapters.serial_driver import SerialStimulator

            assert config.port is not None
            return SerialStimulator(config.port, baudrate=config.baudrate, timeout_s=config.timeout_s)
        return SimulatedStimulator()

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "StimulatorAdapter":
        allowed = {"rig_config", "response", "truth", "seed", "trial_seconds"}
        unknown = set(options) - allowed
        if unknown:
            raise AdapterError(f"the stimulator adapter has no option(s) {sorted(unknown)} (known: {sorted(allowed)})")
        if not options.get("rig_config"):
            raise AdapterError("the stimulator adapter needs -o rig_config=RIG.yaml (its hard limits live there)")
        try:
            rig = load_rig_config(options["rig_config"])
        except RigConfigError as exc:
            raise AdapterError(str(exc)) from None
        source = make_response_source(options.get("response") or "simulated", rig=rig,
                                      truth=options.get("truth"), seed=int(options.get("seed") or 0))
        return cls(rig, source)

    def capabilities(self) -> dict[str, list[str]]:
        return {"stimulus_types": ["pulse_train"], "response_kinds": list(self.response.response_kinds)}

    def start(self, session: SessionInfo) -> None:
        from orchestrator.protocol import parse_protocol_text

        protocol = parse_protocol_text(session.protocol_text, source=f"<session {session.session_id}>", checks=()).protocol
        if protocol.stimulus.type != "pulse_train":
            raise AdapterError(f"the stimulator adapter delivers pulse_train, not {protocol.stimulus.type!r}")
        self._fixed = dict(protocol.stimulus.fixed)
        if self.identity is None:
            self.identity = self.device.open()
        self.response.start(session)

    def check(self, stimulus: Mapping[str, Any]) -> PulseTrain:
        """Resolve a trial's stimulus and enforce the hard limits; raise StimulusRefused if outside."""
        try:
            params = get_stimulus_type("pulse_train").resolve(stimulus, self._fixed)
        except StimulusParameterError as exc:
            raise StimulusRefused(f"refused: {exc}") from None
        train = PulseTrain.from_params(params)
        problems = limit_violations(train, self.config)
        if problems:
            self.refused += 1
            raise StimulusRefused("refused by rig hard limits: " + "; ".join(problems))
        return train

    def present(self, cmd: Trial) -> AdapterResult:
        if cmd.stimulus_type != "pulse_train":
            raise AdapterError(f"the stimulator adapter cannot present {cmd.stimulus_type!r}")
        train = self.check(cmd.stimulus)
        if self.identity is None:
            self.identity = self.device.open()
        commanded = time.time()
        delivery = self.device.deliver(train)
        # onset = the device's start acknowledgement; streamed events wait in the socket meanwhile
        self.response.begin(cmd, delivery.started_at)
        payload = wait_for_response(self.response, cmd, delivery.started_at)
        responded_at = float(payload.pop("responded_at", time.time()))
        timing: dict[str, float | None] = {
            "presented_at": delivery.started_at,
            "responded_at": responded_at,
            "commanded_at": commanded,
            "train_started_at": delivery.started_at,
            "train_finished_at": delivery.finished_at,
        }
        meta = {"adapter": self.name, "device": self.identity, "train": train.__dict__ | {"charge_nc": train.charge_nc},
                "device_reply": delivery.device, "response_source": self.response.name}
        return AdapterResult(response=payload, timing=timing, meta=meta)

    def close(self) -> None:
        try:
            self.response.close()
        finally:
            self.device.stop()
            self.device.close()
