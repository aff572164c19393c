"""The population response window of a protocol, the per-trial errors, and the shared trial logic.

:class:`AcquisitionSource` is the part both acquisition sources share: it keeps one pending trial,
asks the concrete source to pull data and to map the onset onto the acquisition clock, and answers
only once the stream has provably passed the end of the window. Everything that would otherwise
produce a silently short window raises an :class:`AcquisitionError` subclass instead; its ``code``
travels to the orchestrator in the worker's error reply, so the trial is failed and retried.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.messages import Trial
from rig_adapters.base import AdapterError, SessionInfo
from rig_adapters.responses import ResponseSource
from rig_adapters.rig_config import RigConfig

__all__ = [
    "AcquisitionError",
    "AcquisitionLate",
    "AcquisitionStalled",
    "AcquisitionGap",
    "SyncMissing",
    "PopulationWindow",
    "parse_population_window",
    "SourceSettings",
    "source_settings",
    "Alignment",
    "EventBuffer",
    "AcquisitionSource",
]


class AcquisitionError(AdapterError):
    """The trial's population response cannot be trusted; ``code`` names the reason."""

    code = "acquisition_failed"


class AcquisitionLate(AcquisitionError):
    """The stream had not passed the end of the window by the deadline (data arrives too late)."""

    code = "acquisition_late"


class AcquisitionStalled(AcquisitionError):
    """No data at all arrived for ``stall_s`` seconds: the stream stopped or was never there."""

    code = "acquisition_stalled"


class AcquisitionGap(AcquisitionError):
    """Packets or samples inside the window were lost (sequence or timestamp gap)."""

    code = "acquisition_gap"


class SyncMissing(AcquisitionError):
    """A TTL/photodiode onset event is required but none was found near the expected time."""

    code = "sync_missing"


# ----------------------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class PopulationWindow:
    """What a population protocol asks the rig to measure, per trial."""

    unit_ids: tuple[str, ...]
    window_s: float
    latency_s: float = 0.0

    @property
    def n_units(self) -> int:
        return len(self.unit_ids)


def parse_population_window(protocol_text: str) -> PopulationWindow:
    """Read ``response: {kind: population, units, window_s, latency_s}`` from a protocol's text.

    Only these keys are read (the rest of the protocol is the orchestrator's to validate); an
    integer ``units: N`` means unit ids ``"0"`` .. ``"N-1"``. Raises AdapterError naming the field.
    """
    try:
        data = yaml.safe_load(protocol_text) or {}
    except yaml.YAMLError as exc:
        raise AdapterError(f"protocol: not readable YAML: {exc}") from None
    response = data.get("response") if isinstance(data, dict) else None
    if not isinstance(response, dict):
        raise AdapterError("response: the protocol has no response block")
    if response.get("kind") != "population":
        raise AdapterError(f"response.kind: acquisition sources measure kind 'population', "
                           f"not {response.get('kind')!r}")
    units = response.get("units")
    if isinstance(units, bool) or units is None:
        raise AdapterError("response.units: give a number of units or a list of unit ids")
    if isinstance(units, int):
        if not 1 <= units <= 100_000:
            raise AdapterError(f"response.units: {units} is not in 1..100000")
        ids = tuple(str(i) for i in range(units))
    elif isinstance(units, list):
        if not units:
            raise AdapterError("response.units: the unit list is empty")
        ids = tuple(str(u) for u in units)
        if any(isinstance(u, (dict, list)) or u is None for u in units):
            raise AdapterError("response.units: unit ids must be strings or numbers")
        dupes = sorted({u for u in ids if ids.count(u) > 1})
        if dupes:
            raise AdapterError(f"response.units: unit id(s) listed twice: {dupes[:5]}")
    else:
        raise AdapterError(f"response.units: expected a number or a list, got {type(units).__name__}")
    window = _positive(response, "window_s", required=True)
    latency = _positive(response, "latency_s", required=False, allow_zero=True)
    return PopulationWindow(unit_ids=ids, window_s=window, latency_s=latency)


def _positive(block: Mapping[str, Any], key: str, *, required: bool, allow_zero: bool = False) -> float:
    value = block.get(key)
    if value is None:
        if required:
            raise AdapterError(f"response.{key}: required for a population response")
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"response.{key}: expected a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise AdapterError(f"response.{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return float(value)


# ----------------------------------------------------------------------------------------- settings


class SourceSettings(BaseModel):
    """Keys every acquisition source accepts in its ``sources.NAME`` rig-config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unit_map: dict[str, str] = Field(default_factory=dict)
    """Protocol unit id -> the stream's own unit key (default: the same string)."""
    max_delay_s: float = Field(default=0.5, gt=0, le=60)
    """How long after the window's end (rig clock) the stream may take to pass it before the trial fails."""
    stall_s: float = Field(default=1.0, gt=0, le=600)
    """No data at all for this long after the window's end: the stream is declared stopped."""


def source_settings(rig: RigConfig, name: str, model: type[SourceSettings]) -> SourceSettings:
    """Validate the rig config's ``sources.<name>`` section; AdapterError names the field at fault."""
    sections = getattr(rig, "sources", None) or {}
    section = sections.get(name)
    if section is None:
        raise AdapterError(f"-o response={name} needs a `sources: {{{name}: ...}}` section in the rig config "
                           f"(see docs/acquisition.md)")
    try:
        return model.model_validate(section)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise AdapterError(f"rig config sources.{name}.{loc}: {err['msg']}") from None


# ----------------------------------------------------------------------------------------- alignment


@dataclass
class Alignment:
    """How one trial's onset was put on the acquisition clock: ``acq = epoch - offset_s``."""

    method: str
    """``ttl`` (an onset event in the stream), ``clock_offset`` (receipt-time estimate) or ``time_correction`` (LSL)."""
    onset_epoch: float
    onset_acq: float
    uncertainty_s: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def offset_s(self) -> float:
        return self.onset_epoch - self.onset_acq

    def as_dict(self, start: float, end: float) -> dict[str, Any]:
        return {"method": self.method, "onset_epoch": self.onset_epoch, "onset_acq_s": self.onset_acq,
                "offset_s": self.offset_s, "uncertainty_s": self.uncertainty_s,
                "window_acq_s": [start, end], **self.details}


# ----------------------------------------------------------------------------------------- binning


class EventBuffer:
    """Event times (acquisition seconds) and unit indices, appended in chunks, counted per window."""

    def __init__(self) -> None:
        self._t: list[np.ndarray] = []
        self._u: list[np.ndarray] = []
        self._pending_t: list[float] = []
        self._pending_u: list[int] = []

    def add(self, t: float, unit: int) -> None:
        self._pending_t.append(t)
        self._pending_u.append(unit)

    def extend(self, t: np.ndarray, units: np.ndarray) -> None:
        self._flush()
        self._t.append(np.asarray(t, dtype=np.float64))
        self._u.append(np.asarray(units, dtype=np.int64))

    def _flush(self) -> None:
        if self._pending_t:
            self._t.append(np.asarray(self._pending_t, dtype=np.float64))
            self._u.append(np.asarray(self._pending_u, dtype=np.int64))
            self._pending_t, self._pending_u = [], []

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        self._flush()
        if not self._t:
            return np.empty(0), np.empty(0, dtype=np.int64)
        if len(self._t) > 1:
            self._t = [np.concatenate(self._t)]
            self._u = [np.concatenate(self._u)]
        return self._t[0], self._u[0]

    def counts(self, start: float, end: float, n_units: int) -> list[int]:
        t, u = self._arrays()
        inside = (t >= start) & (t < end)
        return np.bincount(u[inside], minlength=n_units)[:n_units].astype(int).tolist()

    def drop_before(self, t_min: float) -> None:
        t, u = self._arrays()
        if t.size:
            keep = t >= t_min
            self._t, self._u = [t[keep]], [u[keep]]

    def clear(self) -> None:
        self._t, self._u, self._pending_t, self._pending_u = [], [], [], []


# ----------------------------------------------------------------------------------------- source


@dataclass
class _Pending:
    cmd: Trial
    onset: float
    begun: float
    state: dict[str, Any] = field(default_factory=dict)


class AcquisitionSource(ResponseSource):
    """Shared trial logic: pending trial, readiness, deadline, gaps, payload."""

    response_kinds = ("population",)
    #: Events older than this before a window's start are dropped after each trial (TTL search keeps some).
    history_s = 5.0

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self.window: PopulationWindow | None = None
        self.unit_index: dict[str, int] = {}
        self.events = EventBuffer()
        self.progress = -math.inf
        """Acquisition time (s) up to which the stream has delivered everything it will deliver."""
        self.last_rx: float | None = None
        """Epoch time of the last message received."""
        self.gaps: collections.deque[tuple[float, float, str]] = collections.deque(maxlen=256)
        self.unmapped: collections.Counter[str] = collections.Counter()
        self.messages = 0
        self.lock = threading.RLock()
        """Held while the stream's state is read or changed (a source may receive on its own thread)."""
        self.lock_wanted = threading.Event()
        """Set while the presenter waits for :attr:`lock`: a busy receiver thread must step aside (Python
        locks are not fair, and a flood of messages would otherwise keep the presenter waiting)."""
        self._pending: _Pending | None = None

    # -- what a concrete source provides
    @abc.abstractmethod
    def _connect(self) -> None:
        """Open the stream (called at session start)."""

    @abc.abstractmethod
    def _pump(self) -> None:
        """Take everything the stream has delivered; update events, progress, last_rx, gaps."""

    @abc.abstractmethod
    def _align(self, pending: _Pending, now: float) -> Alignment | None:
        """Map the pending onset onto the acquisition clock, or None while still waiting (e.g. for a TTL)."""

    def _units_changed(self) -> None:
        """A new session's unit list is in :attr:`unit_index` (drop anything cached from the last one)."""

    def _values(self, start: float, end: float) -> list[Any]:
        """The population vector over [start, end); default: event counts per unit."""
        assert self.window is not None
        return self.events.counts(start, end, self.window.n_units)

    def _extras(self) -> dict[str, Any]:
        return {}

    # -- ResponseSource
    def start(self, session: SessionInfo) -> None:
        self.window = parse_population_window(session.protocol_text)
        with self._locked():
            self.unit_index = {self.settings.unit_map.get(uid, uid): i for i, uid in enumerate(self.window.unit_ids)}
            self._units_changed()
        self._connect()

    def begin(self, cmd: Trial, onset: float) -> None:
        if self.window is None:
            raise AdapterError(f"{self.name} response source: no session started")
        # called right after the onset flip: nothing slow here (the next frame is due), data waits for poll
        with self._locked():
            self._pending = _Pending(cmd=cmd, onset=float(onset), begun=time.time())

    def poll(self, now: float) -> dict[str, Any] | None:
        pending = self._pending
        if pending is None:
            return None
        try:
            with self._locked():
                self._pump()
                return self._finish(pending, now)
        except AdapterError:
            self._pending = None
            raise

    def _finish(self, pending: _Pending, now: float) -> dict[str, Any] | None:
        assert self.window is not None
        w = self.window
        end_epoch = pending.onset + w.latency_s + w.window_s
        alignment = self._align(pending, now)
        if alignment is not None:
            start = alignment.onset_acq + w.latency_s
            end = start + w.window_s
            if self.progress >= end:
                return self._payload(pending, alignment, start, end, now)
        silent_for = now - (self.last_rx if self.last_rx is not None else pending.begun)
        if now > end_epoch and silent_for > self.settings.stall_s:
            raise AcquisitionStalled(f"{self.name}: no data for {silent_for:.2f} s after the window of trial "
                                     f"{pending.cmd.trial_id} (stream stopped?)")
        if now > end_epoch + self.settings.max_delay_s:
            behind = (end - self.progress) if alignment is not None and math.isfinite(self.progress) else math.nan
            raise AcquisitionLate(f"{self.name}: the stream had not passed the end of the response window "
                                  f"{self.settings.max_delay_s:g} s after it closed (behind by {behind:.3f} s)")
        return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.lock_wanted.set()
        with self.lock:
            self.lock_wanted.clear()
            yield

    def _payload(self, pending: _Pending, alignment: Alignment, start: float, end: float,
                 now: float) -> dict[str, Any]:
        for g0, g1, why in self.gaps:
            if g0 < end and g1 > start:
                raise AcquisitionGap(f"{self.name}: data lost inside the response window of trial "
                                     f"{pending.cmd.trial_id} ({why}, acquisition time {g0:.4f}..{g1:.4f} s)")
        values = self._values(start, end)
        self._pending = None
        self.events.drop_before(start - self.history_s)
        align = alignment.as_dict(start, end)
        align["stream_progress_s"] = self.progress
        if self.unmapped:
            align["unmapped_events"] = int(sum(self.unmapped.values()))
        return {"value": values, "alignment": align, "responded_at": now, "source": self.name,
                **self._extras()}
