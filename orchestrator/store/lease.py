"""The session lease: at most one live orchestrator runs a session, across machines.

A lease row names its holder (``host:pid:token``) and an expiry. Taking it is a compare-and-set
UPDATE guarded by "free, mine, or expired", so two orchestrators racing on SQLite or PostgreSQL
cannot both win. A lease left by a killed process is recoverable at once when the dead process ran
on this host (its pid is gone), otherwise once its TTL has passed. The holder renews it from a
thread (`LeaseKeeper`) well inside the TTL.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from orchestrator.store.base import Repository
from orchestrator.store.errors import LeaseHeld, LeaseLost, SessionNotFound, StoreError
from orchestrator.store.records import LeaseRecord
from orchestrator.store.schema import SessionLease, SessionRow
from orchestrator.store.values import utcnow

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 15.0


@dataclass(frozen=True)
class Holder:
    """Who asks for a lease: this host, this process, and a token unique to this acquisition."""

    host: str
    pid: int
    token: str

    @classmethod
    def this_process(cls) -> "Holder":
        return cls(socket.gethostname()[:200], os.getpid(), secrets.token_hex(6))

    @property
    def id(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _record(row: SessionLease) -> LeaseRecord:
    return LeaseRecord(row.session_id, row.holder, row.host, row.pid, row.acquired_at, row.renewed_at, row.expires_at)


class LeaseRepository(Repository):
    """acquire / renew / release of session leases (each one atomic on every backend)."""

    def lease(self, session_id: str) -> LeaseRecord | None:
        """The session's lease row, or None if it was never taken."""
        with self._sessionmaker() as s:
            row = s.get(SessionLease, session_id)
            return None if row is None else _record(row)

    def live_holder(self, session_id: str) -> str | None:
        """The holder id of a lease that is still in force, or None (free, expired or its process died)."""
        rec = self.lease(session_id)
        if rec is None or rec.holder is None or self._stale(rec, utcnow()):
            return None
        return rec.holder

    @staticmethod
    def _stale(rec: LeaseRecord, now: dt.datetime) -> bool:
        if rec.holder is None or rec.expires_at is None or rec.expires_at <= now:
            return True
        return rec.host == socket.gethostname()[:200] and rec.pid is not None and not pid_alive(rec.pid)

    def acquire_lease(self, session_id: str, holder: Holder | None = None, ttl_s: float = DEFAULT_TTL_S) -> Holder:
        """Take the session's lease for `ttl_s` seconds, or raise LeaseHeld naming the live holder."""
        holder = holder or Holder.this_process()
        self._ensure_lease_row(session_id)
        now = utcnow()
        values = dict(holder=holder.id, host=holder.host, pid=holder.pid, acquired_at=now, renewed_at=now,
                      expires_at=now + dt.timedelta(seconds=ttl_s))
        free = (SessionLease.holder.is_(None)) | (SessionLease.holder == holder.id) | (SessionLease.expires_at <= now)
        if self._cas(session_id, free, values):
            return holder
        rec = self.lease(session_id)
        if rec is not None and rec.holder is not None and self._stale(rec, now):
            # Its process died on this host: take it over from exactly that holder (another racer may too).
            if self._cas(session_id, SessionLease.holder == rec.holder, values):
                log.info("took over the lease of session %s from dead holder %s", session_id, rec.holder)
                return holder
            rec = self.lease(session_id)
        who = rec.holder if rec is not None and rec.holder else "unknown"
        left = (rec.expires_at - now).total_seconds() if rec is not None and rec.expires_at else None
        raise LeaseHeld(session_id, who, left)

    def renew_lease(self, session_id: str, holder: Holder, ttl_s: float = DEFAULT_TTL_S) -> None:
        """Push the expiry out by `ttl_s`; LeaseLost if someone else holds it now."""
        now = utcnow()
        if not self._cas(session_id, SessionLease.holder == holder.id,
                         dict(renewed_at=now, expires_at=now + dt.timedelta(seconds=ttl_s))):
            raise LeaseLost(f"session {session_id}: lease of {holder.id} was taken by {self.live_holder(session_id)}")

    def release_lease(self, session_id: str, holder: Holder) -> bool:
        """Give the lease up (only if still ours); True if it was ours."""
        return self._cas(session_id, SessionLease.holder == holder.id,
                         dict(holder=None, host=None, pid=None, expires_at=None))

    def _ensure_lease_row(self, session_id: str) -> None:
        with self._sessionmaker() as s:
            if s.get(SessionLease, session_id) is not None:
                return
            if s.get(SessionRow, session_id) is None:
                raise SessionNotFound(f"no session {session_id!r}")
            s.add(SessionLease(session_id=session_id))
            try:
                s.commit()
            except IntegrityError:  # a racer inserted it first: fine, the UPDATE decides
                s.rollback()

    def _cas(self, session_id: str, guard: Any, values: dict[str, Any]) -> bool:
        with self._tx() as s:
            result = s.execute(update(SessionLease).where(SessionLease.session_id == session_id, guard).values(**values))
            return result.rowcount == 1


class LeaseKeeper:
    """Hold a session's lease for a block: acquire on enter, renew from a thread, release on exit.

    `lost` is set (and `on_lost` called once) if a renewal finds the lease taken, e.g. after this
    process stalled past the TTL; the caller then stops writing to the session.
    """

    def __init__(self, store: LeaseRepository, session_id: str, ttl_s: float = DEFAULT_TTL_S,
                 interval_s: float | None = None) -> None:
        if ttl_s <= 0:
            raise StoreError("lease TTL must be positive")
        self.store, self.session_id, self.ttl_s = store, session_id, ttl_s
        self.interval_s = interval_s if interval_s is not None else ttl_s / 3
        self.holder: Holder | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "LeaseKeeper":
        """Take the lease (LeaseHeld if a live orchestrator has it) and start renewing it."""
        self.holder = self.store.acquire_lease(self.session_id, ttl_s=self.ttl_s)
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.session_id[:8]}", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise LeaseLost if a renewal found the lease taken (called at trial boundaries)."""
        if self.lost.is_set():
            raise LeaseLost(f"session {self.session_id}: this orchestrator lost its lease; stopping without "
                            f"further writes")

    def __enter__(self) -> "LeaseKeeper":
        return self.acquire()

    def renew(self) -> None:
        """Renew now (also called at trial boundaries); raises LeaseLost if it is gone."""
        assert self.holder is not None
        try:
            self.store.renew_lease(self.session_id, self.holder, self.ttl_s)
        except LeaseLost:
            self.lost.set()
            raise

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # a database hiccup: try again next interval, the TTL has slack
                log.warning("lease renewal of session %s failed: %s", self.session_id, exc)

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        """Stop renewing and give the lease up (a lost lease is left to its new holder)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.holder is not None and not self.lost.is_set():
            try:
                self.store.release_lease(self.session_id, self.holder)
            except Exception as err:  # the TTL frees it anyway
                log.warning("could not release the lease of session %s: %s", self.session_id, err)
