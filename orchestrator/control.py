"""Pause, continue and stop a running session from anywhere, honoured only at trial boundaries.

Requests travel through the session's status in the database (`cloop pause|continue|stop SESSION`
from another terminal or machine), so they survive the orchestrator and need no extra socket. Ctrl-C
at the orchestrator's terminal maps onto the same requests: once pauses at the next trial boundary,
twice stops. A trial in flight always finishes and is recorded first, so the database stays consistent.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Callable

from orchestrator.store import TrialStore

log = logging.getLogger("cloop.control")

PAUSED_STATES = ("pause_requested", "paused")
#: A session in one of these is a closed record: resuming it would append trials to it.
FINISHED_STATUSES = ("completed", "stopped", "abandoned")


def request(store: TrialStore, session: str, command: str) -> str:
    """Ask a session to pause, continue or stop; return the session's new status (or raise ValueError)."""
    session_id = store.resolve_session(session)
    if command == "pause":
        if store.transition_status(session_id, ("running", "continue_requested"), "pause_requested"):
            return "pause_requested"
    elif command == "continue":
        if store.transition_status(session_id, PAUSED_STATES, "continue_requested"):
            return "continue_requested"
    elif command == "stop":
        if store.transition_status(session_id, ("running", "waiting_for_rig", "continue_requested", *PAUSED_STATES),
                                   "stop_requested"):
            return "stop_requested"
        # Nobody is running it (the orchestrator died, or no rig came): stopping just closes the books;
        # a trial left in flight can no longer be reconciled, so it is marked abandoned, not deleted.
        if store.transition_status(session_id, ("interrupted", "created", "no_rig", "failed"), "stopped",
                                   stopped=True):
            store.abandon_open_trials(session_id, "session stopped while no orchestrator was running it")
            return "stopped"
    else:
        raise ValueError(f"unknown command {command!r}")
    status = store.session(session_id)["status"]
    raise ValueError(f"cannot {command} session {session_id}: its status is {status!r}")


#: What each request waits for with `wait_for` (`cloop pause --wait`): the state that proves it was honoured.
HONOURED = {
    "pause": ("paused", "stopped", "completed", "interrupted"),
    "continue": ("running", "stopped", "completed", "interrupted"),
    "stop": ("stopped", "completed", "interrupted"),
}


def wait_for(store: TrialStore, session_id: str, statuses: tuple[str, ...], timeout_s: float,
             poll_s: float = 0.2) -> str:
    """Poll the session's status until it is one of `statuses`; return it (raise TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = store.session(session_id)["status"]
        if status in statuses:
            return status
        if time.monotonic() >= deadline:
            raise TimeoutError(f"session {session_id} is still {status!r} after {timeout_s:g} s "
                               f"(waiting for {' / '.join(statuses)}); is its orchestrator running?")
        time.sleep(poll_s)


class SessionController:
    """The engine's SessionControl: reads requests at each trial boundary and waits while paused."""

    def __init__(self, store: TrialStore, poll_s: float = 0.2, announce: Callable[[str], None] | None = None):
        self.store = store
        self.poll_s = poll_s
        self.announce = announce or (lambda message: log.warning(message))
        self.interrupts = 0
        self._previous_handler: Any = None

    # -- Ctrl-C ------------------------------------------------------------------------------

    def install_sigint(self) -> "SessionController":
        """Ctrl-C once: pause at the next trial boundary; twice: stop. Main thread only."""
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def uninstall_sigint(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.announce("Ctrl-C: pausing at the next trial boundary (Ctrl-C again to stop)")
        else:
            self.announce("Ctrl-C again: stopping at the next trial boundary")

    # -- the engine's checkpoint ------------------------------------------------------------

    def checkpoint(self, session_id: str) -> str:
        """Return "run" or "stop"; block while the session is paused."""
        status = self.store.session(session_id)["status"]
        if self.interrupts >= 2 or status == "stop_requested":
            return "stop"
        if self.interrupts == 1 or status in PAUSED_STATES:
            return self._pause(session_id)
        if status == "continue_requested":
            self.store.transition_status(session_id, ("continue_requested",), "running")
        return "run"

    def _pause(self, session_id: str) -> str:
        self.store.transition_status(session_id, ("running", "pause_requested", "continue_requested"), "paused")
        self.announce(
            f"session {session_id} paused at a trial boundary; `cloop continue {session_id[:8]}` resumes, "
            f"`cloop stop {session_id[:8]}` (or Ctrl-C) stops"
        )
        while True:
            status = self.store.session(session_id)["status"]
            if self.interrupts >= 2 or status == "stop_requested":
                return "stop"
            if status in ("continue_requested", "running"):
                self.interrupts = 0  # a continue also forgives a Ctrl-C pressed while paused
                self.store.transition_status(session_id, ("continue_requested",), "running")
                self.announce(f"session {session_id} continues")
                return "run"
            time.sleep(self.poll_s)
