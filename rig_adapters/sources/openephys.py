"""``openephys``: population responses from the Open Ephys GUI's ZeroMQ plugins.

Both of Open Ephys's documented message formats are read (and told apart per message):

- **ZMQ Interface** (PUB, default data port 5556): three-part messages — an envelope
  (``DATA\\0`` or ``EVENT\\0``), a JSON header ``{"message_num", "type": "data"|"event"|"spike",
  "content" | "spike": {...}, "data_size", "timestamp"}``, then the payload (float32 samples, the
  TTL bytes ``line, state, word``, or the spike waveform). Spikes carry ``electrode``,
  ``sorted_id`` and ``sample_num``; ``data`` headers carry ``sample_num``, ``num_samples`` and
  ``sample_rate``. The plugin sends a block's events before its data, so a ``data`` header proves
  the stream complete up to its last sample; ``message_num`` is consecutive, so a lost message is
  seen as a gap.
- **Event Broadcaster** in JSON mode (PUB, default port 5557): two parts — a ``uint16`` type (0 TTL,
  1 spike) and a JSON object with ``event_type``, ``stream``, ``sample_rate``, ``sample_number``,
  plus ``electrode``/``sorted_id`` (spikes) or ``line``/``state`` (TTL). It has no sequence numbers
  and no continuous data: lost messages cannot be detected, and a spike only proves the stream
  complete up to one processing block (``block_s``) before it.

A unit's key is ``unit_key`` formatted with the message's fields (default ``"{electrode}#{sorted_id}"``),
mapped to the protocol's unit ids through ``unit_map``. Times are ``sample_number / sample_rate`` on
the acquisition clock; see :mod:`rig_adapters.sources.alignment` for how onsets get there.

Rig config::

    sources:
      openephys:
        endpoints: ["tcp://10.0.0.2:5556"]   # ZMQ Interface data port and/or Event Broadcaster port
        sample_rate_hz: 30000                 # needed only if no message carries the rate
        unit_key: "{electrode}#{sorted_id}"
        unit_map: {v1_a: "Electrode 1#1"}
        stream: null                          # only messages of this Open Ephys stream name
        sync: {line: 0, required: true, tolerance_s: 0.1}   # photodiode/TTL line; omit for clock offset
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rig_adapters.base import AdapterError
from rig_adapters.rig_config import RigConfig
from rig_adapters.sources.alignment import OffsetEstimator, TtlLog
from rig_adapters.sources.window import (
    AcquisitionGap,
    AcquisitionSource,
    Alignment,
    SourceSettings,
    SyncMissing,
    _Pending,
    source_settings,
)

__all__ = ["OpenEphysSource", "OpenEphysSettings", "SyncSettings", "OeMessage", "parse_frames"]

log = logging.getLogger("cloop.sources.openephys")

try:  # 10k spikes/s are 10k JSON headers/s: orjson (a dependency of Prefect) parses them ~5x faster
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - the standard library is always there
    _loads = json.loads

#: EventChannel::TTL in the Open Ephys plugin API (the ``content.type`` of a ZMQ Interface event).
OE_TTL_TYPE = 3
_ZMQ_ENVELOPES = {b"DATA\x00", b"EVENT\x00", b"DATA", b"EVENT"}


class SyncSettings(BaseModel):
    """The TTL line that carries the stimulus onset (photodiode or presenter TTL)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    line: int = Field(ge=0, le=255)
    required: bool = True
    """True: a trial without its onset edge fails (``sync_missing``); False: fall back to the clock offset."""
    tolerance_s: float = Field(default=0.1, gt=0, le=10)
    """How far from the clock estimate's prediction the edge may be."""


class OpenEphysSettings(SourceSettings):
    endpoints: list[str] = Field(min_length=1)
    sample_rate_hz: float | None = Field(default=None, gt=0)
    unit_key: str = "{electrode}#{sorted_id}"
    stream: str | None = None
    sync: SyncSettings | None = None
    block_s: float = Field(default=0.05, ge=0, le=5)
    """A spike proves the stream complete only up to this long before it (events of one block come in any order)."""
    settle_s: float = Field(default=0.002, ge=0, le=5)
    """Extra time past the window's end before it is final (spike detectors report a peak a few samples late)."""

    @field_validator("endpoints", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("unit_key")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            value.format(electrode="e", sorted_id=0, stream="s", source_node=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"unit_key may use {{electrode}}, {{sorted_id}}, {{stream}}, {{source_node}}: {exc}")
        return value


@dataclass(slots=True)
class OeMessage:
    """One decoded Open Ephys message (``kind`` spike, ttl or data)."""

    kind: str
    sample_number: int
    sample_rate: float | None
    stream: str
    fmt: str
    """``zmq_interface`` or ``event_broadcaster``."""
    message_num: int | None = None
    electrode: str = ""
    sorted_id: int = 0
    source_node: int = 0
    line: int = 0
    state: bool = False
    num_samples: int = 0


def parse_frames(frames: list[bytes]) -> OeMessage | None:
    """Decode one multipart message; None for messages that carry nothing to count (e.g. text events).

    Raises ValueError naming what is wrong for anything that is neither documented format.
    """
    frames = [_raw(f) for f in frames[:2]] + list(frames[2:])  # zmq.Frame (zero-copy) or bytes
    if len(frames) >= 2 and bytes(frames[0]) in _ZMQ_ENVELOPES:
        return _zmq_interface(frames)
    if len(frames) == 2 and len(frames[0]) == 2:
        return _event_broadcaster(frames)
    raise ValueError(f"not an Open Ephys ZMQ Interface or Event Broadcaster (JSON) message ({len(frames)} frames)")


def _zmq_interface(frames: list[bytes]) -> OeMessage | None:
    header = _loads(bytes(frames[1]))
    kind = header.get("type")
    num = header.get("message_num")
    num = int(num) if isinstance(num, int) else None
    if kind == "data":
        c = header["content"]
        return OeMessage("data", int(c["sample_num"]), float(c["sample_rate"]) if c.get("sample_rate") else None,
                         str(c.get("stream", "")), "zmq_interface", num, num_samples=int(c["num_samples"]))
    if kind == "spike":
        s = header["spike"]
        return OeMessage("spike", int(s["sample_num"]), None, str(s.get("stream", "")), "zmq_interface", num,
                         electrode=str(s["electrode"]), sorted_id=int(s.get("sorted_id", 0)),
                         source_node=int(s.get("source_node", 0)))
    if kind == "event":
        c = header["content"]
        if int(c.get("type", OE_TTL_TYPE)) != OE_TTL_TYPE or len(frames) < 3 or len(_raw(frames[2])) < 2:
            return OeMessage("other", int(c.get("sample_num", 0)), None, str(c.get("stream", "")), "zmq_interface", num)
        payload = _raw(frames[2])
        return OeMessage("ttl", int(c["sample_num"]), None, str(c.get("stream", "")), "zmq_interface", num,
                         source_node=int(c.get("source_node", 0)), line=payload[0], state=bool(payload[1]))
    raise ValueError(f"ZMQ Interface header type {kind!r} is not data, event or spike")


def _raw(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _event_broadcaster(frames: list[bytes]) -> OeMessage | None:
    try:
        info = _loads(bytes(frames[1]))
    except ValueError:
        raise ValueError("Event Broadcaster message is not JSON: set the plugin's output format to JSON") from None
    kind = info.get("event_type")
    rate = float(info["sample_rate"]) if info.get("sample_rate") else None
    if kind == "spike":
        return OeMessage("spike", int(info["sample_number"]), rate, str(info.get("stream", "")), "event_broadcaster",
                         electrode=str(info["electrode"]), sorted_id=int(info.get("sorted_id", 0)),
                         source_node=int(info.get("source_node", 0)))
    if kind == "ttl":
        return OeMessage("ttl", int(info["sample_number"]), rate, str(info.get("stream", "")), "event_broadcaster",
                         source_node=int(info.get("source_node", 0)), line=int(info["line"]),
                         state=bool(info["state"]))
    raise ValueError(f"Event Broadcaster event_type {kind!r} is not spike or ttl")


class OpenEphysSource(AcquisitionSource):
    """Counts each unit's spikes from Open Ephys in the protocol's response window."""

    name = "openephys"

    def __init__(self, rig: RigConfig, truth: str | None = None, seed: int = 0,
                 settings: OpenEphysSettings | None = None) -> None:
        cfg = settings if settings is not None else source_settings(rig, "openephys", OpenEphysSettings)
        assert isinstance(cfg, OpenEphysSettings)
        super().__init__(cfg)
        self.cfg = cfg
        self.sample_rate: float | None = cfg.sample_rate_hz
        self.clock = OffsetEstimator()
        self.ttl = TtlLog()
        self.bad_messages = 0
        self.formats: set[str] = set()
        self._ctx: Any = None
        self._socks: list[Any] = []
        self._last_num: dict[int, tuple[int, float]] = {}
        self._restarted: str | None = None
        self._warned: set[str] = set()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._rx_error: str | None = None
        self._keys: dict[tuple[str, int, str, int], str] = {}
        self._index_of: dict[tuple[str, int, str, int], int] = {}
        self._unplaced = -1
        """Latest sample number of spikes dropped while the sample rate was unknown (-1: none)."""

    # ------------------------------------------------------------------ stream
    def _connect(self) -> None:
        if self._socks:
            return
        import zmq

        self._ctx = zmq.Context.instance()
        for endpoint in self.cfg.endpoints:
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 1_000_000)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            try:
                sock.connect(endpoint)
            except zmq.ZMQError as exc:
                sock.close(0)
                raise AdapterError(f"rig config sources.openephys.endpoints: cannot connect to {endpoint!r}: "
                                   f"{exc}") from None
            self._socks.append(sock)
        self._closing.clear()
        self._thread = threading.Thread(target=self._receive, name="cloop-openephys-rx", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        if self._rx_error is not None:
            raise AdapterError(f"openephys: the receiving thread failed: {self._rx_error}")

    def _receive(self) -> None:
        """Receiver thread: stamp every message on arrival (the clock estimate needs prompt receipt times)."""
        import zmq

        poller = zmq.Poller()
        for sock in self._socks:
            poller.register(sock, zmq.POLLIN)
        try:
            while not self._closing.is_set():
                ready = dict(poller.poll(50))
                if not ready:
                    continue
                for i, sock in enumerate(self._socks):
                    if sock not in ready:
                        continue
                    more = True
                    while more:  # in short batches, so the presenter never waits long for the lock
                        while self.lock_wanted.is_set() and not self._closing.is_set():
                            time.sleep(0.0002)  # the presenter takes its turn first
                        with self.lock:
                            for _ in range(64):
                                try:
                                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                                except zmq.Again:
                                    more = False
                                    break
                                self._on_frames(i, frames, time.time())
        except Exception as exc:  # surfaced to the presenter by the next begin/poll
            if not self._closing.is_set():
                self._rx_error = f"{type(exc).__name__}: {exc}"
                log.exception("openephys receiver failed")

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", text)

    def _on_frames(self, sock_index: int, frames: list[bytes], received: float) -> None:
        if self.sample_rate is not None and len(frames) == 3 and self._fast_spike(sock_index, frames, received):
            return
        try:
            msg = parse_frames(frames)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            self.bad_messages += 1
            self._warn_once(f"bad:{type(exc).__name__}", f"openephys: ignored a message: {exc}")
            return
        if msg is None:
            return
        self.last_rx = received
        self.messages += 1
        self.formats.add(msg.fmt)
        if msg.sample_rate:
            self.sample_rate = msg.sample_rate
        fs = self.sample_rate
        if fs is None:
            # a ZMQ Interface spike before the first data header: it cannot be placed in time
            self._unplaced = max(self._unplaced, msg.sample_number)
            self.bad_messages += 1
            self._warn_once("rate", "openephys: spikes before any message with a sample rate are not counted "
                                    "(set sources.openephys.sample_rate_hz, or select a continuous channel)")
            return
        t = msg.sample_number / fs
        if self._unplaced >= 0:  # no window that could have held them is ever reported
            self.gaps.append((-math.inf, self._unplaced / fs + self.cfg.block_s, "spikes before the sample rate"))
            self._unplaced = -1
        if msg.message_num is not None:
            self._check_sequence(sock_index, msg.message_num, t)
        if self.cfg.stream is not None and msg.stream != self.cfg.stream:
            return
        if msg.kind == "data":
            end = (msg.sample_number + msg.num_samples) / fs
            self.clock.add(received, end)
            self.progress = max(self.progress, end - self.cfg.settle_s)
            return
        self.progress = max(self.progress, t - self.cfg.block_s - self.cfg.settle_s)
        if msg.kind == "ttl":
            self.clock.add(received, t)
            self.ttl.add(msg.line, t, msg.state)
        elif msg.kind == "spike":
            self.clock.add(received, t)
            ident = (msg.electrode, msg.sorted_id, msg.stream, msg.source_node)
            key = self._keys.get(ident)
            if key is None:
                key = self._keys[ident] = self.cfg.unit_key.format(electrode=msg.electrode, sorted_id=msg.sorted_id,
                                                                   stream=msg.stream, source_node=msg.source_node)
            index = self.unit_index.get(key)
            if index is None:
                self.unmapped[key] += 1
            else:
                self.events.add(t, index)

    def _units_changed(self) -> None:
        self._index_of.clear()
        self.events.clear()

    def _fast_spike(self, sock_index: int, frames: list[Any], received: float) -> bool:
        """The same as the general path for a ZMQ Interface spike (nearly all traffic), at half the cost."""
        if _raw(frames[0]) != b"EVENT\x00":
            return False
        try:
            header = _loads(_raw(frames[1]))
            if header.get("type") != "spike":
                return False
            spike = header["spike"]
            sample = int(spike["sample_num"])
            ident = (str(spike["electrode"]), int(spike.get("sorted_id", 0)), str(spike.get("stream", "")),
                     int(spike.get("source_node", 0)))
            num = header.get("message_num")
        except (ValueError, KeyError, TypeError):
            return False  # the general path reports it
        assert self.sample_rate is not None
        t = sample / self.sample_rate
        self.last_rx = received
        self.messages += 1
        self.formats.add("zmq_interface")
        if isinstance(num, int):
            last = self._last_num.get(sock_index)
            if last is not None and num == last[0] + 1:
                self._last_num[sock_index] = (num, t)
            else:
                self._check_sequence(sock_index, num, t)
        if self.cfg.stream is not None and ident[2] != self.cfg.stream:
            return True
        self.progress = max(self.progress, t - self.cfg.block_s - self.cfg.settle_s)
        self.clock.add(received, t)
        index = self._index_of.get(ident, -2)
        if index == -2:
            key = self.cfg.unit_key.format(electrode=ident[0], sorted_id=ident[1], stream=ident[2],
                                           source_node=ident[3])
            index = self._index_of[ident] = self.unit_index.get(key, -1)
            self._keys[ident] = key
        if index < 0:
            self.unmapped[self._keys[ident]] += 1
        else:
            self.events.add(t, index)
        return True

    def _check_sequence(self, sock_index: int, num: int, t: float) -> None:
        last = self._last_num.get(sock_index)
        self._last_num[sock_index] = (num, t)
        if last is None:
            return
        prev, prev_t = last
        if num == prev + 1:
            return
        if num <= prev:  # the plugin restarts its count when acquisition restarts: nothing lines up any more
            self._restarted = f"acquisition restarted (message_num {prev} -> {num})"
            self.clock.reset()
            self.ttl.clear()
            self.events.clear()
            self.progress = -math.inf
            return
        pad = self.cfg.block_s + self.cfg.settle_s
        self.gaps.append((min(prev_t, t) - pad, max(prev_t, t) + pad, f"{num - prev - 1} message(s) lost"))

    # ------------------------------------------------------------------ alignment
    def _align(self, pending: _Pending, now: float) -> Alignment | None:
        if "alignment" in pending.state:
            return pending.state["alignment"]
        if self._restarted:
            why, self._restarted = self._restarted, None
            raise AcquisitionGap(f"openephys: {why} during trial {pending.cmd.trial_id}")
        est = self.clock.estimate()
        if est is None or self.sample_rate is None:
            return None
        offset, spread, n = est
        fs = self.sample_rate
        predicted = pending.onset - offset
        clock = {"clock_offset_s": offset, "clock_spread_s": spread, "clock_messages": n, "sample_rate_hz": fs,
                 "formats": sorted(self.formats)}
        sync = self.cfg.sync
        alignment: Alignment | None = None
        if sync is not None:
            edge = self.ttl.nearest(sync.line, predicted, sync.tolerance_s)
            if edge is None:
                if self.progress < predicted + sync.tolerance_s:
                    return None  # the edge may still come
                if sync.required:
                    raise SyncMissing(f"openephys: no rising edge on TTL line {sync.line} within "
                                      f"{sync.tolerance_s:g} s of the onset of trial {pending.cmd.trial_id}")
                clock["ttl_missing"] = True
            else:
                self.ttl.used_until = edge
                alignment = Alignment("ttl", pending.onset, edge, 1.0 / fs,
                                      {"ttl_line": sync.line, "ttl_sample": int(round(edge * fs)),
                                       "ttl_residual_s": edge - predicted, **clock})
        if alignment is None:
            alignment = Alignment("clock_offset", pending.onset, predicted, spread + 1.0 / fs, clock)
        pending.state["alignment"] = alignment
        return alignment

    def _extras(self) -> dict[str, Any]:
        return {"bad_messages": self.bad_messages} if self.bad_messages else {}

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        for sock in self._socks:
            sock.close(0)
        self._socks = []
