"""The orchestrator's side of the rig network: one ZeroMQ ROUTER socket, driven by one I/O thread.

Why a thread: zmq sockets are not thread-safe, and heartbeats must keep flowing while the engine is
busy fitting models. The engine's thread talks to the I/O thread through a deque plus an inproc
wake-up socket, and gets results back as :class:`concurrent.futures.Future` objects.

Reliability (Paranoid-Pirate style): both sides send heartbeats when idle; a rig silent for
``heartbeat_s * liveness`` is declared lost and every trial in flight on it fails with
:class:`RigLost` at once, so the engine can retry it (same trial id, next attempt) on another or a
reconnected rig. A disconnect seen by the socket monitor triggers an immediate probe (ROUTER_MANDATORY
makes sending to a vanished peer fail), so a crashed worker is noticed in milliseconds, not seconds.
The I/O thread never dies of an exception: it logs it, counts it and goes on.

Security: CurveZMQ with a ZAP allow-list (:mod:`.allowlist`) unless ``insecure`` on loopback.
Hostile input: every message is validated by :mod:`orchestrator.messages`; a bad one gets an
``error`` reply and a log line and is never passed on as trial data. Resource limits: :mod:`.guard`.

The parts live beside this module: the rig table and key bindings (:mod:`.registry`), the queue of
trials waiting for a rig (:mod:`.queue`), clock mapping (:mod:`.clock`). This file is the socket, its
thread and the message handlers; it stays over 500 lines because those share one lock and one socket.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import zmq
from zmq.utils.monitor import parse_monitor_message

from orchestrator import keys as keyfiles
from orchestrator import messages as m
from orchestrator.rig_api import (NoRigError, RigInfo, RigLost, TransportError, TrialCommand, TrialOutcome,
                                  TrialRejected, TrialTimeout)
from orchestrator.transport import guard
from orchestrator.transport.allowlist import AllowList, AllowListUnavailable
from orchestrator.transport.queue import DispatchQueue, Pending, fail
from orchestrator.transport.registry import Registry, RigEntry, new_entry

log = logging.getLogger("cloop.transport")

_DEFAULT_GRACE_S = 5.0
_EVENTS, _POLLIN, _RCVMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE)  # ints: enums are slow
_SRCFD = int(zmq.SRCFD)
_MONITORED = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _normalise_bind(bind: str) -> str:
    if bind.startswith("tcp://") and bind.endswith(":0"):
        return bind[:-2] + ":*"
    return bind


class RigServer:
    """ROUTER server: registration, heartbeats, dispatch with retries surfaced to the caller, Curve.

    Use as a context manager (or call :meth:`close`). All public methods are thread-safe.
    ``rig_keys`` preloads rig id -> key name bindings (e.g. from the database) and ``on_rig_bound``
    is called with the rig's info (on the I/O thread, so keep it short) when a rig id is bound to
    a key for the first time; an exception from it is logged, the rig stays registered.
    """

    def __init__(self, bind: str, *, keys_dir: Path | str | None = None, insecure: bool = False,
                 heartbeat_s: float = 0.25, liveness: int = 3, pipeline: int = 1,
                 session_start_grace_s: float = 30.0, max_message_bytes: int = m.MAX_MESSAGE_BYTES,
                 rig_keys: Mapping[str, str] | None = None,
                 on_rig_bound: Callable[[RigInfo], None] | None = None) -> None:
        if heartbeat_s <= 0 or liveness < 1 or pipeline < 1:
            raise ValueError("heartbeat_s must be > 0, liveness >= 1 and pipeline >= 1")
        bind = _normalise_bind(bind)
        keys_path = Path(keys_dir) if keys_dir is not None else None
        keyfiles.require_security(bind, keys_path, insecure, role="orchestrator")
        self.heartbeat_s = float(heartbeat_s)
        self.liveness = int(liveness)
        # Starting a session can keep a rig's CPU busy for seconds (loading models, opening a window);
        # silence is tolerated that long after a new session is announced, until the rig reports the
        # session ready. A crash still shows at once (the connection closes); only a rig that freezes
        # while starting its session is noticed later.
        self.session_start_grace_s = float(session_start_grace_s)
        self.max_message_bytes = max_message_bytes
        self.keys_dir = keys_path
        self.open_file_limit = guard.raise_open_file_limit()
        self._allow: AllowList | None = None
        self._ctx = zmq.Context()
        self._auth = None
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._mon: zmq.Socket | None = None
        try:
            self._sock.setsockopt(zmq.LINGER, 200)
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._sock.setsockopt(zmq.MAXMSGSIZE, guard.MAX_INBOUND_FRAME_BYTES)
            self._sock.setsockopt(zmq.HANDSHAKE_IVL, guard.HANDSHAKE_TIMEOUT_MS)
            self._sock.setsockopt(zmq.BACKLOG, guard.LISTEN_BACKLOG)
            self._sock.setsockopt(zmq.SNDHWM, 10000)
            self._sock.setsockopt(zmq.RCVHWM, 10000)
            if keys_path is not None:
                pair = keyfiles.orchestrator_pair(keys_path)
                self._allow = AllowList(keys_path)
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("cloop.transport.zap"))
                self._auth.start()
                self._auth.configure_curve_callback(domain="*", credentials_provider=self._allow)
                self._sock.curve_secretkey = pair.secret
                self._sock.curve_publickey = pair.public
                self._sock.curve_server = True
            self._mon = self._sock.get_monitor_socket(_MONITORED)
            self._sock.bind(bind)
            self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except Exception:
            if self._mon is not None:
                self._mon.close(0)
            self._sock.close(0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            raise
        self.secure = keys_path is not None
        self._sock_fd: int = self._sock.getsockopt(zmq.FD)
        self._pipe_addr = f"inproc://cloop-rigserver-{id(self)}"
        self._pipe_in = self._ctx.socket(zmq.PAIR)
        self._pipe_in.bind(self._pipe_addr)
        self._pipe_out = self._ctx.socket(zmq.PAIR)
        self._pipe_out.connect(self._pipe_addr)
        self._pipe_lock = threading.Lock()
        self._signalled = False
        self._commands: collections.deque[tuple[str, Any]] = collections.deque()

        # One re-entrant lock guards the socket and all state. The I/O thread takes it only to handle
        # what arrived (it sleeps on the socket's file descriptor without it), so an API thread can
        # send a trial directly: no thread hop on the way out.
        self._cond = threading.Condition(threading.RLock())
        self._stopped = False
        self._registry = Registry(rig_keys, on_rig_bound)
        self._rigs = self._registry.by_ident  # the hot paths read it directly
        self._queue = DispatchQueue(int(pipeline))
        self._budget = guard.InboundBudget()
        self._session: tuple[str, str] | None = None
        self._required: tuple[str, ...] = ()
        self._rig_wait_s = 60.0
        self.stats: collections.Counter[str] = collections.Counter()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self._refusals: collections.Counter[str] = collections.Counter()  # handshake failures by kind
        self._probe_at: list[float] = []
        self._log_budget = (0.0, 0)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cloop-rigserver", daemon=True)
        self._thread.start()
        log.info("rig server listening on %s (%s)", self.endpoint,
                 f"Curve, allow-list {self._allow.folder}: {len(self._allow.keys)} key(s)"
                 if self._allow else "INSECURE plain text, loopback only")

    @property
    def pipeline(self) -> int:
        return self._queue.pipeline

    # ------------------------------------------------------------------ public API (any thread)
    def __enter__(self) -> "RigServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rigs(self) -> list[RigInfo]:
        """Snapshot of the rigs registered right now."""
        with self._cond:
            return [r.snapshot() for r in self._rigs.values()]

    def rig_keys(self) -> dict[str, str]:
        """Rig id -> allow-list key name bindings made so far (preloaded ones included)."""
        with self._cond:
            return dict(self._registry.bindings)

    def in_flight(self) -> dict[str, list[Any]]:
        """Trial ids currently dispatched to each rig (for monitoring and tests)."""
        with self._cond:
            return {r.info.rig_id: list(r.inflight) for r in self._rigs.values()}

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

    def wait_for_rigs(self, capabilities: list[str], count: int = 1, timeout_s: float = 60.0,
                      *, progress: Callable[[str], None] | None = None) -> list[RigInfo]:
        """Block until ``count`` rigs offering any of ``capabilities`` are registered and, if a session
        was set, have started it (their adapter is loaded: window open, models built...).

        Remembers ``capabilities`` (and ``timeout_s`` as the default wait for a free rig when a trial
        is retried). Raises :class:`NoRigError` after ``timeout_s`` saying what it waited for, where,
        and what it saw instead (:meth:`seen`).
        """
        say = progress or log.info
        self._required = tuple(capabilities)
        self._rig_wait_s = float(timeout_s)
        what = f"{count} rig(s) offering {list(capabilities) or 'anything'}"
        where = f"{self.endpoint} ({'Curve' if self.secure else 'insecure'})"
        say(f"waiting up to {timeout_s:g} s for {what} on {where}")
        start = time.monotonic()
        end = start + timeout_s
        next_note = start + 5.0
        with self._cond:
            while True:
                sid = self._session[0] if self._session else None
                ok = [r.snapshot() for r in self._rigs.values()
                      if r.info.offers(capabilities) and (sid is None or r.ready_session == sid)]
                if len(ok) >= count:
                    self._cond.notify_all()
                    break
                now = time.monotonic()
                if now >= end:
                    hint = (" Check that the rigs run `cloop rig --connect` with this address and that their"
                            f" public keys are in {self._allow.folder}" if self._allow is not None else "")
                    raise NoRigError(f"no {what} registered within {timeout_s:g} s on {where}; "
                                     f"{self.seen()}.{hint}")
                if now >= next_note:
                    say(f"still waiting for {what} on {where}: {len(ok)} so far")
                    next_note = now + 5.0
                self._cond.wait(min(end, next_note) - now)
        with self._cond:
            self._dispatch_and_drain()
        say("rigs ready: " + ", ".join(r.rig_id for r in ok))
        return ok

    def set_session(self, session_id: str, protocol_text: str) -> None:
        """Announce the session to every rig (and to rigs that register later) via ``welcome``."""
        with self._cond:
            self._session = (session_id, protocol_text)
            if not self._stopped:
                for rig in list(self._rigs.values()):
                    self._send_welcome(rig)
                self._drain_socket()

    def submit(self, cmd: TrialCommand, timeout_s: float | None = None, *, rig_id: str | None = None,
               rig_wait_s: float | None = None) -> concurrent.futures.Future:
        """Queue a trial for the next free suitable rig; the future yields a :class:`TrialOutcome`.

        ``timeout_s``: how long the rig may take once dispatched (default ``cmd.timeout_s`` + 5 s).
        ``rig_wait_s``: how long to wait for a free rig (default: the last ``wait_for_rigs`` timeout);
        past it the future fails with :class:`NoRigError`. ``rig_id`` pins the trial to one rig
        (joint presentations: submit one command per rig and wait for all).
        """
        if self._closed:
            raise TransportError("rig server is closed")
        msg_bytes = m.encode(cmd.message(), max_bytes=self.max_message_bytes)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        wait = self._rig_wait_s if rig_wait_s is None else float(rig_wait_s)
        pending = Pending(cmd=cmd, msg_bytes=msg_bytes, future=fut,
                          timeout_s=float(timeout_s) if timeout_s is not None else cmd.timeout_s + _DEFAULT_GRACE_S,
                          rig_wait_deadline=time.monotonic() + wait, target=rig_id,
                          capabilities=self._required)
        with self._cond:
            if self._stopped:
                raise TransportError("rig server is closed")
            self._queue.append(pending)
            self._dispatch_and_drain()
        return fut

    def run_trial(self, cmd: TrialCommand, timeout_s: float | None = None, *, rig_id: str | None = None,
                  rig_wait_s: float | None = None) -> TrialOutcome:
        """Dispatch one attempt and block for its outcome.

        Raises :class:`RigLost`, :class:`TrialTimeout`, :class:`TrialRejected` (all
        :class:`AttemptFailed`, with a ``reason``: retry with ``attempt + 1``) or :class:`NoRigError`.
        """
        fut = self.submit(cmd, timeout_s, rig_id=rig_id, rig_wait_s=rig_wait_s)
        return fut.result()

    def run_joint(self, cmds: dict[str, TrialCommand], timeout_s: float | None = None) -> dict[str, TrialOutcome]:
        """Present one trial on several rigs together (e.g. display PC + stimulator); all must answer."""
        futures = {rig: self.submit(cmd, timeout_s, rig_id=rig) for rig, cmd in cmds.items()}
        return {rig: f.result() for rig, f in futures.items()}

    def reload_keys(self) -> None:
        """Re-read the allow-list directory now (it is also re-read by itself within 2 s of a change).

        Takes effect at once: new handshakes are checked against the new list, and a connected rig
        whose key was removed or replaced (same file name, other key) is told bye and dropped.
        """
        if self._allow is None:
            return
        with self._cond:
            self._allow.reload()
            self._revoke()

    def close(self) -> None:
        """Say bye to the rigs, fail whatever is still pending, release the socket."""
        if self._closed:
            return
        self._closed = True
        self._command("stop", None)
        self._thread.join(timeout=5)
        with self._pipe_lock:
            self._pipe_out.close(0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # ------------------------------------------------------------------ plumbing
    def _command(self, kind: str, payload: Any) -> None:
        self._commands.append((kind, payload))
        self._wake()  # one wake-up in flight is enough: the I/O thread drains the whole deque

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

    # ------------------------------------------------------------------ I/O thread
    def _run(self) -> None:
        # Sleep on the ROUTER's file descriptor (not the socket itself) so that API threads may use
        # the socket under the lock meanwhile. The descriptor only says "look at ZMQ_EVENTS"; every
        # path that touches the socket drains it afterwards, so no arrival can go unnoticed.
        poller = zmq.Poller()
        poller.register(self._sock_fd, zmq.POLLIN)
        poller.register(self._pipe_in, zmq.POLLIN)
        poller.register(self._mon, zmq.POLLIN)
        tick = min(self.heartbeat_s / 4, 0.05)
        next_tick = time.monotonic() + tick
        more = False
        try:
            while True:
                try:
                    stop, more, next_tick = self._loop_once(poller, more, next_tick)
                    if stop:
                        return
                except Exception:  # never let the network thread die: log, count, go on
                    self.stats["internal_errors"] += 1
                    if self.stats["internal_errors"] <= 20 or self.stats["internal_errors"] % 1000 == 0:
                        log.exception("rig server I/O thread: internal error (%d so far); going on",
                                      self.stats["internal_errors"])
                    more, next_tick = False, time.monotonic() + tick
                    time.sleep(min(tick, 0.01))  # a persistent fault must not spin the CPU
        finally:
            with self._cond:
                self._stopped = True
                self._sock.close(200)
                self._mon.close(0)
                self._pipe_in.close(0)

    def _loop_once(self, poller: zmq.Poller, more: bool, next_tick: float) -> tuple[bool, bool, float]:
        """One turn of the I/O loop: (told to stop, more input waiting, next housekeeping time)."""
        timeout = 0.0 if more else max(0.0, next_tick - time.monotonic())
        if self._probe_at:
            timeout = min(timeout, max(0.0, self._probe_at[0] - time.monotonic()))
        events = dict(poller.poll(timeout * 1000))
        with self._cond:
            if self._pipe_in in events:
                while True:
                    try:
                        self._pipe_in.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                with self._pipe_lock:
                    self._signalled = False
                if self._drain_commands():
                    return True, False, next_tick
            if self._mon in events:
                self._on_monitor()
            more = self._drain_socket()
            now = time.monotonic()
            if self._probe_at and now >= self._probe_at[0]:
                self._probe_at = [t for t in self._probe_at if t > now]
                self._probe_all()
            if now >= next_tick:
                next_tick = now + min(self.heartbeat_s / 4, 0.05)
                self._housekeeping(now)
            more = self._drain_socket() or more
        return False, more, next_tick

    def _drain_socket(self, limit: int = 512) -> bool:
        """Handle what is waiting on the ROUTER (lock held); True if more is left after ``limit``."""
        if self._stopped:
            return False
        sock, rigs = self._sock, self._rigs
        for _ in range(limit):
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                return False
            try:
                ident = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            # A message from a connection not yet registered is read as a zmq.Frame, which names the
            # connection's descriptor and (Curve) the key it authenticated with; the rest as bytes.
            rig = rigs.get(ident)
            copy = rig is not None
            frames: list[Any] = [ident]
            while sock.getsockopt(_RCVMORE):
                frames.append(sock.recv(copy=copy))
            try:
                if rig is not None:
                    self._budget.delivered(rig.fd, sum(len(f) for f in frames) - len(ident))
                elif len(frames) > 1:
                    self._budget.delivered(_frame_property(frames[-1], _SRCFD), sum(len(f) for f in frames[1:]))
                self._on_frames(frames)
            except Exception:  # never let one message kill the server
                log.exception("internal error while handling a rig message")
                self.stats["internal_errors"] += 1
        return True

    def _dispatch_and_drain(self) -> None:
        """Dispatch from the calling thread, then handle anything the sends made visible."""
        if self._stopped:
            return
        self._dispatch()
        if self._drain_socket():
            self._wake()

    def _wake(self) -> None:
        with self._pipe_lock:
            if not self._signalled and not self._pipe_out.closed:
                self._signalled = True
                try:
                    self._pipe_out.send(b"", zmq.NOBLOCK)
                except zmq.Again:
                    pass

    def _drain_commands(self) -> bool:
        while self._commands:
            kind, _ = self._commands.popleft()
            if kind == "stop":
                self._shutdown("orchestrator shutting down")
                return True
        self._dispatch()
        return False

    def _shutdown(self, reason: str) -> None:
        bye = m.encode(m.Bye(reason=reason))
        for rig in list(self._rigs.values()):
            self._send(rig.ident, bye)
            for p in rig.inflight.values():
                fail(p, RigLost(f"{reason} while trial {p.cmd.trial_id} was on rig {rig.info.rig_id}",
                                trial_id=p.cmd.trial_id, attempt=p.cmd.attempt, rig_id=rig.info.rig_id))
            rig.inflight.clear()
        for p in self._queue.drain():
            fail(p, TransportError(reason))
        with self._cond:
            self._registry.clear()
            self._cond.notify_all()
        self._commands.clear()
        self._stopped = True

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
            fd = _frame_property(frame, _SRCFD)
            peer = _frame_property(frame, "Peer-Address")
            if self.secure:
                user = _frame_property(frame, "User-Id")
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
            log.warning("rig %s reported: [%s] %s", rig.info.rig_id, msg.code, msg.message)

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

    def _on_monitor(self) -> None:
        while True:
            try:
                frames = self._mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = parse_monitor_message(frames)
            except Exception:
                continue
            kind = event["event"]
            if kind == zmq.EVENT_ACCEPTED:
                self._budget.accepted(int(event["value"]))
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self._budget.closed(int(event["value"]))
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


def _frame_property(frame: Any, name: str | int) -> Any:
    """A message property (ZAP User-Id, Peer-Address, source descriptor), or None if unavailable."""
    try:
        return frame.get(name)
    except Exception:
        return None
