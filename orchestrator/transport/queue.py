"""Trials waiting for a rig, and the rule that picks one: FIFO, least busy, then least recently used.

A trial pinned to a rig id (joint presentations) or needing a capability nobody free offers is
stepped over without blocking the trials behind it; one that finds no rig before its wait deadline
fails with :class:`~orchestrator.rig_api.NoRigError`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from orchestrator.rig_api import NoRigError, TrialCommand
from orchestrator.transport.registry import RigEntry

#: How many waiting trials dispatch looks past at most when the head of the queue cannot go yet.
_LOOKAHEAD = 256


@dataclass(eq=False)
class Pending:
    """One submitted attempt, from the queue until its future is resolved."""

    cmd: TrialCommand
    msg_bytes: bytes
    future: concurrent.futures.Future
    timeout_s: float
    rig_wait_deadline: float       # monotonic: give up if not dispatched by then
    target: str | None
    capabilities: tuple[str, ...]
    deadline: float = 0.0          # monotonic: answer due by then (set at dispatch)
    dispatched_at: float = 0.0     # epoch
    rig_id: str | None = None


def fail(p: Pending, exc: BaseException) -> None:
    """Resolve a pending attempt with an error (once; a cancelled or answered one stays as it is)."""
    if not p.future.done():
        try:
            p.future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass


class DispatchQueue:
    """The FIFO of trials not yet on a rig."""

    def __init__(self, pipeline: int) -> None:
        self.pipeline = pipeline
        self.waiting: collections.deque[Pending] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def append(self, p: Pending) -> None:
        self.waiting.append(p)

    def choose(self, p: Pending, rigs: Iterable[RigEntry]) -> RigEntry | None:
        """The least busy (then least recently used) free rig that can present this trial."""
        best: RigEntry | None = None
        best_key: tuple[int, float] = (0, 0.0)
        pipeline = self.pipeline
        cmd = p.cmd
        for rig in rigs:
            busy = len(rig.inflight)
            if busy >= pipeline or cmd.trial_id in rig.inflight:
                continue
            if p.target is not None:
                if rig.info.rig_id != p.target:
                    continue
            elif not rig.accepts(p.capabilities, cmd.stimulus_type, cmd.response_kind):
                continue
            key = (busy, rig.last_dispatch)
            if best is None or key < best_key:
                best, best_key = rig, key
        return best

    def dispatch(self, rigs: dict[bytes, RigEntry], send: Callable[[RigEntry, Pending, float], None]) -> None:
        """Hand queued trials (FIFO) to free suitable rigs via ``send``; O(1) per dispatched trial."""
        if not self.waiting or not rigs:
            return
        pipeline = self.pipeline
        waiting = self.waiting
        skipped: list[Pending] = []
        while waiting and any(len(r.inflight) < pipeline for r in rigs.values()):
            p = waiting[0]
            if p.future.cancelled():
                waiting.popleft()
                continue
            rig = self.choose(p, rigs.values())
            if rig is None:  # this one waits for a particular rig or capability; look a little further
                skipped.append(waiting.popleft())
                if len(skipped) >= _LOOKAHEAD:
                    break
                continue
            waiting.popleft()
            now = time.monotonic()
            p.deadline = now + p.timeout_s
            p.dispatched_at = time.time()
            p.rig_id = rig.info.rig_id
            rig.inflight[p.cmd.trial_id] = p
            rig.last_dispatch = now
            send(rig, p, now)
        if skipped:
            waiting.extendleft(reversed(skipped))

    def expire(self, now: float, endpoint: str) -> None:
        """Fail trials whose wait for a free rig is over; drop cancelled ones."""
        kept: collections.deque[Pending] = collections.deque()
        for p in self.waiting:
            if p.future.cancelled():
                continue
            if now >= p.rig_wait_deadline:
                want = f"rig {p.target}" if p.target else f"a rig offering {list(p.capabilities) or 'anything'}"
                fail(p, NoRigError(f"trial {p.cmd.trial_id!r} attempt {p.cmd.attempt}: no free {want} "
                                   f"on {endpoint} in time"))
            else:
                kept.append(p)
        self.waiting = kept

    def drain(self) -> Iterable[Pending]:
        """Take every waiting trial out (shutdown)."""
        while self.waiting:
            yield self.waiting.popleft()
