"""A session's lifecycle from the command line: ``resume``, ``pause``, ``continue``, ``stop``, ``deploy``.

An animal in the rig cannot repeat a session, so these commands never guess: ``resume`` continues
from what the database holds (the engine replays completed trials and reconciles the one in flight
with the rig); ``pause``/``continue``/``stop`` only ask, through the session's status in the
database, and the orchestrator honours the request at the next trial boundary. SESSION is a full
id, a unique id prefix, or ``latest``. Anything the user can fix (unknown session, a session that
is already finished) is one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from orchestrator import store as st
from orchestrator.cli_common import ExitCode, db_option, run_and_report, setup_logging
from orchestrator.control import FINISHED_STATUSES


def _fail(message: str, code: ExitCode = ExitCode.BAD_INPUT) -> typer.Exit:
    """Print one `error: ...` line; return the Exit for the caller to raise (keeps `from None` chains)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(int(code))


def _open(db: Optional[str]) -> st.TrialStore:
    try:
        return st.TrialStore(st.resolve_url(db))
    except st.StoreError as exc:
        raise _fail(str(exc)) from None


# -- pause / continue / stop ----------------------------------------------------------------------


def _request(command: str, session: str, db: Optional[str], wait: float) -> None:
    from orchestrator import control

    store = _open(db)
    try:
        try:
            session_id = store.resolve_session(session)
            status = control.request(store, session_id, command)
        except (st.StoreError, ValueError) as exc:
            raise _fail(str(exc)) from None
        meaning = {
            "pause_requested": "pause requested; the orchestrator pauses at the next trial boundary",
            "continue_requested": "continue requested",
            "stop_requested": "stop requested; the orchestrator stops at the next trial boundary",
            "stopped": "stopped (no orchestrator was running it; any trial left in flight is marked abandoned)",
        }[status]
        typer.echo(f"session {session_id}: {meaning}")
        if wait > 0 and status != "stopped":
            try:
                final = control.wait_for(store, session_id, control.HONOURED[command], wait)
            except TimeoutError as exc:
                raise _fail(str(exc), ExitCode.RUN_FAILED) from None
            typer.echo(f"session {session_id}: {final}")
    finally:
        store.close()


SessionArg = typer.Argument(..., help="Session id, unique id prefix, or 'latest'.")
DbOpt = db_option()
WaitOpt = typer.Option(0.0, "--wait", min=0, help="Seconds to wait until the orchestrator has honoured it (0: don't).")


def cmd_pause(session: str = SessionArg, db: Optional[str] = DbOpt, wait: float = WaitOpt) -> None:
    """Pause a running session at the next trial boundary (the trial in flight finishes and is recorded)."""
    _request("pause", session, db, wait)


def cmd_continue(session: str = SessionArg, db: Optional[str] = DbOpt, wait: float = WaitOpt) -> None:
    """Continue a paused session."""
    _request("continue", session, db, wait)


def cmd_stop(session: str = SessionArg, db: Optional[str] = DbOpt, wait: float = WaitOpt) -> None:
    """Stop a session at the next trial boundary; its status becomes 'stopped' and it cannot be resumed."""
    _request("stop", session, db, wait)


# -- resume ---------------------------------------------------------------------------------------


def cmd_resume(
    session: str = SessionArg,
    db: Optional[str] = DbOpt,
    bind: Optional[str] = typer.Option(
        None, "--bind", help="Endpoint for the rigs (default: the session's own address, where its rigs reconnect)."),
    keys: Optional[str] = typer.Option(None, "--keys", help="CurveZMQ key directory (default: as the session ran)."),
    insecure: Optional[bool] = typer.Option(None, "--insecure/--secure", help="Override the stored security mode."),
    wait_for_rig: Optional[float] = typer.Option(None, "--wait-for-rig", min=0.1, help="Seconds to wait for rigs."),
    prefect: bool = typer.Option(True, "--prefect/--no-prefect", help="Run as a Prefect flow (default) or directly."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every step (HTTP, Prefect, rig network)."),
) -> None:
    """Continue a session after the orchestrator died (crash, SIGKILL, power loss) or was interrupted.

    Rebuilds every model from the trials in the database, reconciles a trial that was in flight
    with the rig (the rig answers from its result cache if it presented it), and carries on with the
    same seed, so the stimuli chosen are those an uninterrupted session would have chosen.
    """
    setup_logging(verbose)
    url = st.resolve_url(db)
    store = _open(db)
    try:
        try:
            row = store.session(session)
        except st.StoreError as exc:
            raise _fail(str(exc)) from None
        if row.status in FINISHED_STATUSES:
            raise _fail(f"session {row.id} is already {row.status}; nothing to resume")
        holder = store.live_holder(row.id)
        if holder is not None:
            raise _fail(f"session {row.id} is being run by another orchestrator ({holder}); "
                        f"stop it first (`cloop stop {row.id[:8]}`)")
        open_trials = store.open_trials(row.id)
        # Nothing is written here: only once the rig address is bound (proof that no orchestrator of this
        # session runs on this machine) does the session drop a pause from before the crash; a stop
        # request is kept, and the engine honours it after reconciling the trial in flight.
    finally:
        store.close()
    from orchestrator.protocol import parse_protocol_text  # heavy imports only once the session is known
    from orchestrator.session import request_for_resume

    try:
        request, session_id, seed = request_for_resume(
            url, row.id, bind=bind, keys_dir=keys, insecure=insecure, wait_for_rig_s=wait_for_rig)
    except (st.StoreError, TypeError, ValueError) as exc:
        raise _fail(f"cannot rebuild session {row.id}'s request: {exc}") from None
    if keys is not None and insecure is None:  # new keys replace a stored --insecure, and vice versa
        request = dataclasses.replace(request, insecure=False)
    elif insecure and keys is None:
        request = dataclasses.replace(request, keys_dir=None)
    loaded = parse_protocol_text(row.protocol_text, source=request.protocol_path, checks=())  # checked when registered
    from orchestrator.preflight import OptionError, check_endpoint, check_keys

    try:  # the address itself is taken only by the session (a busy one means its orchestrator still runs)
        check_endpoint(request.bind, flag="--bind" if bind is not None else "stored --bind")
        check_keys(request.keys_dir, flag="--keys" if keys is not None else "stored --keys")
    except OptionError as exc:
        raise _fail(str(exc)) from None
    typer.echo(session_id)
    typer.echo(
        f"resuming session {session_id} ({row.protocol}, subject {row.subject}, seed {seed}): "
        f"{row.counts['completed']} completed trial(s) to replay, {len(open_trials)} in flight to "
        f"reconcile, rigs reconnect to {request.bind}", err=True)
    run_and_report(request, loaded, session_id, seed, prefect=prefect)


# -- deploy ---------------------------------------------------------------------------------------


def cmd_deploy(
    name: str = typer.Option(..., "--name", help="Deployment name, e.g. the rig room or protocol ('retention-room2')."),
    pool: str = typer.Option(..., "--pool", help="Prefect work pool (a process pool is created if missing)."),
    protocol: str = typer.Option("protocols/retention.yaml", "--protocol",
                                 help="Protocol file, relative to --source or absolute on the worker."),
    db: Optional[str] = typer.Option(None, "--db", help="Database URL baked into the deployment "
                                     "(default: none; the worker's $CLOOP_DB is used, keeping passwords out of Prefect)."),
    bind: str = typer.Option("tcp://127.0.0.1:5555", "--bind", help="Endpoint the rigs connect to, on the worker."),
    subject: str = typer.Option("anonymous", "--subject", help="Default subject (override per run)."),
    keys: Optional[str] = typer.Option(None, "--keys", help="CurveZMQ key directory on the worker."),
    insecure: bool = typer.Option(False, "--insecure", help="No Curve (loopback binds only)."),
    max_trials: Optional[int] = typer.Option(None, "--max-trials", min=1),
    wait_for_rig: Optional[float] = typer.Option(None, "--wait-for-rig", min=0.1),
    source: Optional[str] = typer.Option(None, "--source", help="Code location the worker runs from: a directory "
                                         "on the worker or a git URL (default: this checkout)."),
) -> None:
    """Register a Prefect deployment of cloop sessions on a work pool (needs PREFECT_API_URL).

    Then start workers with `prefect worker start --pool POOL` and sessions with
    `prefect deployment run cloop-lab-session/NAME -p subject=...` (or from the Prefect UI).
    """
    from orchestrator import deploy
    from orchestrator.keys import SecurityError, require_security

    try:  # refuse now what the worker would refuse at the first session
        require_security(bind, Path(keys) if keys else None, insecure, role="deployment's rig socket")
    except SecurityError as exc:
        raise _fail(str(exc)) from None
    parameters = {"protocol": protocol, "subject": subject, "db": db, "bind": bind, "keys_dir": keys,
                  "insecure": insecure, "max_trials": max_trials, "wait_for_rig_s": wait_for_rig}
    try:
        deployment_id = deploy.deploy(name=name, pool=pool, parameters=parameters, source=source)
    except deploy.DeployError as exc:
        raise _fail(str(exc)) from None
    full = f"{deploy.flow_name()}/{name}"
    typer.echo(f"deployment {full} ({deployment_id}) on work pool {pool!r}")
    typer.echo(f"  start a worker:  prefect worker start --pool {pool}")
    typer.echo(f"  run a session:   prefect deployment run {full} -p subject=SUBJECT")
    typer.echo(f"  resume one:      prefect deployment run {full} -p resume=SESSION")


def register(app: typer.Typer) -> None:
    """Add resume/pause/continue/stop/deploy to the `cloop` app."""
    app.command("resume")(cmd_resume)
    app.command("pause")(cmd_pause)
    app.command("continue")(cmd_continue)
    app.command("stop")(cmd_stop)
    app.command("deploy")(cmd_deploy)
