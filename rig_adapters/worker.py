"""The rig PC's side of the rig network: a DEALER worker that keeps itself connected.

Threads: the process's main thread runs the adapter (PsychoPy needs it); a background I/O thread
owns the DEALER socket, answers heartbeats, detects a dead orchestrator (Paranoid Pirate: no traffic
for ``heartbeat_s * liveness``) and reconnects by itself with exponential backoff.

Exactly-once presentation per rig: results are kept in a journal (:mod:`rig_adapters.journal`)
keyed by (session, trial id), written and fsync'ed *before* the result is sent. A trial id seen again
(a retry after a lost connection, or after this worker was killed and restarted with the same
``--state-dir``) gets the stored result with ``cached=True`` and is not presented again.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import re
import signal
import socket as pysocket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from orchestrator import keys as keyfiles
from orchestrator import messages as m
from orchestrator.wire_images import ImagePayloadError, image_array
from rig_adapters.base import Adapter, AdapterResult, SessionInfo
from rig_adapters.journal import ResultJournal

__all__ = ["RigWorker", "ResultJournal", "image_problem"]

log = logging.getLogger("cloop.worker")

#: Longest silence from the orchestrator tolerated while the adapter starts a session (loading
#: models or opening a window can keep this process, and its network thread, busy for seconds).
SESSION_START_GRACE_S = 30.0


def software_version() -> str:
    try:
        from importlib.metadata import version

        return version("cloop")
    except Exception:
        return "0+unknown"


def default_rig_id(adapter_name: str) -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", pysocket.gethostname())[:40] or "rig"
    return f"{host}-{adapter_name}"


class RigWorker:
    """Connects an adapter to an orchestrator and serves trials until stopped."""

    def __init__(self, connect: str, adapter: Adapter, *, rig_id: str | None = None,
                 keys_dir: Path | str | None = None, key_name: str | None = None, insecure: bool = False,
                 state_dir: Path | str | None = None, heartbeat_s: float = 0.25, liveness: int = 3,
                 backoff_initial_s: float = 0.05, backoff_max_s: float = 2.0) -> None:
        keys_path = Path(keys_dir) if keys_dir is not None else None
        keyfiles.require_security(connect, keys_path, insecure, role="rig")
        self.curve = None
        if keys_path is not None:
            if not key_name:
                raise keyfiles.SecurityError("--keys DIR needs --name NAME (the rig's key pair DIR/NAME.key_secret)")
            self.curve = keyfiles.worker_keys(keys_path, key_name)
        self.connect = connect
        self.adapter = adapter
        self.rig_id = rig_id or key_name or default_rig_id(adapter.name)
        caps = adapter.capabilities()
        self._hello_fields = dict(rig_id=self.rig_id, adapters=[adapter.name],
                                  capabilities=m.Capabilities(stimulus_types=list(caps["stimulus_types"]),
                                                              response_kinds=list(caps["response_kinds"])),
                                  software_version=software_version(), pid=os.getpid(),
                                  hostname=pysocket.gethostname()[:255])
        self._hello()  # fail now, not after connecting, if the rig id or capabilities are invalid
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        journal_path = Path(state_dir) / f"{self.rig_id}.journal.jsonl" if state_dir is not None else None
        self.journal = ResultJournal(journal_path)
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._tasks: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._outbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._pipe_addr = f"inproc://cloop-worker-{id(self)}"
        self._pipe_in = self._ctx.socket(zmq.PAIR)
        self._pipe_in.bind(self._pipe_addr)
        self._pipe_out = self._ctx.socket(zmq.PAIR)
        self._pipe_out.connect(self._pipe_addr)
        self.session: SessionInfo | None = None
        self._session_error: str | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self.connected = threading.Event()  # set while registered (welcome received)
        self._ready_session: str | None = None  # read by the I/O thread for its heartbeats
        self._hb_now = False
        self._starting_session = False  # read by the I/O thread: silence is tolerated longer meanwhile
        self._start_ended_at = 0.0  # monotonic; silence before a start ends is the start's, not the orchestrator's

    # ------------------------------------------------------------------ main thread
    def run(self, *, install_signal_handlers: bool = False) -> int:
        """Serve until :meth:`stop` (or SIGTERM/SIGINT if asked to install handlers); return 0."""
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        # Let the network thread get the GIL within 1 ms while the adapter computes (default 5 ms).
        if sys.getswitchinterval() > 0.001:
            sys.setswitchinterval(0.001)
        io = threading.Thread(target=self._io_main, name="cloop-worker-io", daemon=True)
        io.start()
        try:
            while not self._stop.is_set():
                try:
                    kind, payload = self._tasks.get(timeout=0.2)
                except queue.Empty:
                    try:
                        self.adapter.idle()
                    except Exception:
                        log.exception("adapter %s failed while idle", self.adapter.name)
                    continue
                if kind == "session":
                    self._start_session(payload)
                elif kind == "trial":
                    self._post(self._present(payload))
        finally:
            self._stop.set()
            self._wake()
            io.join(timeout=5)
            try:
                self.adapter.close()
            finally:
                self.journal.close()
                self._pipe_out.close(0)
                self._ctx.term()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _start_session(self, info: SessionInfo) -> None:
        self._starting_session = True
        try:
            self.adapter.start(info)
            self.session = info
            self._session_error = None
            self._ready_session = info.session_id
            self._post(("ready", info.session_id))
            log.info("session %s started on adapter %s", info.session_id, self.adapter.name)
        except Exception as exc:
            self.session = info
            self._session_error = f"adapter {self.adapter.name} could not start session {info.session_id}: {exc}"
            log.error("%s", self._session_error)
            self._post(("error", (None, None, "session_failed", self._session_error)))
        finally:
            self._start_ended_at = time.monotonic()
            self._starting_session = False

    def _present(self, msg: m.Trial) -> tuple[str, Any]:
        """Present one trial (journal first, result stored before it is sent); return the outcome item."""
        key = ResultJournal.key(msg.session_id, msg.trial_id)
        if self._session_error:
            return ("error", (key, msg, "session_failed", self._session_error))
        if self.session is None or self.session.session_id != msg.session_id:
            return ("error", (key, msg, "session_mismatch",
                              f"trial for session {msg.session_id}, rig is in "
                              f"{self.session.session_id if self.session else 'no session'}"))
        previous = self.journal.times_started(key)
        self.journal.started(key, msg.attempt)
        try:
            res: AdapterResult = self.adapter.present(msg)
            result = {"response": dict(res.response), "timing": dict(res.timing), "meta": dict(res.meta),
                      "presented_attempt": msg.attempt, "interrupted_before": previous}
            data = m.encode(self._result_msg(msg, msg.attempt, result, cached=False))  # validates it too
        except m.MessageError as exc:
            # The adapter's answer breaks the wire contract (a clock in nanoseconds, a string where a
            # time belongs): fail this attempt with the field and the raw value, never send or store it.
            log.error("trial %r attempt %d: adapter %s produced a result the wire refuses: %s",
                      msg.trial_id, msg.attempt, self.adapter.name, exc)
            return ("error", (key, msg, "bad_result", f"adapter {self.adapter.name} produced a bad result: {exc}"))
        except Exception as exc:
            log.exception("trial %r attempt %d failed on adapter %s", msg.trial_id, msg.attempt, self.adapter.name)
            code = getattr(exc, "code", None)
            if not isinstance(code, str) or not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,64}", code):
                code = "adapter_failed"
            return ("error", (key, msg, code, f"{type(exc).__name__}: {exc}"))
        self.journal.store(key, msg.attempt, result)
        self.stats["presented"] += 1
        return ("result", (key, msg, result, data))

    def _post(self, item: tuple[str, Any]) -> None:
        self._outbox.append(item)
        self._wake()

    def _wake(self) -> None:
        try:
            self._pipe_out.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------ I/O thread
    def _hello(self) -> m.Hello:
        return m.Hello(clock=m.ClockInfo(time=time.time()), **self._hello_fields)

    def _new_socket(self) -> tuple[zmq.Socket, zmq.Socket]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(self.backoff_max_s * 1000))
        # libzmq refuses (and drops the connection of) anything larger than the largest legal message
        sock.setsockopt(zmq.MAXMSGSIZE, m.MAX_TRIAL_BYTES + 4096)
        if self.curve is not None:
            sock.curve_secretkey = self.curve.pair.secret
            sock.curve_publickey = self.curve.pair.public
            sock.curve_serverkey = self.curve.server_public
        mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)
        sock.connect(self.connect)
        return sock, mon

    def _io_main(self) -> None:
        try:
            self._io_loop()
        except Exception:
            log.exception("worker I/O thread crashed")
            self._stop.set()
        finally:
            self._pipe_in.close(0)

    def _io_loop(self) -> None:
        backoff = self.backoff_initial_s
        hb_s, liveness = self.heartbeat_s, self.liveness
        active: dict[tuple[str, str], int] = {}  # trials queued or being presented -> latest attempt asked
        session_id: str | None = None
        failures = 0  # connection attempts since the last registration (0: report the next failure)
        while not self._stop.is_set():
            sock, mon = self._new_socket()
            self.stats["connects"] += 1
            log.log(logging.INFO if failures == 0 else logging.DEBUG, "rig %s connecting to %s (%s)",
                    self.rig_id, self.connect, "Curve" if self.curve else "insecure")
            send = _Sender(sock)
            send(m.encode(self._hello()))
            last_recv = time.monotonic()
            registered = False
            echo: tuple[float, float] | None = None
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(self._pipe_in, zmq.POLLIN)
            poller.register(mon, zmq.POLLIN)
            reason = ""
            before = time.monotonic()
            while not self._stop.is_set():
                wait_s = min(hb_s / 2, 0.1)
                events = dict(poller.poll(wait_s * 1000))
                now = time.monotonic()
                stalled = now - before - wait_s  # the whole pass since the last one, not only the poll
                before = now
                if stalled > hb_s:
                    # This thread was not scheduled (the adapter held the GIL, the machine is
                    # overloaded): a silence it could not hear is not the orchestrator's.
                    last_recv += stalled
                if sock in events:
                    while True:
                        try:
                            data = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        last_recv = now
                        try:
                            msg = m.decode(data, sender="orchestrator")
                        except m.MessageError as exc:
                            self.stats["bad_messages"] += 1
                            log.warning("ignored a bad message from the orchestrator: %s", exc)
                            if exc.msg_type == "trial" and exc.trial_id is not None:  # fail it now, not at timeout
                                send(m.encode(m.ErrorMessage(code="bad_message", trial_id=exc.trial_id,
                                                             attempt=exc.attempt,
                                                             message=f"trial refused: {exc}"[:4000])))
                            continue
                        if msg.type == "welcome":
                            registered = True
                            backoff = self.backoff_initial_s
                            hb_s, liveness = msg.heartbeat_s, msg.liveness
                            self.connected.set()
                            if msg.session_id is not None and msg.session_id != session_id:
                                session_id = msg.session_id
                                self._tasks.put(("session", SessionInfo(msg.session_id, msg.protocol_text or "",
                                                                        self.rig_id)))
                            log.info("rig %s registered with %s (session %s)%s", self.rig_id, self.connect,
                                     msg.session_id or "none yet",
                                     f" after {failures} reconnect attempt(s)" if failures else "")
                            failures = 0
                        elif msg.type == "heartbeat":
                            echo = (msg.sent_at, time.time())
                        elif msg.type == "trial":
                            self._on_trial(msg, send, active, registered, session_id)
                        elif msg.type == "error":
                            if msg.code == "not_registered":
                                registered = False
                                self.connected.clear()
                                send(m.encode(self._hello()))
                            elif msg.code in ("not_allowed", "rig_id_taken"):
                                self.stats["refused"] += 1
                                log.error("the orchestrator refused this rig: %s", msg.message)
                            else:
                                log.warning("orchestrator says: [%s] %s", msg.code, msg.message)
                        elif msg.type == "bye":
                            reason = f"orchestrator said bye ({msg.reason})"
                            break
                    if reason:
                        break
                if self._pipe_in in events:
                    while True:
                        try:
                            self._pipe_in.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                while self._outbox:
                    self._on_outcome(self._outbox.popleft(), send, active)
                if mon in events:
                    self._on_monitor(mon)
                if echo is not None or now - send.last >= hb_s or self._hb_now:
                    self._hb_now = False
                    hb = m.Heartbeat(sent_at=time.time(), echo_sent_at=echo[0] if echo else None,
                                     echo_received_at=echo[1] if echo else None,
                                     session_ready=self._ready_session)
                    send(m.encode(hb))
                    echo = None
                silence_limit = hb_s * liveness
                if self._starting_session:  # as the server does: starting may keep this process busy
                    silence_limit = max(silence_limit, SESSION_START_GRACE_S)
                last_recv = max(last_recv, self._start_ended_at)
                if now - last_recv > silence_limit:
                    reason = (f"no word from the orchestrator for {now - last_recv:.2f} s"
                              + ("" if registered else " (no welcome: wrong address, orchestrator down, or this "
                                 "rig's key is not in its allow-list)"))
                    break
            self.connected.clear()
            if self._stop.is_set():
                try:
                    sock.send(m.encode(m.Bye(reason="rig worker stopping")), zmq.NOBLOCK)
                    time.sleep(0.05)
                except zmq.ZMQError:
                    pass
            _close_monitored(sock, mon)
            if self._stop.is_set():
                return
            self.stats["reconnects"] += 1
            # Said once per state change: a rig waiting for an orchestrator that is not there yet
            # retries quietly (debug level) until it registers, then says so.
            if failures == 0:
                log.log(logging.INFO if reason.startswith("orchestrator said bye") else logging.WARNING,
                        "rig %s: %s; retrying with back-off up to %.1f s (said once; next message when "
                        "it registers)", self.rig_id, reason, self.backoff_max_s)
            else:
                log.debug("rig %s: %s; reconnecting in %.2f s", self.rig_id, reason, backoff)
            failures += 1
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.backoff_max_s)

    def _on_trial(self, msg: m.Trial, send: "_Sender", active: dict[tuple[str, str], int], registered: bool,
                  session_id: str | None) -> None:
        key = ResultJournal.key(msg.session_id, msg.trial_id)
        if not registered or msg.session_id != session_id:
            send(m.encode(m.ErrorMessage(code="session_mismatch", trial_id=msg.trial_id, attempt=msg.attempt,
                                         message=f"trial for session {msg.session_id}, rig has "
                                                 f"{session_id or 'no session'}")))
            return
        if key in active:  # still queued or being presented: answer the newest attempt when done
            active[key] = max(active[key], msg.attempt)
            self.stats["duplicates_in_progress"] += 1
            return
        stored = self.journal.get(key)
        if stored is not None:
            self.stats["replayed"] += 1
            log.info("trial %r attempt %d already presented (attempt %s): replaying the stored result",
                     msg.trial_id, msg.attempt, stored.get("presented_attempt"))
            try:
                send(m.encode(self._result_msg(msg, msg.attempt, stored, cached=True)))
            except m.MessageError as exc:  # a journal written before the wire refused such values
                send(m.encode(m.ErrorMessage(code="bad_result", trial_id=msg.trial_id, attempt=msg.attempt,
                                             message=f"stored result refused by the wire: {exc}"[:4000])))
            return
        problem = image_problem(msg.stimulus)
        if problem is not None:
            self.stats["refused"] += 1
            send(m.encode(m.ErrorMessage(code="refused", trial_id=msg.trial_id, attempt=msg.attempt,
                                         message=f"trial refused before presenting: {problem}"[:4000])))
            return
        active[key] = msg.attempt
        if self.adapter.inline and self._tasks.empty() and self.session is not None \
                and self.session.session_id == msg.session_id:
            self._on_outcome(self._present(msg), send, active)  # instant adapter: no thread hop
        else:
            self._tasks.put(("trial", msg))

    @staticmethod
    def _result_msg(msg: m.Trial, attempt: int, stored: dict[str, Any], cached: bool) -> m.Result:
        meta = dict(stored.get("meta", {}))
        meta["presented_attempt"] = stored.get("presented_attempt")
        if stored.get("interrupted_before"):
            meta["interrupted_before"] = stored["interrupted_before"]
        return m.build(m.Result, trial_id=msg.trial_id, attempt=attempt, session_id=msg.session_id,
                       response=stored["response"], timing=stored["timing"], cached=cached, meta=meta)

    def _on_outcome(self, item: tuple[str, Any], send: "_Sender", active: dict[tuple[str, str], int]) -> None:
        kind, payload = item
        if kind == "ready":
            self._hb_now = True  # tell the orchestrator right away (ends its start-up grace)
        elif kind == "result":
            key, msg, stored, data = payload
            attempt = active.pop(key, msg.attempt)
            send(data if attempt == msg.attempt else m.encode(self._result_msg(msg, attempt, stored, cached=False)))
        elif kind == "error":
            key, msg, code, text = payload
            attempt = active.pop(key, msg.attempt) if key is not None else None
            send(m.encode(m.ErrorMessage(code=code, message=text[:4000],
                                         trial_id=msg.trial_id if msg is not None else None, attempt=attempt)))

    def _on_monitor(self, mon: zmq.Socket) -> None:
        while True:
            try:
                event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            except Exception:
                continue
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.stats["auth_failed"] += 1
                log.error("the orchestrator at %s refused this rig's key: add its public key file to the "
                          "orchestrator's keys/rigs/ directory", self.connect)
            elif event["event"] in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.stats["auth_failed"] += 1
                log.error("security handshake with %s failed: do both sides use Curve keys (and the right "
                          "orchestrator.key)?", self.connect)


def image_problem(stimulus: dict[str, Any]) -> str | None:
    """Why an image stimulus must not be shown (pixels that do not match their sha256), or None."""
    payload = stimulus.get("image")
    if not isinstance(payload, dict):
        return None
    try:
        image_array(payload, "stimulus.image")
    except ImagePayloadError as exc:
        return str(exc)
    return None


def _close_monitored(sock: zmq.Socket, mon: zmq.Socket) -> None:
    """Close a socket and its monitor, in the only safe order.

    libzmq's I/O thread sends monitor events with a *blocking* send: closing the monitor's reading end
    while the socket still lives (``close`` is asynchronous and its engines report ``DISCONNECTED`` as
    they shut down) leaves that thread blocked forever on a PAIR without a peer. Every socket of the
    context then stops moving: no reconnect, the old TCP connection left in CLOSE-WAIT, hellos that
    never leave. Stop the monitor first, then close both.
    """
    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    sock.close(0)
    mon.close(0)


class _Sender:
    """Non-blocking send that remembers when something last went out (for idle heartbeats)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.last = 0.0

    def __call__(self, data: bytes) -> bool:
        try:
            self.sock.send(data, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        self.last = time.monotonic()
        return True


if __name__ == "__main__":  # ``python -m rig_adapters.worker`` is ``python -m rig_adapters``
    import runpy

    runpy.run_module("rig_adapters", run_name="__main__", alter_sys=True)
