"""Sessions as Prefect flows, so a lab that outgrows one machine runs them on a Prefect server.

Task boundaries follow what can safely be retried: migrating the database is idempotent (retried);
registering a session and running trials are not (a retry would start a second session or present
stimuli twice), so they run once and leave a truthful status in the database instead. Run names carry
protocol, subject and session id, so the Prefect UI reads like the lab notebook.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here; no telemetry

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from orchestrator.engine import TrialReport  # noqa: E402
from orchestrator.protocol import load_protocol  # noqa: E402
from orchestrator.session import SessionRequest, execute_session, register_session  # noqa: E402
from orchestrator.store import upgrade  # noqa: E402


@task(name="migrate-database", retries=3, retry_delay_seconds=2)
def migrate_database(db_url: str) -> None:
    """Bring the schema to head (idempotent, so safe to retry on a flaky database connection)."""
    upgrade(db_url)


@task(name="register-session")
def register_session_task(request: SessionRequest) -> tuple[str, int]:
    """Create the session row; not retried, a retry could register a second session."""
    return register_session(request, load_protocol(request.protocol_path))


@task(name="run-trials")
def run_trials_task(request: SessionRequest, session_id: str, seed: int) -> dict[str, Any]:
    """Wait for rigs and run the closed loop; the database is written ahead, so nothing is lost on failure."""
    logger = get_run_logger()

    def on_trial(report: TrialReport) -> None:
        best = max(report.probabilities.items(), key=lambda kv: kv[1]) if report.probabilities else ("-", 0.0)
        logger.info(
            "trial %d %s stimulus=%s response=%s leader=%s P=%.3f decision=%.1f ms",
            report.index, report.status, report.stimulus, report.response, best[0], best[1],
            report.decision.compute_ms,
        )

    result = execute_session(request, session_id, seed, on_waiting=logger.info, on_trial=on_trial)
    return asdict(result)


def _run_name() -> str:
    params = flow_run.parameters or {}
    request = params.get("request")
    protocol = getattr(request, "protocol_path", None) or (request or {}).get("protocol_path", "protocol")
    subject = getattr(request, "subject", None) or (request or {}).get("subject", "subject")
    name = os.path.splitext(os.path.basename(str(protocol)))[0]
    return f"{name}/{subject}/{params.get('session_id') or 'new'}"


@flow(name="cloop-session", flow_run_name=_run_name)
def session_flow(request: SessionRequest, session_id: str | None = None, seed: int | None = None) -> dict[str, Any]:
    """One experiment session. With no session id (a Prefect deployment run) it registers one first."""
    migrate_database(request.db_url)
    if session_id is None:
        session_id, seed = register_session_task(request)
    elif seed is None:
        raise ValueError("seed is required when session_id is given")
    return run_trials_task(request, session_id, seed)
