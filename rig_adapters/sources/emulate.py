"""Stand-ins for the acquisition systems, speaking their documented wire formats in real time.

For rehearsing a rig without the recording PC, for the tests and for the latency benchmark:

- :class:`OpenEphysEmulator` publishes spike trains (and onset TTLs) on a ZMQ PUB socket exactly
  as the Open Ephys ZMQ Interface plugin does (``EVENT``/``DATA`` envelopes, JSON headers with
  consecutive ``message_num``, a block's events before its data) or as the Event Broadcaster does
  in JSON mode (``uint16`` type frame + JSON). Samples are counted from ``acq_start_epoch``, so
  the acquisition clock is offset from the rig's by a known amount.
- :class:`LslEmulator` pushes spikes (one sample per spike, value = unit id) or continuous
  frames (one channel per unit) through a real pylsl outlet, with a known timestamp offset.

Both send one processing block at a time once its last sample is "recorded" and can add per-block
delay (jitter), drop blocks, or stop altogether, so the failure paths can be exercised for real.
:class:`FlipPresenter` is a rig adapter without a display, for driving a source through a real
``cloop rig`` worker.
"""

from __future__ import annotations

import json
import random
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from orchestrator.messages import Trial
from rig_adapters.base import Adapter, AdapterError, AdapterResult, SessionInfo
from rig_adapters.responses import ResponseSource, make_response_source, wait_for_response
from rig_adapters.rig_config import RigConfigError, load_rig_config

try:
    from orjson import dumps as _dumps
except ImportError:  # pragma: no cover
    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj).encode()

__all__ = ["SpikeTrains", "OpenEphysEmulator", "LslEmulator", "FlipPresenter", "poisson_trains"]


@dataclass
class SpikeTrains:
    """Known spikes: sample numbers (ascending) and the unit index of each, plus the unit keys."""

    samples: np.ndarray
    units: np.ndarray
    keys: list[tuple[str, int]]
    """Per unit index: (electrode name, sorted id)."""

    def counts(self, start_s: float, end_s: float, sample_rate: float, order: Sequence[int]) -> list[int]:
        """Spikes per unit with ``start <= sample / rate < end``, units in ``order`` (the truth to compare to)."""
        t = self.samples / sample_rate
        inside = (t >= start_s) & (t < end_s)
        c = np.bincount(self.units[inside], minlength=len(self.keys))
        return [int(c[i]) for i in order]


def poisson_trains(n_units: int, rate_hz: float, duration_s: float, sample_rate: float = 30000.0,
                   seed: int = 0, electrodes: int | None = None) -> SpikeTrains:
    """Seeded Poisson spike trains, 30 kHz sample stamps, units spread over ``electrodes`` channels."""
    rng = np.random.default_rng(seed)
    n_samples = int(duration_s * sample_rate)
    counts = rng.poisson(rate_hz * duration_s, size=n_units)
    samples = np.concatenate([rng.integers(0, n_samples, size=c) for c in counts]) if n_units else np.empty(0, int)
    units = np.repeat(np.arange(n_units), counts)
    order = np.argsort(samples, kind="stable")
    n_el = electrodes or n_units
    keys = [(f"Electrode {u % n_el + 1}", u // n_el) for u in range(n_units)]
    return SpikeTrains(samples=samples[order].astype(np.int64), units=units[order].astype(np.int64), keys=keys)


@dataclass
class _Faults:
    jitter_s: float = 0.0
    delay_s: float = 0.0
    drop_blocks: set[int] = field(default_factory=set)
    stop_at_s: float | None = None


class OpenEphysEmulator:
    """A real-time Open Ephys publisher (ZMQ Interface or Event Broadcaster JSON format)."""

    def __init__(self, trains: SpikeTrains, *, fmt: str = "zmq_interface", sample_rate: float = 30000.0,
                 acq_start_epoch: float | None = None, block_samples: int = 150, stream: str = "example_data",
                 endpoint: str = "tcp://127.0.0.1:*", seed: int = 0) -> None:
        import zmq

        if fmt not in ("zmq_interface", "event_broadcaster"):
            raise ValueError(f"fmt: zmq_interface or event_broadcaster, not {fmt!r}")
        self.trains = trains
        self.fmt = fmt
        self.sample_rate = float(sample_rate)
        self.acq_start_epoch = time.time() if acq_start_epoch is None else float(acq_start_epoch)
        self.block_samples = int(block_samples)
        self.stream = stream
        self.faults = _Faults()
        self._rng = random.Random(seed)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, 1_000_000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._ttl: list[tuple[int, int, bool]] = []
        self._ttl_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.message_num = 0
        self.sent_blocks = 0
        self.on_block: Callable[[int, float], None] | None = None

    def sample_at(self, epoch: float) -> int:
        return int(round((epoch - self.acq_start_epoch) * self.sample_rate))

    def ttl_at(self, epoch: float, line: int = 0, width_s: float = 0.01) -> int:
        """Record an onset TTL (rising edge at ``epoch``, falling ``width_s`` later); return its sample."""
        s = self.sample_at(epoch)
        with self._ttl_lock:
            self._ttl.append((s, line, True))
            self._ttl.append((s + int(width_s * self.sample_rate), line, False))
            self._ttl.sort()
        return s

    def start(self) -> "OpenEphysEmulator":
        self._thread = threading.Thread(target=self._run, name="openephys-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def close(self) -> None:
        self.stop()
        self._sock.close(0)

    # ------------------------------------------------------------------ wire format
    def _send_spike(self, sample: int, electrode: str, sorted_id: int) -> None:
        if self.fmt == "event_broadcaster":
            info = {"event_type": "spike", "stream": self.stream, "source_node": 104, "electrode": electrode,
                    "num_channels": 4, "sample_rate": self.sample_rate, "sample_number": sample,
                    "sorted_id": sorted_id, "amp1": 50.0, "amp2": 40.0, "amp3": 30.0, "amp4": 20.0}
            self._sock.send_multipart([struct.pack("<H", 1), _dumps(info)])
            return
        self.message_num += 1
        header = {"message_num": self.message_num, "type": "spike",
                  "spike": {"stream": self.stream, "source_node": 104, "electrode": electrode, "sample_num": sample,
                            "num_channels": 4, "num_samples": 40, "sorted_id": sorted_id,
                            "threshold": [-50.0] * 4},
                  "timestamp": int(time.time() * 1000)}
        self._sock.send_multipart([b"EVENT\x00", _dumps(header), bytes(4 * 40 * 4)])

    def _send_ttl(self, sample: int, line: int, state: bool) -> None:
        if self.fmt == "event_broadcaster":
            info = {"event_type": "ttl", "stream": self.stream, "source_node": 100, "sample_rate": self.sample_rate,
                    "channel_name": "TTL", "sample_number": sample, "line": line, "state": int(state)}
            self._sock.send_multipart([struct.pack("<H", 0), _dumps(info)])
            return
        self.message_num += 1
        header = {"message_num": self.message_num, "type": "event",
                  "content": {"stream": self.stream, "source_node": 100, "type": 3, "sample_num": sample},
                  "data_size": 10, "timestamp": int(time.time() * 1000)}
        word = (1 << line) if state else 0
        payload = struct.pack("<BBQ", line, int(state), word)
        self._sock.send_multipart([b"EVENT\x00", _dumps(header), payload])

    def _send_data(self, first: int, n: int) -> None:
        if self.fmt == "event_broadcaster":
            return  # the Event Broadcaster sends no continuous data
        self.message_num += 1
        header = {"message_num": self.message_num, "type": "data",
                  "content": {"stream": self.stream, "channel_num": 0, "channel_name": "CH1", "num_samples": n,
                              "sample_num": first, "sample_rate": self.sample_rate},
                  "data_size": 4 * n, "timestamp": int(time.time() * 1000)}
        self._sock.send_multipart([b"DATA\x00", _dumps(header), bytes(4 * n)])

    # ------------------------------------------------------------------ real time
    def _run(self) -> None:
        fs, bs = self.sample_rate, self.block_samples
        samples, units, keys = self.trains.samples, self.trains.units, self.trains.keys
        block = max(0, int((time.time() - self.acq_start_epoch) * fs) // bs)
        cursor = int(np.searchsorted(samples, block * bs))
        while not self._stop.is_set():
            a, b = block * bs, (block + 1) * bs
            due = self.acq_start_epoch + b / fs + self.faults.delay_s
            if self.faults.jitter_s:
                due += self._rng.uniform(0, self.faults.jitter_s)
            wait = due - time.time()
            if wait > 0:
                self._stop.wait(wait)
                if self._stop.is_set():
                    return
            if self.faults.stop_at_s is not None and b / fs >= self.faults.stop_at_s:
                return  # the acquisition PC stopped sending
            end = int(np.searchsorted(samples, b))
            with self._ttl_lock:
                ttls = [e for e in self._ttl if a <= e[0] < b]
            if block in self.faults.drop_blocks:
                # the messages are lost on the way: their numbers are used up all the same
                if self.fmt == "zmq_interface":
                    self.message_num += (end - cursor) + len(ttls) + 1
            else:
                idx = list(range(cursor, end))
                self._rng.shuffle(idx)  # a block's spikes come electrode by electrode, not in time order
                for i in idx:
                    electrode, sorted_id = keys[units[i]]
                    self._send_spike(int(samples[i]), electrode, sorted_id)
                for s, line, state in ttls:
                    self._send_ttl(s, line, state)
                self._send_data(a, bs)
            cursor = end
            self.sent_blocks += 1
            if self.on_block is not None:
                self.on_block(b, time.time())
            block += 1


class LslEmulator:
    """A real pylsl outlet pushing spikes (events) or frames (continuous) in real time."""

    def __init__(self, *, name: str, kind: str = "events", n_channels: int = 1, srate: float = 0.0,
                 labels: Sequence[str] | None = None, clock_offset_s: float = 0.0,
                 channel_format: str = "int32", source_id: str = "") -> None:
        import pylsl

        fmt = {"int32": pylsl.cf_int32, "string": pylsl.cf_string, "float32": pylsl.cf_float32}[channel_format]
        self.kind = kind
        self.srate = float(srate)
        self.clock_offset_s = float(clock_offset_s)
        info = pylsl.StreamInfo(name, "Spikes" if kind == "events" else "Calcium", n_channels,
                                srate if kind == "continuous" else pylsl.IRREGULAR_RATE, fmt,
                                source_id or f"cloop-emulator-{name}")
        if labels is not None:
            chans = info.desc().append_child("channels")
            for label in labels:
                chans.append_child("channel").append_child_value("label", str(label))
        self.outlet = pylsl.StreamOutlet(info, chunk_size=0, max_buffered=360)
        self._pylsl = pylsl
        self._lock = threading.Lock()
        self._markers: list[tuple[float, Any]] = []
        self._thread: threading.Thread | None = None
        self._items: tuple[np.ndarray, list[Any] | None, np.ndarray | None] = (np.empty(0), [], None)
        self.stop_at: float | None = None
        """Stream time at which the outlet stops sending (a stream that dies mid-session)."""
        self.drop_between: list[tuple[float, float]] = []
        """Frames stamped inside these stream-time intervals are never sent."""

    def stream_time(self, lsl_time: float | None = None) -> float:
        """This outlet's clock: the machine's LSL clock plus the injected offset."""
        return (self._pylsl.local_clock() if lsl_time is None else lsl_time) + self.clock_offset_s

    def start_events(self, stamps: np.ndarray, values: Sequence[Any], *, block_s: float = 0.002,
                     heartbeat: Any = None) -> "LslEmulator":
        """Push each spike once the outlet's clock passes its stamp; a ``heartbeat`` sample per block."""
        self._items = (np.asarray(stamps, dtype=np.float64), list(values), None)
        return self._start(block_s, heartbeat)

    def start_frames(self, stamps: np.ndarray, frames: np.ndarray, *, block_s: float = 0.002) -> "LslEmulator":
        """Push each frame (one value per channel) once the outlet's clock passes its stamp."""
        self._items = (np.asarray(stamps, dtype=np.float64), None, np.asarray(frames, dtype=np.float32))
        return self._start(block_s, None)

    def marker_at(self, stamp: float, value: Any) -> None:
        """An onset marker (events streams), pushed in time order with the spikes."""
        with self._lock:
            self._markers.append((float(stamp), value))
            self._markers.sort(key=lambda m: m[0])

    def _start(self, block_s: float, heartbeat: Any) -> "LslEmulator":
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(block_s, heartbeat), daemon=True,
                                        name="lsl-emulator")
        self._thread.start()
        return self

    def _run(self, block_s: float, heartbeat: Any) -> None:
        stamps, values, frames = self._items
        i = int(np.searchsorted(stamps, self.stream_time()))
        while not self._stop.wait(block_s):
            now = self.stream_time()
            if self.stop_at is not None and now >= self.stop_at:
                return
            j = int(np.searchsorted(stamps, now, side="right"))
            with self._lock:
                due = [m for m in self._markers if m[0] <= now]
                self._markers = [m for m in self._markers if m[0] > now]
            if frames is not None:
                keep = [k for k in range(i, j) if not any(a <= stamps[k] < b for a, b in self.drop_between)]
                if keep:
                    self.outlet.push_chunk(frames[keep].tolist(), stamps[keep].tolist())
            else:
                merged = sorted([(float(stamps[k]), values[k]) for k in range(i, j)] + due, key=lambda m: m[0])
                if heartbeat is not None:
                    merged.append((now, heartbeat))
                if merged:
                    self.outlet.push_chunk([[v] for _, v in merged], [ts for ts, _ in merged])
            i = j

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.outlet = None


class FlipPresenter(Adapter):
    """A presenter without a display: the "flip" is the moment the trial arrives.

    ``cloop rig --adapter rig_adapters.sources.emulate:FlipPresenter -o rig_config=RIG.yaml
    -o response=openephys`` rehearses an acquisition source end to end (network, alignment,
    binning, retries) before a display is attached.
    """

    name = "flip"

    def __init__(self, response: ResponseSource) -> None:
        self.response = response

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "FlipPresenter":
        unknown = set(options) - {"rig_config", "response", "truth", "seed"}
        if unknown:
            raise AdapterError(f"the flip presenter has no option(s) {sorted(unknown)}")
        try:
            rig = load_rig_config(options.get("rig_config") or None)
        except RigConfigError as exc:
            raise AdapterError(str(exc)) from None
        return cls(make_response_source(options.get("response") or "openephys", rig=rig,
                                        truth=options.get("truth"), seed=int(options.get("seed") or 0)))

    def capabilities(self) -> dict[str, list[str]]:
        return {"stimulus_types": ["*"], "response_kinds": list(self.response.response_kinds)}

    def start(self, session: SessionInfo) -> None:
        self.response.start(session)

    def present(self, cmd: Trial) -> AdapterResult:
        onset = time.time()
        self.response.begin(cmd, onset)
        payload = wait_for_response(self.response, cmd, onset)
        responded_at = float(payload.pop("responded_at", time.time()))
        return AdapterResult(response=payload, timing={"presented_at": onset, "responded_at": responded_at},
                             meta={"adapter": self.name, "response_source": self.response.name})

    def close(self) -> None:
        self.response.close()
