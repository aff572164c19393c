"""Who is connected: registered rigs by connection and by rig id, their liveness, and key bindings.

A rig id is bound to the allow-list key name that first registered it, for the server's lifetime
(and across lifetimes when the caller preloads and persists the bindings): another allowed key
cannot take the id over, also after the first rig has left. What was seen (rigs lost, hellos
refused, session starts that failed) is kept so a failed wait can say what happened.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from orchestrator.rig_api import RigInfo
from orchestrator.transport.clock import ClockEstimate

log = logging.getLogger("cloop.transport")

#: How many past happenings (losses, refusals) are kept for the "what was seen" report.
_HISTORY = 20


@dataclass(eq=False)
class RigEntry:
    """One registered connection: what the rig announced, its clock, and the trials it holds."""

    ident: bytes
    info: RigInfo
    last_seen: float
    last_sent: float
    clock: ClockEstimate
    public_key: bytes | None = None      # z85 Curve key of this connection (None: insecure)
    fd: int | None = None                # libzmq's descriptor of the connection (input budget)
    inflight: dict[Any, Any] = field(default_factory=dict)
    last_dispatch: float = 0.0
    last_hb: float = 0.0  # heartbeats also go out while busy: each one is a clock sample
    session_sent: str | None = None
    ready_session: str | None = None
    start_error: str | None = None
    grace_until: float = 0.0  # monotonic; silence tolerated until then (adapter starting a session)
    _match_cache: dict[tuple[Any, ...], bool] = field(default_factory=dict)

    def accepts(self, capabilities: tuple[str, ...], stimulus_type: str, response_kind: str) -> bool:
        """Capability, stimulus-type and response-kind match, memoised (dispatch runs per trial)."""
        key = (capabilities, stimulus_type, response_kind)
        hit = self._match_cache.get(key)
        if hit is None:
            info = self.info
            hit = ((not capabilities or info.offers(capabilities))
                   and ("*" in info.stimulus_types or stimulus_type in info.stimulus_types
                        or stimulus_type in info.adapters)
                   and ("*" in info.response_kinds or response_kind in info.response_kinds))
            self._match_cache[key] = hit
        return hit

    def snapshot(self) -> RigInfo:
        """The rig's info with what the server has learnt since (clock, session state)."""
        info = self.info
        return RigInfo(**{**info.__dict__, "clock_offset_s": self.clock.offset, "clock_rtt_s": self.clock.rtt,
                          "session_ready": self.ready_session, "start_error": self.start_error})

    def describe(self, session_id: str | None) -> str:
        """One phrase for a wait report: the rig, what it offers, and how far its session start got."""
        state = (f"; could not start the session: {self.start_error}" if self.start_error else
                 "; still starting the session" if session_id and self.ready_session != session_id else "")
        return (f"{self.info.rig_id} (adapters {list(self.info.adapters)}, stimulus types "
                f"{list(self.info.stimulus_types)}{state})")


class Registry:
    """Registered rigs (by connection identity and by rig id) and the rig id -> key name bindings."""

    def __init__(self, bindings: Mapping[str, str] | None = None,
                 on_bind: Callable[[RigInfo], None] | None = None) -> None:
        self.by_ident: dict[bytes, RigEntry] = {}
        self.by_rig_id: dict[str, bytes] = {}
        self.bindings: dict[str, str] = dict(bindings or {})
        self._on_bind = on_bind
        self.history: collections.deque[str] = collections.deque(maxlen=_HISTORY)

    def __len__(self) -> int:
        return len(self.by_ident)

    def __iter__(self) -> Iterator[RigEntry]:
        return iter(list(self.by_ident.values()))

    def get(self, ident: bytes) -> RigEntry | None:
        return self.by_ident.get(ident)

    def by_id(self, rig_id: str) -> RigEntry | None:
        ident = self.by_rig_id.get(rig_id)
        return self.by_ident.get(ident) if ident is not None else None

    def bound_key(self, rig_id: str) -> str | None:
        """The key name a rig id is bound to (None: not bound yet, or insecure mode)."""
        return self.bindings.get(rig_id)

    def add(self, rig: RigEntry) -> None:
        """Register a connection under its rig id; binds the id to its key on first use."""
        self.by_ident[rig.ident] = rig
        self.by_rig_id[rig.info.rig_id] = rig.ident
        key_name = rig.info.key_name
        if key_name is not None and rig.info.rig_id not in self.bindings:
            self.bindings[rig.info.rig_id] = key_name
            if self._on_bind is not None:
                try:  # e.g. the caller records the binding in its database
                    self._on_bind(rig.info)
                except Exception:
                    log.exception("could not record that rig %s is bound to key %s", rig.info.rig_id, key_name)

    def remove(self, rig: RigEntry, reason: str) -> bool:
        """Forget a connection (its binding stays); False if it was not registered."""
        if self.by_ident.get(rig.ident) is not rig:
            return False
        del self.by_ident[rig.ident]
        if self.by_rig_id.get(rig.info.rig_id) == rig.ident:
            del self.by_rig_id[rig.info.rig_id]
        self.note(f"rig {rig.info.rig_id} left: {reason}"
                  + (f" (could not start the session: {rig.start_error})" if rig.start_error else ""))
        return True

    def clear(self) -> None:
        self.by_ident.clear()
        self.by_rig_id.clear()

    def note(self, what: str) -> None:
        """Remember something a failed wait should report (a refusal, a loss)."""
        self.history.append(what)

    def silent(self, now: float, dead_after: float) -> Iterator[tuple[RigEntry, float]]:
        """Rigs silent for longer than ``dead_after`` and past any start-up grace, with their silence."""
        for rig in list(self.by_ident.values()):
            quiet = now - rig.last_seen
            if quiet > dead_after and now > rig.grace_until:
                yield rig, quiet


def new_entry(ident: bytes, info: RigInfo, now: float, worker_clock: float,
              public_key: bytes | None) -> RigEntry:
    """A freshly registered connection; its clock starts from the hello's coarse time."""
    rig = RigEntry(ident=ident, info=info, last_seen=now, last_sent=now, clock=ClockEstimate(),
                   public_key=public_key)
    rig.clock.coarse(worker_clock, time.time())
    return rig
