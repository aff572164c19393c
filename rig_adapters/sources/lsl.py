"""``lsl``: population responses from a Lab Streaming Layer outlet (pylsl, which ships liblsl).

The stream is chosen by ``name``, ``type`` and/or ``source_id`` in the rig config, and is one of:

- **events** (irregular rate, one channel): one sample per spike, its value names the unit
  (online sorters, spike detectors). The value ``sync_value`` marks a stimulus onset recorded on the
  stream's own clock (a photodiode/TTL marker); ``heartbeat_value`` only marks time passing, so
  a quiet population still proves the window is over. Per unit: the spike count in the window.
- **continuous** (regular rate, one channel per unit, labels from the stream's
  ``desc/channels/channel/label`` or the channel index): e.g. a 2-photon pipeline's dF/F. Per
  unit: the mean of the samples in the window. A channel named ``sync_channel`` (a photodiode)
  marks the onset where it first rises above ``sync_threshold``; missing samples inside the window
  (a timestamp step over 1.5 sample periods) fail the trial.

Alignment: LSL timestamps are on the outlet's clock. liblsl's ``time_correction`` (with its own
uncertainty, via ``lsl_time_correction_ex``) maps them onto this machine's LSL clock, and the
rig's epoch onset is put on that clock by bracketing ``time.time()`` between two
``local_clock()`` reads. A sync marker, when configured and present, replaces that estimate.

Rig config::

    sources:
      lsl:
        name: "Sorter spikes"      # and/or type: "Spikes", source_id: "..."
        kind: auto                 # events | continuous | auto (from the nominal rate)
        sync_value: "onset"        # events streams; or sync_channel: "photodiode" for continuous
"""

from __future__ import annotations

import ctypes
import math
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from rig_adapters.base import AdapterError
from rig_adapters.rig_config import RigConfig
from rig_adapters.sources.alignment import OffsetEstimator, TtlLog
from rig_adapters.sources.window import (
    AcquisitionError,
    AcquisitionGap,
    AcquisitionSource,
    AcquisitionStalled,
    Alignment,
    SourceSettings,
    SyncMissing,
    _Pending,
    source_settings,
)

__all__ = ["LslSource", "LslSettings", "ClockMismatch", "epoch_to_lsl_offset"]


class ClockMismatch(AcquisitionError):
    """The outlet's timestamps are not on the clock LSL's time correction maps: no trustworthy onset."""

    code = "clock_mismatch"


class LslSettings(SourceSettings):
    name: str | None = None
    type: str | None = None
    source_id: str | None = None
    kind: Literal["auto", "events", "continuous"] = "auto"
    resolve_timeout_s: float = Field(default=5.0, gt=0, le=600)
    sync_value: str | None = None
    sync_channel: str | None = None
    sync_threshold: float = 0.5
    sync_required: bool = True
    sync_tolerance_s: float = Field(default=0.1, gt=0, le=10)
    heartbeat_value: str | None = None
    clock_mismatch_s: float = Field(default=0.5, gt=0)
    """Without a marker, refuse trials when receipt times and time correction disagree by more than this."""
    settle_s: float = Field(default=0.0, ge=0, le=5)
    """Extra stream time past the window's end before it is final (for outlets that push slightly out of order)."""

    @model_validator(mode="after")
    def _chosen(self) -> "LslSettings":
        if not (self.name or self.type or self.source_id):
            raise ValueError("give the stream's name, type or source_id")
        for key in ("name", "type", "source_id"):
            value = getattr(self, key)
            if value is not None and "'" in value:
                raise ValueError(f"{key}: quotes are not allowed in an LSL stream {key}")
        return self


def epoch_to_lsl_offset() -> tuple[float, float]:
    """``(local_clock - time.time(), uncertainty)``: puts an epoch time on this machine's LSL clock."""
    import pylsl

    best: tuple[float, float] | None = None
    for _ in range(5):
        a = pylsl.local_clock()
        e = time.time()
        b = pylsl.local_clock()
        half = (b - a) / 2
        if best is None or half < best[1]:
            best = ((a + b) / 2 - e, half)
    assert best is not None
    return best


def _time_correction_ex(inlet: Any, timeout: float) -> tuple[float, float]:
    """liblsl's time correction with its uncertainty (pylsl exposes only the offset)."""
    from pylsl.lib import lib
    from pylsl.util import handle_error

    fn = lib.lsl_time_correction_ex
    fn.restype = ctypes.c_double
    remote, uncertainty, ec = ctypes.c_double(), ctypes.c_double(), ctypes.c_int()
    offset = fn(inlet.obj, ctypes.byref(remote), ctypes.byref(uncertainty), ctypes.c_double(timeout),
                ctypes.byref(ec))
    handle_error(ec)
    return float(offset), float(uncertainty.value)


class LslSource(AcquisitionSource):
    """Bins an LSL stream's units in the protocol's response window."""

    name = "lsl"

    def __init__(self, rig: RigConfig, truth: str | None = None, seed: int = 0,
                 settings: LslSettings | None = None) -> None:
        cfg = settings if settings is not None else source_settings(rig, "lsl", LslSettings)
        assert isinstance(cfg, LslSettings)
        super().__init__(cfg)
        self.cfg = cfg
        self.inlet: Any = None
        self.kind: str = cfg.kind
        self.srate = 0.0
        self.labels: list[str] = []
        self.sync = TtlLog()
        self.receipt = OffsetEstimator()
        """This machine's LSL clock at pull minus the newest stamp pulled: finds onset markers even when the
        outlet stamps with a clock liblsl's time correction does not know (e.g. a sorter's sample clock)."""
        self._string = False
        self._cols: np.ndarray | None = None
        self._sync_col: int | None = None
        self._sync_prev: float | None = None
        self._t_chunks: list[np.ndarray] = []
        self._x_chunks: list[np.ndarray] = []
        self._last_t: float | None = None
        self.stream_desc: dict[str, Any] = {}

    # ------------------------------------------------------------------ stream
    def _predicate(self) -> str:
        parts = [f"{k}='{getattr(self.cfg, k)}'" for k in ("name", "type", "source_id") if getattr(self.cfg, k)]
        return " and ".join(parts)

    def _connect(self) -> None:
        import pylsl

        if self.inlet is None:
            found = pylsl.resolve_bypred(self._predicate(), 1, self.cfg.resolve_timeout_s)
            if not found:
                raise AdapterError(f"lsl: no stream with {self._predicate()} found within "
                                   f"{self.cfg.resolve_timeout_s:g} s (rig config sources.lsl)")
            self.inlet = pylsl.StreamInlet(found[0], max_buflen=360, processing_flags=0)
            self.inlet.open_stream(self.cfg.resolve_timeout_s)
            info = self.inlet.info(self.cfg.resolve_timeout_s)
            self.srate = float(info.nominal_srate())
            self._string = info.channel_format() == pylsl.cf_string
            n = info.channel_count()
            self.labels = _channel_labels(info, n)
            if self.kind == "auto":
                self.kind = "events" if self.srate == 0 and n == 1 else "continuous"
            if self.kind == "events" and n != 1:
                raise AdapterError(f"lsl: an events stream has one channel (the unit id); {info.name()!r} has {n}")
            if self.kind == "continuous" and self._string:
                raise AdapterError(f"lsl: stream {info.name()!r} carries strings, not continuous values")
            self.stream_desc = {"stream_name": info.name(), "stream_type": info.type(),
                                "stream_source_id": info.source_id(), "kind": self.kind, "nominal_srate": self.srate}
            _time_correction_ex(self.inlet, self.cfg.resolve_timeout_s)  # the first estimate takes a while
        if self.kind == "continuous":
            self._map_channels()

    def _map_channels(self) -> None:
        assert self.window is not None
        where = {label: i for i, label in enumerate(self.labels)}
        cols = []
        for uid in self.window.unit_ids:
            key = self.cfg.unit_map.get(uid, uid)
            if key not in where:
                raise AdapterError(f"response.units: unit {uid!r} (stream key {key!r}) is not a channel of LSL stream "
                                   f"{self.stream_desc.get('stream_name')!r} (channels: {self.labels[:8]}...)")
            cols.append(where[key])
        self._cols = np.asarray(cols, dtype=np.int64)
        if self.cfg.sync_channel is not None:
            if self.cfg.sync_channel not in where:
                raise AdapterError(f"rig config sources.lsl.sync_channel: {self.cfg.sync_channel!r} is not a channel "
                                   f"of the stream")
            self._sync_col = where[self.cfg.sync_channel]

    @staticmethod
    def _local_clock() -> float:
        import pylsl

        return float(pylsl.local_clock())

    def _pump(self) -> None:
        from pylsl.util import LostError

        while True:
            try:
                if self._string:
                    samples, stamps = self.inlet.pull_chunk(timeout=0.0, max_samples=8192)
                else:
                    samples, stamps = self.inlet.pull_chunk(timeout=0.0, max_samples=8192, as_numpy=True)
            except LostError:
                raise AcquisitionStalled(f"lsl: the stream {self.stream_desc.get('stream_name')!r} was lost") from None
            n = len(stamps)
            if n == 0:
                return
            self.messages += n
            t = np.asarray(stamps, dtype=np.float64)
            local = self._local_clock()
            self.receipt.add_many(local, t)
            # liblsl buffers in the background: date the data by its newest stamp, not by this pull
            est = self.receipt.estimate()
            age = max(0.0, local - float(t.max()) - est[0]) if est is not None else 0.0
            self.last_rx = max(self.last_rx or -math.inf, time.time() - age)
            if self.kind == "events":
                self._on_events(samples, t)
            else:
                self._on_continuous(np.asarray(samples, dtype=np.float64), t)
            self.progress = max(self.progress, float(t.max()) - self.cfg.settle_s)
            if n < 8192:
                return

    def _on_events(self, samples: Any, t: np.ndarray) -> None:
        if self._string:
            values = [str(s[0]) for s in samples]
        else:
            arr = np.asarray(samples).reshape(-1)
            values = [str(int(v)) if float(v).is_integer() else str(v) for v in arr.tolist()]
        index = self.unit_index
        times: list[float] = []
        units: list[int] = []
        for value, ts in zip(values, t.tolist()):
            i = index.get(value)
            if i is not None:
                times.append(ts)
                units.append(i)
            elif value == self.cfg.sync_value:
                self.sync.add(0, ts, True)
            elif value != self.cfg.heartbeat_value:
                self.unmapped[value] += 1
        if times:
            self.events.extend(np.asarray(times), np.asarray(units))

    def _on_continuous(self, x: np.ndarray, t: np.ndarray) -> None:
        full = np.concatenate([[self._last_t], t]) if self._last_t is not None else t
        if self.srate > 0 and full.size > 1:
            for k in np.nonzero(np.diff(full) > 1.5 / self.srate)[0]:
                before, after = float(full[k]), float(full[k + 1])
                missing = int(round((after - before) * self.srate)) - 1
                self.gaps.append((before, after, f"{missing} sample(s) missing"))
        self._last_t = float(t[-1])
        if self._sync_col is not None:
            level = x[:, self._sync_col]
            prev = self._sync_prev if self._sync_prev is not None else level[0]
            above = level > self.cfg.sync_threshold
            was = np.concatenate([[prev > self.cfg.sync_threshold], above[:-1]])
            for k in np.nonzero(above & ~was)[0]:
                self.sync.add(0, float(t[k]), True)
            self._sync_prev = float(level[-1])
        self._t_chunks.append(t)
        self._x_chunks.append(x[:, self._cols] if self._cols is not None else x)

    # ------------------------------------------------------------------ binning
    def _values(self, start: float, end: float) -> list[Any]:
        if self.kind == "events":
            return super()._values(start, end)
        t = np.concatenate(self._t_chunks) if self._t_chunks else np.empty(0)
        x = np.concatenate(self._x_chunks) if self._x_chunks else np.empty((0, len(self._cols or [])))
        inside = (t >= start) & (t < end)
        if not inside.any():
            raise AcquisitionGap(f"lsl: no samples inside the response window [{start:.4f}, {end:.4f}) s")
        keep = t >= start - self.history_s
        self._t_chunks, self._x_chunks = [t[keep]], [x[keep]]
        means = x[inside].mean(axis=0)
        return [float(v) if math.isfinite(v) else math.nan for v in means.tolist()]

    # ------------------------------------------------------------------ alignment
    def begin(self, cmd: Any, onset: float) -> None:
        super().begin(cmd, onset)
        assert self._pending is not None
        e2l, e2l_unc = epoch_to_lsl_offset()
        tc, tc_unc = _time_correction_ex(self.inlet, 1.0)
        self._pending.state["clock"] = (e2l, e2l_unc, tc, tc_unc)

    def _align(self, pending: _Pending, now: float) -> Alignment | None:
        if "alignment" in pending.state:
            return pending.state["alignment"]
        e2l, e2l_unc, tc, tc_unc = pending.state["clock"]
        predicted = pending.onset + e2l - tc  # epoch -> this machine's LSL clock -> the outlet's clock
        clock = {"epoch_to_lsl_s": e2l, "time_correction_s": tc, "time_correction_uncertainty_s": tc_unc,
                 **self.stream_desc}
        alignment: Alignment | None = None
        receipt = self.receipt.estimate()
        if receipt is not None:
            clock["receipt_offset_s"] = receipt[0]
        if self.cfg.sync_value is not None or self.cfg.sync_channel is not None:
            expect = pending.onset + e2l - receipt[0] if receipt is not None else predicted
            edge = self.sync.nearest(0, expect, self.cfg.sync_tolerance_s)
            if edge is None:
                if self.progress < expect + self.cfg.sync_tolerance_s:
                    return None
                if self.cfg.sync_required:
                    raise SyncMissing(f"lsl: no onset marker within {self.cfg.sync_tolerance_s:g} s of the onset of "
                                      f"trial {pending.cmd.trial_id}")
                clock["sync_missing"] = True
            else:
                self.sync.used_until = edge
                period = 1.0 / self.srate if self.srate > 0 else 0.0
                alignment = Alignment("ttl", pending.onset, edge, period,
                                      {"sync_residual_s": edge - predicted, **clock})
        if alignment is None:
            if receipt is not None and abs(receipt[0] - tc) > self.cfg.clock_mismatch_s:
                raise ClockMismatch(f"lsl: the outlet's timestamps are {tc - receipt[0]:+.3f} s off the clock LSL's "
                                    f"time correction maps (it does not stamp with its lsl local_clock); configure an "
                                    f"onset marker (sources.lsl.sync_value / sync_channel)")
            alignment = Alignment("time_correction", pending.onset, predicted, tc_unc + e2l_unc, clock)
        pending.state["alignment"] = alignment
        return alignment

    def close(self) -> None:
        if self.inlet is not None:
            try:
                self.inlet.close_stream()
            finally:
                self.inlet = None


def _channel_labels(info: Any, n: int) -> list[str]:
    labels: list[str] = []
    ch = info.desc().child("channels").child("channel")
    while not ch.empty() and len(labels) < n:
        labels.append(ch.child_value("label") or str(len(labels)))
        ch = ch.next_sibling()
    if len(labels) != n:
        labels = [str(i) for i in range(n)]
    return labels
