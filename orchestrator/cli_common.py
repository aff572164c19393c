"""The plumbing every `cloop` command shares: exit codes, the database option, logging, run-and-report.

`cloop run`, `cloop demo` and `cloop resume` end through :func:`run_and_report`, so a failure means
the same exit code and the same one line whichever command ran the session; :data:`EXIT_TABLE` is
the one place that maps an exception to an exit code.
"""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from enum import IntEnum
from typing import Any, Callable, Iterable, NoReturn, Optional

import typer

__all__ = ["ExitCode", "fail", "DB_HELP", "db_option", "setup_logging", "run_and_report", "exit_for",
           "summary_line"]


class ExitCode(IntEnum):
    """What `cloop` returns; the README documents 0, 1, 2 and 130."""

    OK = 0
    RUN_FAILED = 1  # the session could not run: no rig came, the rig network failed
    BAD_INPUT = 2  # a bad file, option or session id: nothing was written
    INTERRUPTED = 130  # Ctrl-C outside a session's own pause/stop handling


DB_HELP = "Database URL (default $CLOOP_DB or sqlite:///./cloop.db)."


def db_option() -> Any:
    """The one `--db` option, with the same help on every command."""
    return typer.Option(None, "--db", help=DB_HELP, show_default=False)


def fail(message: str, code: ExitCode = ExitCode.BAD_INPUT) -> NoReturn:
    """Print one `error: ...` line on stderr and leave with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(int(code))


_verbose = False


class _SessionLinesOnly(logging.Filter):
    """Without -v: cloop's own INFO lines, and only warnings from everything else (HTTP, Prefect, ...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _verbose:
            return True
        own = record.name == "cloop" or record.name.startswith("cloop.")
        return record.levelno >= (logging.INFO if own else logging.WARNING)


_FILTER = _SessionLinesOnly()


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record is emitted, not when it was made:
    a caller that swaps stderr (a progress display, an embedding program) and closes the old
    stream must not turn every later log line into a logging error."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(verbose: bool) -> None:
    """One logging setup for every command: cloop's own lines and others' warnings; everything with -v."""
    global _verbose
    _verbose = verbose
    root = logging.getLogger()
    if not any(getattr(h, "_cloop", False) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._cloop = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    adopt_prefect_logging()


def adopt_prefect_logging() -> None:
    """Apply the rule to every handler on the root logger, also those Prefect installs at import.

    Prefect's flow and task loggers still send INFO records to its API (the UI shows every trial);
    only the terminal stays quiet, where the progress display already shows the same.
    """
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if _verbose else logging.INFO)
    for handler in root.handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def exit_for(exc: BaseException, session_id: str, bind: str) -> Optional[tuple[ExitCode, str]]:
    """The exit code and line for an exception that ended a session, or None if it is a bug."""
    import zmq

    from orchestrator.keys import SecurityError
    from orchestrator.preflight import OptionError
    from orchestrator.protocol import ProtocolError
    from orchestrator.session import NoRigError
    from orchestrator.store import LeaseLost, StoreError
    from orchestrator.transport import TransportError

    resumable = f"session {session_id} is resumable: cloop resume {session_id[:8]}"
    table: list[tuple[type[BaseException], ExitCode, Callable[[BaseException], str]]] = [
        (NoRigError, ExitCode.RUN_FAILED, str),
        (TransportError, ExitCode.RUN_FAILED, lambda e: f"{e} ({resumable})"),
        (SecurityError, ExitCode.BAD_INPUT, str),
        (OptionError, ExitCode.BAD_INPUT, str),
        (ProtocolError, ExitCode.BAD_INPUT, lambda e: str(e).splitlines()[0]),
        (LeaseLost, ExitCode.RUN_FAILED, str),  # another orchestrator took over: not the user's input
        (StoreError, ExitCode.BAD_INPUT, str),  # LeaseHeld included: the session runs elsewhere
        (zmq.ZMQError, ExitCode.RUN_FAILED, lambda e: (
            f"cannot bind {bind}: {e}; is an orchestrator still running session {session_id}? "
            "(`cloop sessions` shows its status; give --bind to use another address)")),
        (KeyboardInterrupt, ExitCode.INTERRUPTED, lambda e: f"interrupted; {resumable}"),
    ]
    for kind, code, words in table:
        if isinstance(exc, kind):
            return code, words(exc)
    return None


def summary_line(session_id: str, summary: dict[str, Any]) -> str:
    """The last line of a session: its status, trial counts, why it stopped, the model probabilities."""
    probabilities = ", ".join(f"{k}={v:.4f}" for k, v in summary["probabilities"].items())
    return (
        f"session {session_id} {summary['status']}: {summary['trials_completed']} completed, "
        f"{summary['trials_invalid']} invalid, {summary['trials_failed']} failed trial(s); "
        f"{summary['stop_reason']}; P({probabilities})"
    )


def run_and_report(request: Any, loaded: Any, session_id: str, seed: int, *, prefect: bool,
                   observers: Iterable[Any] = ()) -> dict[str, Any]:
    """Run a registered session with live progress, print its summary line, map failures to exit codes."""
    from orchestrator.progress import ProgressDisplay
    from orchestrator.session import observing

    max_trials = request.max_trials or loaded.protocol.stopping.max_trials
    try:
        with ExitStack() as stack:
            # Prefect's console echoes its flow's trial log lines only with -v; otherwise the display does.
            display = stack.enter_context(ProgressDisplay(max_trials, trial_lines=not (prefect and _verbose)))
            for observer in (display, *observers):
                stack.enter_context(observing(observer))
            summary = _execute(request, session_id, seed, loaded, prefect)
    except BaseException as exc:  # noqa: BLE001 - mapped by EXIT table; anything else is re-raised
        if isinstance(exc, typer.Exit):
            raise
        mapped = exit_for(exc, session_id, request.bind)
        if mapped is None:
            raise
        code, line = mapped
        fail(line, code) if code != ExitCode.INTERRUPTED else _interrupted(line)
    typer.echo(summary_line(session_id, summary))
    return summary


def _interrupted(line: str) -> NoReturn:
    typer.echo(line, err=True)
    raise typer.Exit(int(ExitCode.INTERRUPTED))


def _execute(request: Any, session_id: str, seed: int, loaded: Any, prefect: bool) -> dict[str, Any]:
    """Run the session directly, or as a Prefect flow against a server this process owns."""
    from dataclasses import asdict

    if not prefect:
        from orchestrator.session import execute_session

        return asdict(execute_session(request, session_id, seed, loaded=loaded))
    from orchestrator.prefect_server import prefect_api

    with prefect_api():
        from orchestrator.flows import session_flow

        adopt_prefect_logging()
        return session_flow(request, session_id=session_id, seed=seed)
