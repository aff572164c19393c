"""Putting a stimulus onset (epoch s, rig clock) on an acquisition clock, with its uncertainty.

Two ways, best first:

- **TTL / photodiode**: the acquisition system recorded an onset event on its own clock (a
  photodiode on the screen's patch, or a TTL the presenter raised). The onset *is* that event;
  the uncertainty is one sample. :class:`TtlLog` finds the rising edge nearest to where the clock
  estimate predicts it, and never uses one edge for two trials.
- **Clock offset**: without such an event, ``epoch = acq + offset`` is estimated from the stream
  itself. :class:`OffsetEstimator` keeps ``receipt time - acquisition time`` of recent messages;
  its minimum is the offset plus the smallest transport delay (NTP's reasoning), so an onset lands
  at most that delay early on the acquisition clock; the spread of recent values is the uncertainty.
  LSL streams use liblsl's ``time_correction`` instead (see :mod:`rig_adapters.sources.lsl`).
"""

from __future__ import annotations

import bisect
import collections
import math

import numpy as np

__all__ = ["OffsetEstimator", "TtlLog"]


class OffsetEstimator:
    """Running estimate of ``epoch - acquisition time`` from message receipt times."""

    def __init__(self, horizon: int = 4096) -> None:
        self._d: collections.deque[float] = collections.deque(maxlen=horizon)

    def add(self, received_epoch: float, acq_t: float) -> None:
        self._d.append(received_epoch - acq_t)

    def add_many(self, received_epoch: float, acq_t: np.ndarray) -> None:
        if acq_t.size:
            self._d.append(received_epoch - float(np.max(acq_t)))

    def estimate(self) -> tuple[float, float, int] | None:
        """``(offset_s, spread_s, n)``: min of recent values, p95 - min, sample count; None if empty."""
        if not self._d:
            return None
        d = np.fromiter(self._d, dtype=np.float64, count=len(self._d))
        lo = float(d.min())
        return lo, float(np.percentile(d, 95)) - lo, int(d.size)

    def reset(self) -> None:
        self._d.clear()


class TtlLog:
    """Recent rising edges per TTL line (acquisition seconds, ascending)."""

    def __init__(self, keep: int = 4096) -> None:
        self._edges: dict[int, list[float]] = collections.defaultdict(list)
        self._keep = keep
        self.used_until = -math.inf
        """Edges at or before this time were used by an earlier trial."""

    def add(self, line: int, t: float, state: bool) -> None:
        if not state:
            return
        edges = self._edges[line]
        if edges and t < edges[-1]:
            bisect.insort(edges, t)
        else:
            edges.append(t)
        if len(edges) > self._keep:
            del edges[: len(edges) - self._keep]

    def nearest(self, line: int, predicted: float, tolerance_s: float) -> float | None:
        """The unused rising edge on ``line`` nearest ``predicted`` within the tolerance, if any."""
        best: float | None = None
        for t in self._edges.get(line, ()):
            if t <= self.used_until or abs(t - predicted) > tolerance_s:
                continue
            if best is None or abs(t - predicted) < abs(best - predicted):
                best = t
        return best

    def first_after(self, line: int, t_min: float) -> float | None:
        for t in self._edges.get(line, ()):
            if t > max(t_min, self.used_until):
                return t
        return None

    def clear(self) -> None:
        self._edges.clear()
        self.used_until = -math.inf
