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

Parts: the rig protocol's state machine (:mod:`.network`, which this class extends with the socket,
the I/O thread and the public API), the rig table and key bindings (:mod:`.registry`), the queue of
trials waiting for a rig (:mod:`.queue`), clock mapping (:mod:`.clock`).
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
from orchestrator.rig_api import NoRigError, RigInfo, RigLost, TransportError, TrialCommand, TrialOutcome
import orchestrator.transport.guard as guard
from orchestrator.transport.allowlist import AllowList
from orchestrator.transport.network import RigNetwork, frame_property
from orchestrator.transport.queue import Pending, fail

log = logging.getLogger("cloop.transport")

_DEFAULT_GRACE_S = 5.0
_EVENTS, _POLLIN, _RCVMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE)  # ints: enums are slow
_SRCFD = int(zmq.SRCFD)
_MONITORED = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _normalise_bind(bind: str) -> str:
    if bind.startswith("tcp://") and bind.endswith(":0"):
        return bind[:-2] + ":*"
    return bind


class RigServer(RigNetwork):
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
            endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except Exception:
            if self._mon is not None:
                self._mon.close(0)
            self._sock.close(0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            raise
        RigNetwork.__init__(self, self._sock, endpoint, heartbeat_s=heartbeat_s, liveness=liveness,
                            pipeline=pipeline, session_start_grace_s=session_start_grace_s,
                            max_message_bytes=max_message_bytes, allow=self._allow, rig_keys=rig_keys,
                            on_rig_bound=on_rig_bound)
        self._sock_fd: int = self._sock.getsockopt(zmq.FD)
        self._pipe_addr = f"inproc://cloop-rigserver-{id(self)}"
        self._pipe_in = self._ctx.socket(zmq.PAIR)
        self._pipe_in.bind(self._pipe_addr)
        self._pipe_out = self._ctx.socket(zmq.PAIR)
        self._pipe_out.connect(self._pipe_addr)
        self._pipe_lock = threading.Lock()
        self._signalled = False
        self._commands: collections.deque[tuple[str, Any]] = collections.deque()

        self._stopped = False
        self._required: tuple[str, ...] = ()
        self._rig_wait_s = 60.0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cloop-rigserver", daemon=True)
        self._thread.start()
        log.info("rig server listening on %s (%s)", self.endpoint,
                 f"Curve, allow-list {self._allow.folder}: {len(self._allow.keys)} key(s)"
                 if self._allow else "INSECURE plain text, loopback only")

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
        # A trial may carry an image: its ceiling is the wire's trial limit, not the other messages'.
        msg_bytes = m.encode(cmd.message(), max_bytes=max(self.max_message_bytes, m.MAX_TRIAL_BYTES))
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
            self._on_connection_event(event["event"], int(event["value"]))

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
                # The monitor goes first: libzmq's I/O thread blocks sending an event nobody reads.
                self._sock.disable_monitor()
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
                    self._budget.delivered(frame_property(frames[-1], _SRCFD), sum(len(f) for f in frames[1:]))
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


