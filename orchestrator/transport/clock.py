"""Mapping a rig's clock onto the orchestrator's: an NTP-style offset estimate per rig.

Heartbeats carry four timestamps (sent by us, received by the rig, sent by the rig, received by
us); the sample with the smallest round trip bounds the offset error best, so it is the one trusted.
"""

from __future__ import annotations

import collections

#: Round trips above this (s) are not clock samples but stalls; they are ignored.
_MAX_SAMPLE_RTT_S = 10.0


class ClockEstimate:
    """Recent (round trip, offset) samples of one rig; ``offset`` = worker clock - orchestrator clock."""

    def __init__(self, window: int = 16) -> None:
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)
        self.offset: float | None = None
        self.rtt: float | None = None

    def coarse(self, worker_time: float, local_time: float) -> None:
        """A first guess from the rig's ``hello`` clock, until the first real sample arrives."""
        if not self.samples:
            self.offset = worker_time - local_time

    def add(self, t0: float, t1: float, t2: float, t3: float) -> None:
        """One heartbeat exchange: t0 sent here, t1 received there, t2 sent there, t3 received here."""
        rtt = (t3 - t0) - (t2 - t1)
        if rtt < 0 or rtt > _MAX_SAMPLE_RTT_S:
            return
        self.samples.append((rtt, ((t1 - t0) + (t2 - t3)) / 2))
        self.rtt, self.offset = min(self.samples)

    def to_local(self, timing: dict[str, float | None]) -> dict[str, float | None]:
        """The same timestamps on the orchestrator clock (unchanged while no offset is known)."""
        offset = self.offset
        if offset is None:
            return dict(timing)
        return {k: (v - offset if v is not None else v) for k, v in timing.items()}
