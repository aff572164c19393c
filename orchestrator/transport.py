"""The orchestrator's side of the rig network: one ZeroMQ ROUTER socket, driven by one I/O thread.

Why a thread: zmq sockets are not thread-safe, and heartbeats must keep flowing while the engine is
busy fitting models. The engine's thread talks to the I/O thread through a deque plus an inproc
wake-up socket, and gets results back as :class:`concurrent.futures.Future` objects.

Reliability (Paranoid-Pirate style): both sides send heartbeats when idle; a rig silent for
``heartbeat_s * liveness`` is declared lost and every trial in flight on it fails with
:class:`RigLost` at once, so the engine can retry it (same trial id, next attempt) on another or a
reconnected rig. A disconnect seen by the socket monitor triggers an immediate probe (ROUTER_MANDATORY
makes sending to a vanished peer fail), so a crashed worker is noticed in milliseconds, not seconds.

Security: CurveZMQ with a ZAP allow-list (``keys_dir/rigs/*.key``) unless ``insecure`` on loopback.
Hostile input: every message is validated by :mod:`orchestrator.messages`; a bad one gets an
``error`` reply and a log line and is never passed on as trial data.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from orchestrator import keys as keyfiles
from orchestrator import messages as m

log = logging.getLogger("cloop.transport")

# A hard cap enforced by libzmq itself (peer disconnected); the wire limit below it is checked in
# Python so an oversized message gets a proper error reply first.
_HARD_MAX_BYTES = 16 * m.MAX_MESSAGE_BYTES
_DEFAULT_GRACE_S = 5.0
_EVENTS, _POLLIN, _RCVMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE)  # ints: enums are slow


# ----------------------------------------------------------------------------- public data types
class TransportError(RuntimeError):
    """Base class of rig-network failures."""


class NoRigError(TransportError):
    """No suitable rig registered within the allowed time."""


class AttemptFailed(TransportError):
    """One dispatch attempt of a trial failed; the engine may retry with ``attempt + 1``."""

    def __init__(self, message: str, *, trial_id: Any = None, attempt: int | None = None,
                 rig_id: str | None = None) -> None:
        super().__init__(message)
        self.trial_id = trial_id
        self.attempt = attempt
        self.rig_id = rig_id


class RigLost(AttemptFailed):
    """The rig died, disconnected, restarted or went silent while the trial was in flight."""


class TrialTimeout(AttemptFailed):
    """The rig stayed alive but did not answer within the trial's timeout."""


class TrialRejected(AttemptFailed):
    """The worker answered with an error for this trial; ``code`` says what kind.

    Codes: ``adapter_failed`` (present raised), ``aborted`` (operator abort), ``session_failed``
    (the adapter could not start the session), ``session_mismatch``, or an adapter's own code.
    """

    code: str = "adapter_failed"


@dataclass(frozen=True)
class TrialCommand:
    """One presentation request. ``timeout_s`` is the subject's response window (sent to the rig)."""

    trial_id: int | str
    attempt: int
    index: int
    session_id: str
    stimulus: dict[str, Any]
    stimulus_type: str
    response_kind: str
    timeout_s: float

    def message(self) -> m.Trial:
        return m.Trial(trial_id=_plain(self.trial_id), attempt=int(self.attempt), index=int(self.index),
                       session_id=self.session_id, stimulus=_plain(self.stimulus),
                       stimulus_type=self.stimulus_type, response_kind=self.response_kind,
                       timeout_s=float(self.timeout_s))


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and tuples (as design code produces them) to plain msgpack-able values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    tolist = getattr(value, "tolist", None)  # numpy scalar or array, torch tensor
    return _plain(tolist()) if callable(tolist) else value


@dataclass(frozen=True)
class RigInfo:
    """A registered rig as announced in its ``hello`` (plus what the server learnt about it)."""

    rig_id: str
    adapters: tuple[str, ...]
    stimulus_types: tuple[str, ...]
    response_kinds: tuple[str, ...]
    software_version: str
    hostname: str | None
    pid: int | None
    key_name: str | None          # allow-list file stem of the Curve key it used (None: insecure)
    peer_address: str | None
    registered_at: float          # orchestrator epoch s
    clock_offset_s: float | None  # worker clock minus orchestrator clock
    clock_rtt_s: float | None
    session_ready: str | None = None  # session whose start the rig's adapter has completed
    start_error: str | None = None    # why the adapter could not start the session, if it failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "rig_id": self.rig_id, "adapters": list(self.adapters),
            "capabilities": {"stimulus_types": list(self.stimulus_types),
                             "response_kinds": list(self.response_kinds)},
            "software_version": self.software_version, "hostname": self.hostname, "pid": self.pid,
            "key_name": self.key_name, "peer_address": self.peer_address,
            "registered_at": self.registered_at, "clock_offset_s": self.clock_offset_s,
            "clock_rtt_s": self.clock_rtt_s, "session_ready": self.session_ready,
        }

    def offers(self, capabilities: list[str] | tuple[str, ...]) -> bool:
        """A rig qualifies if any wanted capability names one of its adapters or stimulus types."""
        if not capabilities:
            return True
        have = set(self.adapters) | set(self.stimulus_types)
        return bool(have & set(capabilities))


@dataclass(frozen=True)
class TrialOutcome:
    """A rig's answer to one trial attempt, with its times on both clocks."""

    trial_id: int | str
    attempt: int
    rig_id: str
    response: dict[str, Any]           # as sent by the rig: {"value": ..., extras}
    timing: dict[str, float | None]    # raw worker clock (epoch s)
    mapped_timing: dict[str, float | None]  # same keys on the orchestrator clock (worker - offset)
    clock_offset_s: float | None
    clock_rtt_s: float | None
    dispatched_at: float               # orchestrator epoch s
    received_at: float                 # orchestrator epoch s
    cached: bool                       # the rig replayed a stored result (not presented again)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def round_trip_s(self) -> float:
        return self.received_at - self.dispatched_at


# ----------------------------------------------------------------------------- internals
class _Clock:
    """NTP-style estimate: keep recent samples, trust the one with the smallest round trip."""

    def __init__(self, window: int = 16) -> None:
        self.samples: collections.deque[tuple[float, float]] = collections.deque(maxlen=window)
        self.offset: float | None = None
        self.rtt: float | None = None

    def coarse(self, worker_time: float, local_time: float) -> None:
        if not self.samples:
            self.offset = worker_time - local_time

    def add(self, t0: float, t1: float, t2: float, t3: float) -> None:
        rtt = (t3 - t0) - (t2 - t1)
        if rtt < 0 or rtt > 10:
            return
        self.samples.append((rtt, ((t1 - t0) + (t2 - t3)) / 2))
        self.rtt, self.offset = min(self.samples)


@dataclass(eq=False)
class _Pending:
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


@dataclass(eq=False)
class _Rig:
    ident: bytes
    info: RigInfo
    last_seen: float
    last_sent: float
    clock: _Clock
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
    inflight: dict[Any, _Pending] = field(default_factory=dict)
    last_dispatch: float = 0.0
    last_hb: float = 0.0  # heartbeats also go out while busy: each one is a clock sample
    session_sent: str | None = None
    ready_session: str | None = None
    start_error: str | None = None
    grace_until: float = 0.0  # monotonic; silence tolerated until then (adapter starting a session)


def _normalise_bind(bind: str) -> str:
    if bind.startswith("tcp://") and bind.endswith(":0"):
        return bind[:-2] + ":*"
    return bind


class RigServer:
    """ROUTER server: registration, heartbeats, dispatch with retries surfaced to the caller, Curve.

    Use as a context manager (or call :meth:`close`). All public methods are thread-safe.
    """

    def __init__(self, bind: str, *, keys_dir: Path | str | None = None, insecure: bool = False,
                 heartbeat_s: float = 0.25, liveness: int = 3, pipeline: int = 1,
                 session_start_grace_s: float = 30.0, max_message_bytes: int = m.MAX_MESSAGE_BYTES) -> None:
        if heartbeat_s <= 0 or liveness < 1 or pipeline < 1:
            raise ValueError("heartbeat_s must be > 0, liveness >= 1 and pipeline >= 1")
        bind = _normalise_bind(bind)
        keys_path = Path(keys_dir) if keys_dir is not None else None
        keyfiles.require_security(bind, keys_path, insecure, role="orchestrator")
        self.heartbeat_s = float(heartbeat_s)
        self.liveness = int(liveness)
        self.pipeline = int(pipeline)
        # Starting a session can keep a rig's CPU busy for seconds (loading models, opening a window);
        # silence is tolerated that long after a new session is announced, until the rig reports the
        # session ready. A crash still shows at once (the connection closes); only a rig that freezes
        # while starting its session is noticed later.
        self.session_start_grace_s = float(session_start_grace_s)
        self.max_message_bytes = max_message_bytes
        self.keys_dir = keys_path
        self._ctx = zmq.Context()
        self._auth = None
        self._allowed: dict[bytes, str] = {}
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._mon: zmq.Socket | None = None
        try:
            self._sock.setsockopt(zmq.LINGER, 200)
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._sock.setsockopt(zmq.MAXMSGSIZE, _HARD_MAX_BYTES)
            self._sock.setsockopt(zmq.SNDHWM, 10000)
            self._sock.setsockopt(zmq.RCVHWM, 10000)
            if keys_path is not None:
                pair = keyfiles.orchestrator_pair(keys_path)
                self._allowed = keyfiles.allowed_keys(keys_path)
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("cloop.transport.zap"))
                self._auth.start()
                self._auth.configure_curve(domain="*", location=str(keyfiles.allow_dir(keys_path)))
                self._sock.curve_secretkey = pair.secret
                self._sock.curve_publickey = pair.public
                self._sock.curve_server = True
            self._mon = self._sock.get_monitor_socket(
                zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
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
        self._allow_sig = self._allow_signature()
        self._next_key_check = 0.0
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
        self._copy = keys_path is None  # Curve mode needs zmq.Frame objects to read the ZAP User-Id
        self._rigs: dict[bytes, _Rig] = {}
        self._by_rig_id: dict[str, bytes] = {}
        self._session: tuple[str, str] | None = None
        self._required: tuple[str, ...] = ()
        self._rig_wait_s = 60.0
        self.stats: collections.Counter[str] = collections.Counter()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)

        # Also guarded by _cond.
        self._pending: collections.deque[_Pending] = collections.deque()
        self._probe_at: list[float] = []
        self._log_budget = (0.0, 0)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cloop-rigserver", daemon=True)
        self._thread.start()
        log.info("rig server listening on %s (%s)", self.endpoint,
                 f"Curve, allow-list {keyfiles.allow_dir(keys_path)}: {len(self._allowed)} key(s)"
                 if keys_path else "INSECURE plain text, loopback only")

    # ------------------------------------------------------------------ public API (any thread)
    def __enter__(self) -> "RigServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rigs(self) -> list[RigInfo]:
        """Snapshot of the rigs registered right now."""
        with self._cond:
            return [self._snapshot(r) for r in self._rigs.values()]

    def in_flight(self) -> dict[str, list[Any]]:
        """Trial ids currently dispatched to each rig (for monitoring and tests)."""
        with self._cond:
            return {r.info.rig_id: list(r.inflight) for r in self._rigs.values()}

    def wait_for_rigs(self, capabilities: list[str], count: int = 1, timeout_s: float = 60.0,
                      *, progress: Callable[[str], None] | None = None) -> list[RigInfo]:
        """Block until ``count`` rigs offering any of ``capabilities`` are registered and, if a session
        was set, have started it (their adapter is loaded: window open, models built...).

        Remembers ``capabilities`` (and ``timeout_s`` as the default wait for a free rig when a trial
        is retried). Raises :class:`NoRigError` after ``timeout_s`` saying what it waited for and where.
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
                ok = [self._snapshot(r) for r in self._rigs.values()
                      if r.info.offers(capabilities) and (sid is None or r.ready_session == sid)]
                if len(ok) >= count:
                    self._cond.notify_all()
                    break
                now = time.monotonic()
                if now >= end:
                    seen = ", ".join(f"{r.info.rig_id} (adapters {list(r.info.adapters)}, stimulus types "
                                     f"{list(r.info.stimulus_types)}"
                                     + (f"; could not start the session: {r.start_error}" if r.start_error else
                                        "; still starting the session" if sid and r.ready_session != sid else "")
                                     + ")" for r in self._rigs.values()) or "none"
                    hint = (" Check that the rigs run `cloop rig --connect` with this address and that their"
                            " public keys are in " + str(keyfiles.allow_dir(self.keys_dir))
                            if self.secure else "")
                    raise NoRigError(f"no {what} registered within {timeout_s:g} s on {where}; "
                                     f"registered rigs: {seen}; rejected handshakes: "
                                     f"{self.stats['auth_failed']}.{hint}")
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
        pending = _Pending(cmd=cmd, msg_bytes=msg_bytes, future=fut,
                           timeout_s=float(timeout_s) if timeout_s is not None else cmd.timeout_s + _DEFAULT_GRACE_S,
                           rig_wait_deadline=time.monotonic() + wait, target=rig_id,
                           capabilities=self._required)
        with self._cond:
            if self._stopped:
                raise TransportError("rig server is closed")
            self._pending.append(pending)
            self._dispatch_and_drain()
        return fut

    def run_trial(self, cmd: TrialCommand, timeout_s: float | None = None, *, rig_id: str | None = None,
                  rig_wait_s: float | None = None) -> TrialOutcome:
        """Dispatch one attempt and block for its outcome.

        Raises :class:`RigLost`, :class:`TrialTimeout`, :class:`TrialRejected` (all
        :class:`AttemptFailed`: retry with ``attempt + 1``) or :class:`NoRigError`.
        """
        fut = self.submit(cmd, timeout_s, rig_id=rig_id, rig_wait_s=rig_wait_s)
        return fut.result()

    def run_joint(self, cmds: dict[str, TrialCommand], timeout_s: float | None = None) -> dict[str, TrialOutcome]:
        """Present one trial on several rigs together (e.g. display PC + stimulator); all must answer."""
        futures = {rig: self.submit(cmd, timeout_s, rig_id=rig) for rig, cmd in cmds.items()}
        return {rig: f.result() for rig, f in futures.items()}

    def reload_keys(self) -> None:
        """Re-read the allow-list directory now (it is also re-read by itself within 2 s of a change)."""
        if self._auth is None or self.keys_dir is None:
            return
        self._allow_sig = self._allow_signature()
        self._allowed = keyfiles.allowed_keys(self.keys_dir)
        self._auth.configure_curve(domain="*", location=str(keyfiles.allow_dir(self.keys_dir)))
        log.info("allow-list %s: %d key(s)", keyfiles.allow_dir(self.keys_dir), len(self._allowed))
        names = set(self._allowed.values())
        with self._cond:
            for rig in list(self._rigs.values()):
                if rig.info.key_name not in names:
                    self._send(rig.ident, m.encode(m.Bye(reason="this rig's key was removed from the allow-list")))
                    self._drop(rig, "its key was removed from the allow-list")

    def _allow_signature(self) -> tuple[Any, ...] | None:
        if self.keys_dir is None:
            return None
        try:
            return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                                for p in keyfiles.allow_dir(self.keys_dir).glob("*.key")))
        except OSError:
            return None

    def _check_allow_list(self, now: float) -> None:
        if self._auth is None or now < self._next_key_check:
            return
        self._next_key_check = now + 2.0
        if self._allow_signature() != self._allow_sig:
            try:
                self.reload_keys()
            except keyfiles.SecurityError as exc:
                log.error("cannot reload the allow-list: %s", exc)

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

    def _snapshot(self, rig: _Rig) -> RigInfo:
        info = rig.info
        return RigInfo(**{**info.__dict__, "clock_offset_s": rig.clock.offset, "clock_rtt_s": rig.clock.rtt,
                          "session_ready": rig.ready_session, "start_error": rig.start_error})

    def _event(self, kind: str, **fields: Any) -> None:
        self.events.append({"event": kind, "t": time.time(), **fields})

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
                            return
                    more = self._drain_socket()
                    if self._mon in events:
                        self._on_monitor()
                    now = time.monotonic()
                    if self._probe_at and now >= self._probe_at[0]:
                        self._probe_at = [t for t in self._probe_at if t > now]
                        self._probe_all()
                    if now >= next_tick:
                        self._housekeeping(now)
                        next_tick = now + tick
                    more = self._drain_socket() or more
        except Exception:
            log.exception("rig server I/O thread crashed")
            with self._cond:
                self._shutdown("rig server I/O thread crashed")
        finally:
            with self._cond:
                self._stopped = True
                self._sock.close(200)
                self._mon.close(0)
                self._pipe_in.close(0)

    def _drain_socket(self, limit: int = 512) -> bool:
        """Handle what is waiting on the ROUTER (lock held); True if more is left after ``limit``."""
        if self._stopped:
            return False
        for _ in range(limit):
            if not self._sock.getsockopt(_EVENTS) & _POLLIN:
                return False
            try:
                ident = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            # Curve: a message from a connection not yet registered is read as a zmq.Frame, whose
            # ZAP User-Id names the key it authenticated with; everything else as plain bytes.
            copy = self._copy or ident in self._rigs
            frames: list[Any] = [ident]
            while self._sock.getsockopt(_RCVMORE):
                frames.append(self._sock.recv(copy=copy))
            try:
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
                self._fail(p, RigLost(f"{reason} while trial {p.cmd.trial_id} was on rig {rig.info.rig_id}",
                                      trial_id=p.cmd.trial_id, attempt=p.cmd.attempt, rig_id=rig.info.rig_id))
            rig.inflight.clear()
        while self._pending:
            self._fail(self._pending.popleft(), TransportError(reason))
        with self._cond:
            self._rigs.clear()
            self._by_rig_id.clear()
            self._cond.notify_all()
        self._commands.clear()
        self._stopped = True

    @staticmethod
    def _fail(p: _Pending, exc: BaseException) -> None:
        if not p.future.done():
            try:
                p.future.set_exception(exc)
            except concurrent.futures.InvalidStateError:
                pass

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
        if reply:
            try:
                err = m.ErrorMessage(code=code, message=reason[:4000], trial_id=trial_id, attempt=attempt)
            except Exception:
                err = m.ErrorMessage(code=code, message=reason[:4000])
            try:
                self._sock.send_multipart([ident, m.encode(err)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

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

    def _on_hello(self, ident: bytes, msg: m.Hello, frame: Any, now: float) -> None:
        key_name = peer = None
        if isinstance(frame, bytes) and ident in self._rigs:  # re-hello on a known connection
            key_name, peer = self._rigs[ident].info.key_name, self._rigs[ident].info.peer_address
        elif not isinstance(frame, bytes):
            try:
                user = frame.get("User-Id")
                key_name = self._allowed.get(user.encode()) if user else None
            except Exception:
                key_name = None
            try:
                peer = frame.get("Peer-Address")
            except Exception:
                peer = None
        old_ident = self._by_rig_id.get(msg.rig_id)
        if self.secure:
            if key_name is None:  # authenticated at connect time, but its key has since been removed
                self._reject(ident, f"hello from rig {msg.rig_id}: its key is not (or no longer) in the "
                                    "allow-list", code="not_allowed")
                return
            holder = self._rigs[old_ident].info.key_name if old_ident is not None else None
            if old_ident is not None and old_ident != ident and holder != key_name:
                self._reject(ident, f"rig id {msg.rig_id} is registered with another key ({holder}); "
                                    f"this connection uses key {key_name}", code="rig_id_taken")
                return
        if old_ident is not None and old_ident != ident:
            self._drop(self._rigs[old_ident], "rig registered again from a new connection (restarted?)")
        existing = self._rigs.get(ident)
        if existing is not None and existing.info.rig_id != msg.rig_id:
            self._drop(existing, "connection re-registered under another rig id")
            existing = None
        info = RigInfo(rig_id=msg.rig_id, adapters=tuple(msg.adapters),
                       stimulus_types=tuple(msg.capabilities.stimulus_types),
                       response_kinds=tuple(msg.capabilities.response_kinds),
                       software_version=msg.software_version, hostname=msg.hostname, pid=msg.pid,
                       key_name=key_name, peer_address=peer, registered_at=time.time(),
                       clock_offset_s=None, clock_rtt_s=None)
        if existing is not None:
            existing.info = info
            existing._match_cache.clear()
            existing.last_seen = now
            rig = existing
        else:
            rig = _Rig(ident=ident, info=info, last_seen=now, last_sent=now, clock=_Clock())
            rig.clock.coarse(msg.clock.time, time.time())
        with self._cond:
            self._rigs[ident] = rig
            self._by_rig_id[msg.rig_id] = ident
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

    def _send_welcome(self, rig: _Rig) -> None:
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

    def _on_result(self, rig: _Rig, msg: m.Result) -> None:
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
        offset = rig.clock.offset
        mapped = {k: (v - offset if (v is not None and offset is not None) else v) for k, v in msg.timing.items()}
        outcome = TrialOutcome(trial_id=msg.trial_id, attempt=msg.attempt, rig_id=rig.info.rig_id,
                               response=dict(msg.response), timing=dict(msg.timing), mapped_timing=mapped,
                               clock_offset_s=offset, clock_rtt_s=rig.clock.rtt, dispatched_at=p.dispatched_at,
                               received_at=time.time(), cached=msg.cached, meta=dict(msg.meta))
        self.stats["results"] += 1
        if not p.future.done():
            p.future.set_result(outcome)
        self._dispatch()

    def _on_worker_error(self, rig: _Rig, msg: m.ErrorMessage) -> None:
        self.stats["worker_errors"] += 1
        p = rig.inflight.get(msg.trial_id) if msg.trial_id is not None else None
        if p is not None and (msg.attempt is None or msg.attempt == p.cmd.attempt):
            del rig.inflight[msg.trial_id]
            exc = TrialRejected(f"rig {rig.info.rig_id} rejected trial {msg.trial_id!r} attempt "
                                f"{p.cmd.attempt}: [{msg.code}] {msg.message}", trial_id=msg.trial_id,
                                attempt=p.cmd.attempt, rig_id=rig.info.rig_id)
            exc.code = msg.code
            self._fail(p, exc)
            self._dispatch()
        else:
            if msg.code == "session_failed" and msg.trial_id is None:
                with self._cond:
                    rig.start_error = msg.message
                    self._cond.notify_all()
            log.warning("rig %s reported: [%s] %s", rig.info.rig_id, msg.code, msg.message)

    def _drop(self, rig: _Rig, reason: str) -> None:
        with self._cond:
            if self._rigs.get(rig.ident) is not rig:
                return
            del self._rigs[rig.ident]
            if self._by_rig_id.get(rig.info.rig_id) == rig.ident:
                del self._by_rig_id[rig.info.rig_id]
            self._cond.notify_all()
        self.stats["rigs_lost"] += 1
        self._event("rig_lost", rig_id=rig.info.rig_id, reason=reason,
                    trials=[p.cmd.trial_id for p in rig.inflight.values()])
        log.warning("rig %s lost: %s%s", rig.info.rig_id, reason,
                    f"; failing {len(rig.inflight)} trial(s) in flight" if rig.inflight else "")
        for p in list(rig.inflight.values()):
            self._fail(p, RigLost(f"rig {rig.info.rig_id} lost during trial {p.cmd.trial_id!r} attempt "
                                  f"{p.cmd.attempt}: {reason}", trial_id=p.cmd.trial_id,
                                  attempt=p.cmd.attempt, rig_id=rig.info.rig_id))
        rig.inflight.clear()

    def _eligible(self, p: _Pending) -> _Rig | None:
        """The least busy (then least recently used) free rig that can present this trial."""
        best: _Rig | None = None
        best_key: tuple[int, float] = (0, 0.0)
        pipeline = self.pipeline
        cmd = p.cmd
        for rig in self._rigs.values():
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

    def _has_capacity(self) -> bool:
        return any(len(r.inflight) < self.pipeline for r in self._rigs.values())

    def _dispatch(self) -> None:
        """Send queued trials (FIFO) to free suitable rigs; O(1) per dispatched trial."""
        if not self._pending or not self._rigs:
            return
        skipped: list[_Pending] = []
        while self._pending and self._has_capacity():
            p = self._pending[0]
            if p.future.cancelled():
                self._pending.popleft()
                continue
            rig = self._eligible(p)
            if rig is None:  # this one waits for a particular rig or capability; look a little further
                skipped.append(self._pending.popleft())
                if len(skipped) >= 256:
                    break
                continue
            self._pending.popleft()
            now = time.monotonic()
            p.deadline = now + p.timeout_s
            p.dispatched_at = time.time()
            p.rig_id = rig.info.rig_id
            rig.inflight[p.cmd.trial_id] = p
            rig.last_dispatch = now
            if self._send(rig.ident, p.msg_bytes):
                rig.last_sent = now
                self.stats["dispatched"] += 1
                if p.cmd.attempt > 1:
                    self._event("retry_dispatched", trial_id=p.cmd.trial_id, attempt=p.cmd.attempt,
                                rig_id=rig.info.rig_id)
        if skipped:
            self._pending.extendleft(reversed(skipped))

    def _housekeeping(self, now: float) -> None:
        self._check_allow_list(now)
        dead_after = self.heartbeat_s * self.liveness
        hb: bytes | None = None
        for rig in list(self._rigs.values()):
            if now - rig.last_seen > dead_after and now > rig.grace_until:
                self._drop(rig, f"silent for {now - rig.last_seen:.2f} s (heartbeat {self.heartbeat_s:g} s x "
                                f"{self.liveness})")
                continue
            for p in [p for p in rig.inflight.values() if now >= p.deadline]:
                del rig.inflight[p.cmd.trial_id]
                self.stats["timeouts"] += 1
                self._fail(p, TrialTimeout(f"rig {rig.info.rig_id} did not answer trial {p.cmd.trial_id!r} attempt "
                                           f"{p.cmd.attempt} within {p.timeout_s:g} s", trial_id=p.cmd.trial_id,
                                           attempt=p.cmd.attempt, rig_id=rig.info.rig_id))
            if now - rig.last_hb >= self.heartbeat_s:
                if hb is None:
                    hb = m.encode(m.Heartbeat(sent_at=time.time()))
                if self._send(rig.ident, hb):
                    rig.last_sent = rig.last_hb = now
        if self._pending:
            kept: collections.deque[_Pending] = collections.deque()
            for p in self._pending:
                if p.future.cancelled():
                    continue
                if now >= p.rig_wait_deadline:
                    want = f"rig {p.target}" if p.target else f"a rig offering {list(p.capabilities) or 'anything'}"
                    self._fail(p, NoRigError(f"trial {p.cmd.trial_id!r} attempt {p.cmd.attempt}: no free {want} "
                                             f"on {self.endpoint} in time"))
                else:
                    kept.append(p)
            self._pending = kept
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
            if kind == zmq.EVENT_DISCONNECTED:
                self.stats["disconnects"] += 1
                now = time.monotonic()
                self._probe_all()
                self._probe_at = sorted(self._probe_at + [now + 0.005, now + 0.02, now + 0.1])
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.stats["auth_failed"] += 1
                if self.stats["auth_failed"] <= 20 or self.stats["auth_failed"] % 100 == 0:
                    log.warning("refused a connection on %s: %s (%d so far)", self.endpoint,
                                "key not in the allow-list" if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                else "handshake failed (no or wrong Curve keys?)", self.stats["auth_failed"])

