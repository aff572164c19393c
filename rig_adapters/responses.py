"""Response sources: where a rig's answer comes from once a stimulus is on.

A rig is a presenting adapter (display, stimulator) plus one response source:

- ``simulated``: a seeded ground-truth subject (wraps :class:`rig_adapters.simulated.SimulatedAdapter`);
- ``keyboard``: key presses mapped to values (rig config ``keyboard.keys``), Escape aborts;
- ``zmq``: a ZMQ SUB stream of events or spike counts from the acquisition system (e.g. an
  Open Ephys-style publisher), counted in a window around stimulus onset.

The presenter calls ``begin`` right after the onset flip (epoch seconds on this machine's clock),
hands it key presses with ``offer_keys`` while it keeps polling, and takes the first payload
``poll`` returns. Labs add sources with the ``cloop.responses`` entry point group: the entry
point names a :class:`ResponseSource` subclass, constructed as ``cls(rig=RigConfig, truth=str|None,
seed=int)``, and ``cloop rig ... -o response=NAME`` selects it.
"""

from __future__ import annotations

import abc
import collections
import json
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from orchestrator.messages import Trial
from rig_adapters.base import RESPONSE_KINDS, AdapterError, SessionInfo
from rig_adapters.rig_config import KeyboardConfig, RigConfig, ZmqSourceConfig

__all__ = [
    "TrialAborted",
    "ResponseTimeout",
    "KeyEvent",
    "ResponseSource",
    "SimulatedResponse",
    "KeyboardResponse",
    "ZmqResponse",
    "KeyboardPoller",
    "make_response_source",
    "wait_for_response",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "cloop.responses"


class TrialAborted(AdapterError):
    """The operator aborted the trial (Escape). The session should pause; nothing was recorded."""

    code = "aborted"


class ResponseTimeout(AdapterError):
    """No response arrived within the trial's ``timeout_s``."""

    code = "response_timeout"


@dataclass(frozen=True)
class KeyEvent:
    name: str
    t: float
    """Key-down time, epoch seconds."""


class ResponseSource(abc.ABC):
    name: str = "response"
    response_kinds: tuple[str, ...] = RESPONSE_KINDS
    #: Keys the presenter must watch and pass to :meth:`offer_keys` (abort key included).
    watch_keys: tuple[str, ...] = ()
    abort_key: str | None = None

    def start(self, session: SessionInfo) -> None:
        """Prepare for a session (parse the protocol, connect to streams)."""

    @abc.abstractmethod
    def begin(self, cmd: Trial, onset: float) -> None:
        """The stimulus of ``cmd`` went on at ``onset`` (epoch s): start listening."""

    def offer_keys(self, keys: list[KeyEvent]) -> None:
        """Key presses seen by the presenter since the last call."""
        if self.abort_key and any(k.name == self.abort_key for k in keys):
            raise TrialAborted(f"trial aborted by the operator ({self.abort_key})")

    @abc.abstractmethod
    def poll(self, now: float) -> dict[str, Any] | None:
        """The response payload (``{"value": ..., "responded_at": epoch s, ...}``) once available."""

    def close(self) -> None:
        """Release sockets and devices."""


class SimulatedResponse(ResponseSource):
    """Answers from a seeded ground-truth model of the session's protocol, at once."""

    name = "simulated"

    def __init__(self, truth: str, seed: int = 0) -> None:
        from rig_adapters.simulated import SimulatedAdapter

        self._subject = SimulatedAdapter(truth=truth, seed=seed)
        self._cmd: Trial | None = None

    def start(self, session: SessionInfo) -> None:
        self._subject.start(session)

    def begin(self, cmd: Trial, onset: float) -> None:
        self._cmd = cmd

    def poll(self, now: float) -> dict[str, Any] | None:
        if self._cmd is None:
            return None
        result = self._subject.present(self._cmd)
        self._cmd = None
        return {**result.response, "source": "simulated", "responded_at": time.time()}


class KeyboardResponse(ResponseSource):
    """The first mapped key after onset is the response; the abort key aborts the trial."""

    name = "keyboard"

    def __init__(self, config: KeyboardConfig) -> None:
        self.keys = dict(config.keys)
        self.abort_key = config.abort_key
        self.watch_keys = tuple(self.keys) + (config.abort_key,)
        values = set(self.keys.values())
        self.response_kinds = ("bernoulli",) if values <= {0.0, 1.0} else ("gaussian",)
        self._onset: float | None = None
        self._payload: dict[str, Any] | None = None

    def begin(self, cmd: Trial, onset: float) -> None:
        self._onset = onset
        self._payload = None

    def offer_keys(self, keys: list[KeyEvent]) -> None:
        super().offer_keys(keys)
        if self._onset is None or self._payload is not None:
            return
        for key in keys:
            if key.name in self.keys and key.t >= self._onset:
                value = self.keys[key.name]
                self._payload = {"value": int(value) if float(value).is_integer() else value,
                                 "key": key.name, "rt_s": key.t - self._onset, "responded_at": key.t,
                                 "source": "keyboard"}
                return

    def poll(self, now: float) -> dict[str, Any] | None:
        return self._payload


class ZmqResponse(ResponseSource):
    """Counts events (or sums a count field) from a ZMQ PUB stream in a window around onset.

    Each message's last frame is a JSON object with the timestamp field (epoch seconds on a clock
    synchronised with the rig's, NTP/PTP) and optionally a count field. The payload is ready once
    the window has closed plus ``settle_s``.
    """

    name = "zmq"
    response_kinds = ("poisson", "gaussian")

    def __init__(self, config: ZmqSourceConfig) -> None:
        self.config = config
        self._ctx: Any = None
        self._sock: Any = None
        self._events: list[tuple[float, float]] = []
        self._window: tuple[float, float] | None = None
        self.bad_messages = 0

    def start(self, session: SessionInfo) -> None:
        if self._sock is None:
            import zmq

            self._ctx = zmq.Context.instance()
            self._sock = self._ctx.socket(zmq.SUB)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.RCVHWM, 100_000)
            self._sock.setsockopt_string(zmq.SUBSCRIBE, self.config.topic)
            self._sock.connect(self.config.endpoint)

    def _drain(self) -> None:
        import zmq

        if self._sock is None:
            raise AdapterError("zmq response source not started")
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = self._parse(frames[-1])
            if event is not None:
                self._events.append(event)

    def _parse(self, body: bytes) -> tuple[float, float] | None:
        try:
            data = json.loads(body)
            t = float(data[self.config.time_field])
            count = 1.0 if self.config.count_field is None else float(data[self.config.count_field])
        except (ValueError, KeyError, TypeError):
            self.bad_messages += 1
            return None
        return (t, count)

    def begin(self, cmd: Trial, onset: float) -> None:
        self._drain()
        start = onset + self.config.window_s[0]
        self._window = (start, onset + self.config.window_s[1])
        self._events = [e for e in self._events if e[0] >= start]

    def poll(self, now: float) -> dict[str, Any] | None:
        if self._window is None:
            return None
        self._drain()
        start, end = self._window
        if now < end + self.config.settle_s:
            return None
        inside = [c for t, c in self._events if start <= t < end]
        self._events = [e for e in self._events if e[0] >= end]
        self._window = None
        total = sum(inside)
        return {"value": int(total) if float(total).is_integer() else total, "n_messages": len(inside),
                "window_start": start, "window_end": end, "responded_at": end, "source": "zmq"}

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


class KeyboardPoller:
    """PsychoPy keyboard (psychtoolbox backend where available): key-down events with epoch times."""

    def __init__(self, keys: tuple[str, ...], backend: str = "") -> None:
        from psychopy import logging as plog
        from psychopy.hardware import keyboard

        self._plog = plog
        self.keys = list(keys)
        self.kb = keyboard.Keyboard(backend=backend)
        self.backend = self.kb.getBackend()
        if self.backend == "event":
            # PsychoPy 2026.2's event backend stores [name, time] lists as key names, so key lists
            # never match: refuse it rather than silently never seeing a response or an Escape
            raise AdapterError("PsychoPy chose its 'event' keyboard backend, which cannot report keys reliably; "
                               "install psychtoolbox (pip) or set keyboard.backend: ptb / iohub in the rig config")
        self.kb.clearEvents()
        self._reported: collections.deque[tuple[str, float]] = collections.deque(maxlen=256)

    def clear(self) -> None:
        self.kb.clearEvents()

    def poll(self) -> list[KeyEvent]:
        """Key presses since the last call (pressed, or pressed and already released)."""
        if not self.keys:
            return []
        offset = time.time() - self._plog.defaultClock.getTime()
        events: list[KeyEvent] = []
        # A press is reported while held and again on release (same key, same tDown): once only.
        for wait_release in (False, True):
            for key in self.kb.getKeys(keyList=self.keys, waitRelease=wait_release, clear=True):
                if key.tDown is None:
                    continue
                ident = (str(key.name), float(key.tDown))
                if ident in self._reported:
                    continue
                self._reported.append(ident)
                events.append(KeyEvent(name=ident[0], t=ident[1] + offset))
        return sorted(events, key=lambda e: e.t)


def wait_for_response(source: ResponseSource, cmd: Trial, onset: float, *,
                      keys: KeyboardPoller | None = None, tick_s: float = 0.001,
                      idle: Callable[[], None] | None = None) -> dict[str, Any]:
    """Poll ``source`` (feeding it key presses) until it answers or ``cmd.timeout_s`` passes."""
    deadline = onset + cmd.timeout_s
    while True:
        if keys is not None:
            source.offer_keys(keys.poll())
        now = time.time()
        payload = source.poll(now)
        if payload is not None:
            return payload
        if now > deadline:
            raise ResponseTimeout(f"no response within {cmd.timeout_s:g} s of onset")
        if idle is not None:
            idle()
        else:
            time.sleep(tick_s)


def make_response_source(name: str, *, rig: RigConfig, truth: str | None = None, seed: int = 0) -> ResponseSource:
    """Build a response source by name: simulated, keyboard, zmq, or a ``cloop.responses`` plugin."""
    if name == "simulated":
        if not truth:
            raise AdapterError("--response simulated needs --truth MODEL[:param=value,...]")
        return SimulatedResponse(truth, seed)
    if name == "keyboard":
        return KeyboardResponse(rig.keyboard)
    if name == "zmq":
        if rig.zmq is None:
            raise AdapterError("--response zmq needs a `zmq:` section in the rig config")
        return ZmqResponse(rig.zmq)
    plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name in plugins:
        cls = plugins[name].load()
        return cls(rig=rig, truth=truth, seed=seed)
    known = ["simulated", "keyboard", "zmq", *sorted(plugins)]
    raise AdapterError(f"unknown response source {name!r} (known: {', '.join(known)})")
