"""The stimulator device interface: what a pulse train is and what a device must do with one.

Drivers (:class:`rig_adapters.serial_driver.SerialStimulator`, :class:`SimulatedStimulator`) implement
:class:`StimulatorDevice`; the adapter in :mod:`rig_adapters.stimulator` checks hard limits and calls
them. Kept apart so a driver never imports the adapter that uses it.
"""

from __future__ import annotations

import abc
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from rig_adapters.base import AdapterError

__all__ = ["PulseTrain", "Delivery", "DeviceError", "StimulatorDevice", "SimulatedStimulator"]


class DeviceError(AdapterError):
    """The device did not accept or complete a command (timeout, error reply, disconnected)."""

    code = "device_error"


@dataclass(frozen=True)
class PulseTrain:
    """One train of biphasic pulses (units: uA, Hz, us per phase, ms)."""

    amplitude: float
    frequency: float
    pulse_width: float
    train_duration: float
    channel: int = 0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "PulseTrain":
        return cls(amplitude=float(params["amplitude"]), frequency=float(params["frequency"]),
                   pulse_width=float(params["pulse_width"]), train_duration=float(params["train_duration"]),
                   channel=int(params["channel"]))

    @property
    def charge_nc(self) -> float:
        """Charge per phase in nC: uA x us = pC, / 1000."""
        return self.amplitude * self.pulse_width / 1000.0

    @property
    def n_pulses(self) -> int:
        return max(1, int(math.floor(self.frequency * self.train_duration / 1000.0)))


@dataclass
class Delivery:
    """What the device reported: when the train started and finished (epoch s)."""

    started_at: float
    finished_at: float
    device: dict[str, Any] = field(default_factory=dict)


class StimulatorDevice(abc.ABC):
    """A stimulator that can deliver one pulse train at a time."""

    @abc.abstractmethod
    def open(self) -> str:
        """Connect; return the device's identification."""

    @abc.abstractmethod
    def deliver(self, train: PulseTrain) -> Delivery:
        """Start ``train`` and block until the device reports it finished."""

    def stop(self) -> None:
        """Abort any train in progress."""

    def close(self) -> None:
        """Disconnect."""


class SimulatedStimulator(StimulatorDevice):
    """In-process stand-in: records deliveries, takes the train's duration (optionally scaled)."""

    def __init__(self, time_scale: float = 1.0) -> None:
        self.time_scale = time_scale
        self.delivered: list[PulseTrain] = []
        self._stop = threading.Event()

    def open(self) -> str:
        return "cloop simulated stimulator"

    def deliver(self, train: PulseTrain) -> Delivery:
        self._stop.clear()
        start = time.time()
        self._stop.wait(train.train_duration / 1000.0 * self.time_scale)
        self.delivered.append(train)
        return Delivery(start, time.time(), {"pulses": train.n_pulses})

    def stop(self) -> None:
        self._stop.set()
