"""Sessions as Prefect flows, so a lab that outgrows one machine runs them on a Prefect server.

Task boundaries follow what can safely be retried:

- ``migrate-database`` is idempotent, so it is retried on a flaky connection.
- ``register-session`` is not retried: a retry could register a second session.
- ``run-trials`` is retried once, but only after a *transient* failure (the database connection
  dropped, the rig network failed mid-session). That is safe because the engine writes ahead: a retry
  is a resume, it replays the completed trials and re-dispatches the in-flight one under the same
  trial id, which a rig that already presented it answers from its cache. Bad input, no rig, and
  Ctrl-C are never retried.

Run names carry protocol, subject and session id (``retention/mouse-17/3f2c...``), so the Prefect UI
reads like the lab notebook. A deployment run does not know its session id when it starts; it is
renamed as soon as the session is registered.

Two flows:
- ``session_flow(request, session_id=None, seed=None)``: what ``cloop run``/``cloop resume`` call.
- ``lab_session_flow(protocol, subject, ...)``: flat, JSON-friendly parameters for a deployment
  (``cloop deploy``), so ``prefect deployment run cloop-lab-session/NAME -p subject=m17`` works;
  ``resume=SESSION`` continues a session instead of starting one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; no telemetry
# The temporary local server can take well over its default 20 s to start on a loaded 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from orchestrator.engine import TrialReport  # noqa: E402
from orchestrator.protocol import load_protocol  # noqa: E402
from orchestrator.protocol_checks import orchestrator_checks  # noqa: E402
from orchestrator.session import (  # noqa: E402
    SessionRequest,
    execute_session,
    register_session,
    request_for_resume,
)
from orchestrator.store import resolve_url, upgrade  # noqa: E402

log = logging.getLogger("cloop.flows")

SESSION_FLOW_NAME = "cloop-session"
LAB_FLOW_NAME = "cloop-lab-session"


def is_transient(exc: BaseException | None) -> bool:
    """A failure worth one automatic resume: a dropped DB connection or a rig-network failure."""
    if exc is None:
        return False
    from sqlalchemy.exc import OperationalError

    from orchestrator.transport import TransportError

    return isinstance(exc, (OperationalError, TransportError))


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        exc = state.result(raise_on_failure=False)
    except BaseException as error:  # noqa: BLE001 - the state may re-raise its own exception
        exc = error
    retry = is_transient(exc if isinstance(exc, BaseException) else None)
    log.warning("run-trials failed (%s: %s); %s", type(exc).__name__, exc,
                "resuming the session (safe: the database is written ahead)" if retry else "not retrying")
    return retry


@task(name="migrate-database", retries=3, retry_delay_seconds=2)
def migrate_database(db_url: str) -> None:
    """Bring the schema to head (idempotent, so safe to retry on a flaky database connection)."""
    upgrade(db_url)


@task(name="register-session")
def register_session_task(request: SessionRequest) -> tuple[str, int]:
    """Create the session row; not retried, a retry could register a second session."""
    return register_session(request, load_protocol(request.protocol_path, checks=orchestrator_checks()))


@task(name="run-trials", retries=1, retry_delay_seconds=3, retry_condition_fn=_retry_if_transient)
def run_trials_task(request: SessionRequest, session_id: str, seed: int) -> dict[str, Any]:
    """Wait for rigs and run the closed loop; a retry resumes the session where the database says."""
    logger = get_run_logger()

    def on_trial(report: TrialReport) -> None:
        best = max(report.probabilities.items(), key=lambda kv: kv[1]) if report.probabilities else ("-", 0.0)
        logger.info(
            "trial %d %s stimulus=%s response=%s leader=%s P=%.3f decision=%.1f ms",
            report.index, report.status, report.stimulus, report.response_text, best[0], best[1],
            report.decision.compute_ms,
        )

    result = execute_session(request, session_id, seed, on_waiting=logger.info, on_trial=on_trial)
    return asdict(result)


def run_name(protocol: str, subject: str, session_id: str | None, resumed: bool = False) -> str:
    """`protocol/subject/session-id` (`.../new` until the session is registered)."""
    name = f"{protocol}/{subject}/{session_id or 'new'}"
    return name + " (resumed)" if resumed else name


def session_run_name(db_url: str, session_id: str, resumed: bool | None = None) -> str:
    """Run name of a registered session from the database; "(resumed)" if it already has trials."""
    from orchestrator.store import TrialStore

    with TrialStore(db_url) as store:
        row = store.session(session_id)
    if resumed is None:
        resumed = row.n_trials > 0
    return run_name(row.protocol, row.subject or "anonymous", row.id, resumed=resumed)


def refuse_finished(db_url: str, session: str) -> None:
    """A finished session is a closed record: resuming it would append trials to it."""
    from orchestrator.control import FINISHED_STATUSES
    from orchestrator.store import TrialStore

    with TrialStore(db_url) as store:
        row = store.session(session)
    if row.status in FINISHED_STATUSES:
        raise ValueError(f"session {row.id} is already {row.status}; nothing to resume")


def _protocol_name(path: str) -> str:
    try:
        return load_protocol(path, checks=()).protocol.name
    except Exception:  # noqa: BLE001 - a name is only cosmetic; the flow reports the real error
        return os.path.splitext(os.path.basename(str(path)))[0] or "protocol"


def _request_field(request: Any, field: str, default: str) -> str:
    if isinstance(request, dict):
        return str(request.get(field) or default)
    return str(getattr(request, field, None) or default)


def _session_flow_run_name() -> str:
    params = flow_run.parameters or {}
    request = params.get("request") or {}
    if params.get("session_id"):
        try:
            return session_run_name(_request_field(request, "db_url", ""), str(params["session_id"]))
        except Exception:  # noqa: BLE001 - fall back to the request's fields
            pass
    return run_name(_protocol_name(_request_field(request, "protocol_path", "protocol")),
                    _request_field(request, "subject", "anonymous"), params.get("session_id"))


def _lab_flow_run_name() -> str:
    params = flow_run.parameters or {}
    if params.get("resume"):
        return run_name("session", "resume", str(params["resume"]), resumed=True)
    return run_name(_protocol_name(str(params.get("protocol", "protocol"))),
                    str(params.get("subject") or "anonymous"), None)


def rename_current_run(name: str) -> None:
    """Give the running flow run a better name once the session id is known (best effort)."""
    run_id = flow_run.get_id()
    if not run_id:
        return
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=name)
    except Exception as exc:  # noqa: BLE001 - a cosmetic rename must never end a session
        log.warning("could not rename flow run %s to %r: %s", run_id, name, exc)


@flow(name=SESSION_FLOW_NAME, flow_run_name=_session_flow_run_name, log_prints=True)
def session_flow(request: SessionRequest, session_id: str | None = None, seed: int | None = None) -> dict[str, Any]:
    """One experiment session. With no session id (a Prefect deployment run) it registers one first."""
    migrate_database(request.db_url)
    if session_id is None:
        session_id, seed = register_session_task(request)
        rename_current_run(run_name(_protocol_name(request.protocol_path), request.subject, session_id))
    elif seed is None:
        raise ValueError("seed is required when session_id is given")
    return run_trials_task(request, session_id, seed)


@flow(name=LAB_FLOW_NAME, flow_run_name=_lab_flow_run_name, log_prints=True)
def lab_session_flow(
    protocol: str = "protocols/retention.yaml",
    subject: str = "anonymous",
    db: str | None = None,
    bind: str | None = None,
    seed: int | None = None,
    max_trials: int | None = None,
    design: str | None = None,
    keys_dir: str | None = None,
    insecure: bool = False,
    wait_for_rig_s: float | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """A session started from a deployment (flat parameters); `resume=SESSION` continues one instead.

    `protocol` is relative to the deployment's working directory (the source checkout) or absolute;
    `db` defaults to $CLOOP_DB on the worker, so database credentials need not live in Prefect.
    `bind` defaults to tcp://127.0.0.1:5555 for a new session and to the session's own address on resume.
    """
    db_url = resolve_url(db)
    if resume:
        migrate_database(db_url)
        refuse_finished(db_url, resume)
        request, session_id, stored_seed = request_for_resume(
            db_url, resume, bind=bind, keys_dir=keys_dir, insecure=insecure or None, wait_for_rig_s=wait_for_rig_s,
        )
        rename_current_run(session_run_name(db_url, session_id, resumed=True))
        return run_trials_task(request, session_id, stored_seed)
    request = SessionRequest(
        protocol_path=os.path.abspath(protocol), db_url=db_url, bind=bind or "tcp://127.0.0.1:5555", subject=subject, seed=seed,
        max_trials=max_trials, design=design, keys_dir=keys_dir, insecure=insecure, wait_for_rig_s=wait_for_rig_s,
    )
    return session_flow.fn(request)
