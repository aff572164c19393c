"""What the rig server knows and how it answers: rigs, waiting trials, and the messages between them.

:class:`RigNetwork` is the rig protocol's state machine on the orchestrator side: registration with
key checks, heartbeats and liveness, results and worker errors turned into outcomes and typed
failures, dispatch from the queue, the input budget and allow-list checks. It is given the ROUTER
socket and runs under one lock; :class:`~orchestrator.transport.server.RigServer` adds the socket's
setup, the I/O thread and the thread-safe public API.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Mapping

import zmq

from orchestrator import messages as m
from orchestrator.rig_api import RigInfo, RigLost, TrialOutcome, TrialRejected, TrialTimeout
import orchestrator.transport.guard as guard
from orchestrator.transport.allowlist import AllowList, AllowListUnavailable
from orchestrator.transport.queue import DispatchQueue, Pending, fail
from orchestrator.transport.registry import Registry, RigEntry, new_entry

log = logging.getLogger("cloop.transport")

_SRCFD = int(zmq.SRCFD)
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class RigNetwork:
    """Rigs, trials and messages; every method runs with ``_cond`` held (it is re-entrant)."""

    def __init__(self, sock: zmq.Socket, endpoint: str, *, heartbeat_s: float, liveness: int, pipeline: int,
                 session_start_grace_s: float, max_message_bytes: int, allow: AllowList | None,
                 rig_keys: Mapping[str, str] | None, on_rig_bound: Callable[[RigInfo], None] | None) -> None:
        self._sock = sock
        self.endpoint = endpoint
        self.heartbeat_s = float(heartbeat_s)
        self.liveness = int(liveness)
        # Starting a session can keep a rig's CPU busy for seconds (loading models, opening a window);
        # silence is tolerated that long after a new session is announced, until the rig reports the
        # session ready. A crash still shows at once (the connection closes); only a rig that freezes
        # while starting its session is noticed later.
        self.session_start_grace_s = float(session_start_grace_s)
        self.max_message_bytes = max_message_bytes
        self._allow = allow
        self.secure = allow is not None
        # One re-entrant lock guards the socket and all state. The I/O thread takes it only to handle
        # what arrived (it sleeps on the socket's file descriptor without it), so an API thread can
        # send a trial directly: no thread hop on the way out.
        self._cond = threading.Condition(threading.RLock())
        self._registry = Registry(rig_keys, on_rig_bound)
        self._rigs = self._registry.by_ident  # the hot paths read it directly
        self._queue = DispatchQueue(int(pipeline))
        self._budget = guard.InboundBudget()
        self._session: tuple[str, str] | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self._refusals: collections.Counter[str] = collections.Counter()  # handshake failures by kind
        self._probe_at: list[float] = []
        self._log_budget = (0.0, 0)

    @property
    def pipeline(self) -> int:
        return self._queue.pipeline

    def seen(self) -> str:
        """What the server saw of rigs, in one line: who is registered and in what state, who left
        and why, hellos it refused, and handshakes that failed (e.g. a key not in the allow-list)."""
        with self._cond:
            sid = self._session[0] if self._session else None
            parts = ["registered rigs: " + (", ".join(r.describe(sid) for r in self._rigs.values()) or "none")]
            if self._registry.history:
                parts.append("seen: " + "; ".join(self._registry.history))
            failed = sum(self._refusals.values())
            detail = ", ".join(f"{n} {kind}" for kind, n in sorted(self._refusals.items()))
            parts.append(f"rejected handshakes: {failed}" + (f" ({detail})" if failed else ""))
            if self._allow is not None and self._allow.problems:
                parts.append("allow-list files skipped: " + ", ".join(
                    f"{name} ({why})" for name, why in sorted(self._allow.problems.items())))
            return "; ".join(parts)

    def _event(self, kind: str, **fields: Any) -> None:
        self.events.append({"event": kind, "t": time.time(), **fields})

    def _revoke(self) -> None:
        """Drop every connection whose Curve key is no longer in the allow-list (lock held)."""
        assert self._allow is not None
        for rig in list(self._rigs.values()):
            if rig.public_key is not None and self._allow.name_of(rig.public_key) is None:
                self._send(rig.ident, m.encode(m.Bye(reason="this rig's key was removed from the allow-list")))
                self._drop(rig, "its key was removed from the allow-list")

    def _check_allow_list(self, now: float) -> None:
        if self._allow is None:
            return
        try:
            if self._allow.changed(now):
                self._revoke()
        except AllowListUnavailable as exc:  # out of file handles: keep the list, try again soon
            self.stats["allow_list_unavailable"] += 1
            if self.stats["allow_list_unavailable"] in (1, 10) or self.stats["allow_list_unavailable"] % 100 == 0:
                log.error("cannot re-check the allow-list (%s); keeping the current one (%d time(s))",
                          exc, self.stats["allow_list_unavailable"])

    def _send(self, ident: bytes, data: bytes) -> bool:
        try:
            self._sock.send_multipart([ident, data], zmq.NOBLOCK, copy=True)
            return True
        except zmq.ZMQError as exc:
            rig = self._rigs.get(ident)
            if rig is not None and exc.errno == zmq.EHOSTUNREACH:
                self._drop(rig, "connection gone")
            elif rig is not None:
                log.warning("cannot send to rig %s: %s", rig.info.rig_id, exc)
            return False

    def _reject(self, ident: bytes, reason: str, *, code: str = "bad_message", trial_id: Any = None,
                attempt: int | None = None, reply: bool = True) -> None:
        """Hostile or confused input: count it, log it (rate-limited), answer with an error."""
        self.stats["rejected"] += 1
        rig = self._rigs.get(ident)
        who = rig.info.rig_id if rig else f"unregistered peer {ident.hex()[:10]}"
        now = time.monotonic()
        window, count = self._log_budget
        if now - window > 1.0:
            window, count = now, 0
        if count < 20:
            log.warning("rejected message from %s: %s", who, reason)
        elif count == 20:
            log.warning("more rejected messages this second; not logging each")
        self._log_budget = (window, count + 1)
        self._event("rejected", peer=who, reason=reason)
        if rig is None and code != "not_registered":
            self._registry.note(f"refused {who}: {reason[:200]}")
        if reply:
            try:
                err = m.ErrorMessage(code=code, message=reason[:4000], trial_id=trial_id, attempt=attempt)
            except Exception:
                err = m.ErrorMessage(code=code, message=reason[:4000])
            try:
                self._sock.send_multipart([ident, m.encode(err)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    # ------------------------------------------------------------------ messages from rigs
    def _on_frames(self, frames: list[Any]) -> None:
        ident = frames[0] if isinstance(frames[0], bytes) else frames[0].bytes
        if len(frames) != 2:
            self._reject(ident, f"expected 1 message frame, got {len(frames) - 1}")
            return
        frame = frames[1]
        data = frame if isinstance(frame, bytes) else frame.bytes
        try:
            msg = m.decode(data, sender="worker", max_bytes=self.max_message_bytes)
        except m.MessageError as exc:
            self._fail_bad_result(ident, exc)
            self._reject(ident, str(exc))
            return
        now = time.monotonic()
        rig = self._rigs.get(ident)
        if msg.type == "hello":
            self._on_hello(ident, msg, frame, now)
            return
        if rig is None:
            if msg.type in ("error", "bye"):
                self._reject(ident, f"{msg.type} from an unregistered peer", reply=False)
            else:
                self._reject(ident, f"{msg.type} before hello: register first", code="not_registered")
            return
        rig.last_seen = now
        if msg.type == "heartbeat":
            if msg.echo_sent_at is not None and msg.echo_received_at is not None:
                rig.clock.add(msg.echo_sent_at, msg.echo_received_at, msg.sent_at, time.time())
            if msg.session_ready is not None and msg.session_ready != rig.ready_session:
                with self._cond:
                    rig.ready_session = msg.session_ready
                    rig.start_error = None
                    self._cond.notify_all()
                if msg.session_ready == rig.session_sent:
                    rig.grace_until = 0.0
        elif msg.type == "result":
            rig.grace_until = 0.0
            self._on_result(rig, msg)
        elif msg.type == "error":
            rig.grace_until = 0.0
            self._on_worker_error(rig, msg)
        elif msg.type == "bye":
            self._drop(rig, f"rig said bye ({msg.reason or 'no reason'})")

    def _refuse_hello(self, ident: bytes, rig_id: str, reason: str, code: str) -> None:
        self._reject(ident, f"hello from rig {rig_id}: {reason}", code=code)

    def _on_hello(self, ident: bytes, msg: m.Hello, frame: Any, now: float) -> None:
        known = self._rigs.get(ident)
        key_name = peer = public = None
        fd: int | None = None
        if known is not None and isinstance(frame, bytes):  # re-hello on a known connection
            key_name, peer, public, fd = known.info.key_name, known.info.peer_address, known.public_key, known.fd
        elif not isinstance(frame, bytes):
            fd = frame_property(frame, _SRCFD)
            peer = frame_property(frame, "Peer-Address")
            if self.secure:
                user = frame_property(frame, "User-Id")
                public = user.encode() if user else None
                key_name = self._allow.name_of(public) if self._allow is not None else None
        if self.secure:
            if key_name is None:  # authenticated at connect time, but its key has since been removed
                self._refuse_hello(ident, msg.rig_id, "its key is not (or no longer) in the allow-list",
                                   "not_allowed")
                return
            holder = self._registry.bound_key(msg.rig_id)
            if holder is not None and holder != key_name:
                self._refuse_hello(ident, msg.rig_id, f"rig id {msg.rig_id} is registered with another key "
                                   f"({holder}); this connection uses key {key_name}", "rig_id_taken")
                return
        old = self._registry.by_id(msg.rig_id)
        if old is not None and old.ident != ident:
            self._drop(old, "rig registered again from a new connection (restarted?)")
        if known is not None and known.info.rig_id != msg.rig_id:
            self._drop(known, "connection re-registered under another rig id")
            known = None
        info = RigInfo(rig_id=msg.rig_id, adapters=tuple(msg.adapters),
                       stimulus_types=tuple(msg.capabilities.stimulus_types),
                       response_kinds=tuple(msg.capabilities.response_kinds),
                       software_version=msg.software_version, hostname=msg.hostname, pid=msg.pid,
                       key_name=key_name, peer_address=peer, registered_at=time.time(),
                       clock_offset_s=None, clock_rtt_s=None)
        if known is not None:
            known.info = info
            known._match_cache.clear()
            known.last_seen = now
            rig = known
        else:
            rig = new_entry(ident, info, now, msg.clock.time, public)
        rig.fd = fd
        with self._cond:
            self._registry.add(rig)
            self._cond.notify_all()
        self.stats["registrations"] += 1
        self._event("registered", rig_id=msg.rig_id, key_name=key_name)
        log.info("rig %s registered (adapters %s, stimulus types %s, version %s, pid %s, key %s)",
                 msg.rig_id, list(msg.adapters), list(msg.capabilities.stimulus_types),
                 msg.software_version, msg.pid, key_name or "-")
        self._send_welcome(rig)
        if self._send(rig.ident, m.encode(m.Heartbeat(sent_at=time.time()))):  # first clock sample now
            rig.last_hb = now
        self._dispatch()

    def _send_welcome(self, rig: RigEntry) -> None:
        sid, text = self._session if self._session else (None, None)
        welcome = m.Welcome(rig_id=rig.info.rig_id, session_id=sid, protocol_text=text,
                            heartbeat_s=self.heartbeat_s, liveness=self.liveness, server_time=time.time())
        try:
            data = m.encode(welcome, max_bytes=self.max_message_bytes)
        except m.MessageError as exc:
            log.error("cannot send the session to rig %s: %s", rig.info.rig_id, exc)
            return
        if self._send(rig.ident, data):
            rig.last_sent = time.monotonic()
            if sid is not None and rig.session_sent != sid:
                rig.session_sent = sid
                rig.grace_until = rig.last_sent + self.session_start_grace_s

    def _on_result(self, rig: RigEntry, msg: m.Result) -> None:
        p = rig.inflight.get(msg.trial_id)
        if p is None or p.cmd.attempt != msg.attempt:
            self._reject(rig.ident, f"result for trial {msg.trial_id!r} attempt {msg.attempt} which is not in "
                         f"flight on rig {rig.info.rig_id} (late, duplicate or unknown)", code="unexpected",
                         trial_id=msg.trial_id, attempt=msg.attempt)
            return
        if msg.session_id != p.cmd.session_id:
            self._reject(rig.ident, f"result for trial {msg.trial_id!r} names session {msg.session_id!r}, "
                         f"expected {p.cmd.session_id!r}", code="unexpected", trial_id=msg.trial_id,
                         attempt=msg.attempt)
            return
        del rig.inflight[msg.trial_id]
        outcome = TrialOutcome(trial_id=msg.trial_id, attempt=msg.attempt, rig_id=rig.info.rig_id,
                               response=dict(msg.response), timing=dict(msg.timing),
                               mapped_timing=rig.clock.to_local(msg.timing), clock_offset_s=rig.clock.offset,
                               clock_rtt_s=rig.clock.rtt, dispatched_at=p.dispatched_at,
                               received_at=time.time(), cached=msg.cached, meta=dict(msg.meta))
        self.stats["results"] += 1
        if not p.future.done():
            p.future.set_result(outcome)
        self._dispatch()

    def _fail_bad_result(self, ident: bytes, exc: m.MessageError) -> None:
        """A registered rig's unreadable result fails its attempt now (retried), not at the timeout."""
        rig = self._rigs.get(ident)
        if rig is None or exc.msg_type != "result" or exc.trial_id is None:
            return
        p = rig.inflight.get(exc.trial_id)
        if p is None or p.cmd.attempt != exc.attempt:
            return
        del rig.inflight[exc.trial_id]
        fail(p, TrialRejected(f"rig {rig.info.rig_id} sent a bad result for trial {exc.trial_id!r} attempt "
                              f"{exc.attempt}: {exc}", code="bad_result", trial_id=exc.trial_id,
                              attempt=exc.attempt, rig_id=rig.info.rig_id))
        self._dispatch()

    def _on_worker_error(self, rig: RigEntry, msg: m.ErrorMessage) -> None:
        self.stats["worker_errors"] += 1
        p = rig.inflight.get(msg.trial_id) if msg.trial_id is not None else None
        if p is not None and (msg.attempt is None or msg.attempt == p.cmd.attempt):
            del rig.inflight[msg.trial_id]
            fail(p, TrialRejected(f"rig {rig.info.rig_id} rejected trial {msg.trial_id!r} attempt "
                                  f"{p.cmd.attempt}: [{msg.code}] {msg.message}", code=msg.code,
                                  trial_id=msg.trial_id, attempt=p.cmd.attempt, rig_id=rig.info.rig_id))
            self._dispatch()
        else:
            if msg.code == "session_failed" and msg.trial_id is None:
                with self._cond:
                    rig.start_error = msg.message
                    self._cond.notify_all()
            text = msg.message if len(msg.message) <= 300 else msg.message[:300] + f"... ({len(msg.message)} characters)"
            log.warning("rig %s reported: [%s] %s", rig.info.rig_id, msg.code, text)

    # ------------------------------------------------------------------ liveness and dispatch
    def _drop(self, rig: RigEntry, reason: str) -> None:
        with self._cond:
            if not self._registry.remove(rig, reason):
                return
            self._cond.notify_all()
        self.stats["rigs_lost"] += 1
        self._event("rig_lost", rig_id=rig.info.rig_id, reason=reason,
                    trials=[p.cmd.trial_id for p in rig.inflight.values()])
        log.warning("rig %s lost: %s%s", rig.info.rig_id, reason,
                    f"; failing {len(rig.inflight)} trial(s) in flight" if rig.inflight else "")
        for p in list(rig.inflight.values()):
            fail(p, RigLost(f"rig {rig.info.rig_id} lost during trial {p.cmd.trial_id!r} attempt "
                            f"{p.cmd.attempt}: {reason}", trial_id=p.cmd.trial_id,
                            attempt=p.cmd.attempt, rig_id=rig.info.rig_id))
        rig.inflight.clear()

    def _dispatch(self) -> None:
        """Send queued trials (FIFO) to free suitable rigs."""
        if self._queue:
            self._queue.dispatch(self._rigs, self._send_trial)

    def _send_trial(self, rig: RigEntry, p: Pending, now: float) -> None:
        if self._send(rig.ident, p.msg_bytes):
            rig.last_sent = now
            self.stats["dispatched"] += 1
            if p.cmd.attempt > 1:
                self._event("retry_dispatched", trial_id=p.cmd.trial_id, attempt=p.cmd.attempt,
                            rig_id=rig.info.rig_id)

    def _housekeeping(self, now: float) -> None:
        self._check_allow_list(now)
        for fd, held in self._budget.enforce(now):
            self.stats["over_budget"] += 1
            log.warning("disconnected a peer (descriptor %d) holding %.1f MB of unfinished input "
                        "(limit %.1f MB)", fd, held / 1e6, self._budget.limit_bytes / 1e6)
        for rig, quiet in self._registry.silent(now, self.heartbeat_s * self.liveness):
            self._drop(rig, f"silent for {quiet:.2f} s (heartbeat {self.heartbeat_s:g} s x {self.liveness})")
        hb: bytes | None = None
        for rig in list(self._rigs.values()):
            for p in [p for p in rig.inflight.values() if now >= p.deadline]:
                del rig.inflight[p.cmd.trial_id]
                self.stats["timeouts"] += 1
                fail(p, TrialTimeout(f"rig {rig.info.rig_id} did not answer trial {p.cmd.trial_id!r} attempt "
                                     f"{p.cmd.attempt} within {p.timeout_s:g} s", trial_id=p.cmd.trial_id,
                                     attempt=p.cmd.attempt, rig_id=rig.info.rig_id))
            if now - rig.last_hb >= self.heartbeat_s:
                if hb is None:
                    hb = m.encode(m.Heartbeat(sent_at=time.time()))
                if self._send(rig.ident, hb):
                    rig.last_sent = rig.last_hb = now
        if self._queue:
            self._queue.expire(now, self.endpoint)
            self._dispatch()

    def _probe_all(self) -> None:
        """After a disconnect, touch every rig: ROUTER_MANDATORY turns a vanished route into an error."""
        hb = m.encode(m.Heartbeat(sent_at=time.time()))
        now = time.monotonic()
        for rig in list(self._rigs.values()):
            if self._send(rig.ident, hb):
                rig.last_sent = rig.last_hb = now

    def _on_connection_event(self, kind: int, value: int) -> None:
        """A socket-monitor event: a connection accepted, gone, or refused in its handshake."""
        if kind == zmq.EVENT_ACCEPTED:
            self._budget.accepted(value)
        elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
            self._budget.closed(value)
            if kind == zmq.EVENT_DISCONNECTED:
                self.stats["disconnects"] += 1
                now = time.monotonic()
                self._probe_all()
                self._probe_at = sorted(self._probe_at + [now + 0.005, now + 0.02, now + 0.1])
        elif kind in _HANDSHAKE_FAILED:
            self.stats["auth_failed"] += 1
            why = ("key not in the allow-list" if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   else "handshake failed (no or wrong Curve keys?)")
            self._refusals[why] += 1
            if self.stats["auth_failed"] <= 20 or self.stats["auth_failed"] % 100 == 0:
                log.warning("refused a connection on %s: %s (%d so far)", self.endpoint, why,
                            self.stats["auth_failed"])


def frame_property(frame: Any, name: str | int) -> Any:
    """A message property (ZAP User-Id, Peer-Address, source descriptor), or None if unavailable."""
    try:
        return frame.get(name)
    except Exception:
        return None
