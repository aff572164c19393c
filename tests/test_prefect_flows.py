"""The Prefect flow's contract without a server: which failures are retried, run names, deploy errors.

The full path (server, work pool, process worker, rig) is tests/test_prefect_server.py.
"""

from __future__ import annotations

import subprocess

import pytest
from prefect.states import Failed
from sqlalchemy.exc import OperationalError

from orchestrator.flows import (
    LAB_FLOW_NAME,
    SESSION_FLOW_NAME,
    _retry_if_transient,
    is_transient,
    lab_session_flow,
    run_name,
    run_trials_task,
    session_flow,
)
from orchestrator.session import NoRigError
from orchestrator.transport import RigLost, TransportError
from orchestrator.protocol_checks import load_checked


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly")), True),
        (TransportError("server closed"), True),
        (RigLost("rig-1 silent for 0.9 s"), True),
        (NoRigError("no rig connected within 60 s"), False),  # the experimenter must start a rig first
        (ValueError("seed is required"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_only_transient_failures_resume_automatically(exc: BaseException, retry: bool) -> None:
    assert is_transient(exc) is retry
    assert _retry_if_transient(None, None, Failed(data=exc)) is retry


def test_task_boundaries_and_retry_policy() -> None:
    """Registering is never retried (it would create a second session); running trials is retried once."""
    from orchestrator.flows import migrate_database, register_session_task

    assert migrate_database.retries == 3
    assert register_session_task.retries == 0
    assert run_trials_task.retries == 1 and run_trials_task.retry_condition_fn is _retry_if_transient
    assert (session_flow.name, lab_session_flow.name) == (SESSION_FLOW_NAME, LAB_FLOW_NAME)


def test_run_names_carry_protocol_subject_session() -> None:
    assert run_name("retention", "mouse-17", "ab12") == "retention/mouse-17/ab12"
    assert run_name("retention", "mouse-17", None) == "retention/mouse-17/new"
    assert run_name("retention", "m", "ab12", resumed=True) == "retention/m/ab12 (resumed)"


def test_deployment_parameters_are_flat_and_json_friendly() -> None:
    props = lab_session_flow.parameters.properties
    assert set(props) == {"protocol", "subject", "db", "bind", "seed", "max_trials", "design", "keys_dir",
                          "insecure", "wait_for_rig_s", "resume"}
    for name, schema in props.items():  # `prefect deployment run -p NAME=VALUE` needs scalar types
        types = {s.get("type") for s in schema.get("anyOf", [schema])}
        assert types <= {"string", "integer", "number", "boolean", "null"}, (name, schema)


def test_deploy_without_a_prefect_server_is_one_clear_line(cloop_cmd: list[str], run_env: dict[str, str]) -> None:
    env = {k: v for k, v in run_env.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([*cloop_cmd, "deploy", "--name", "room-1", "--pool", "lab", "--insecure"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: PREFECT_API_URL is not set") and len(proc.stderr.strip().splitlines()) == 1
    bad = subprocess.run([*cloop_cmd, "deploy", "--name", "a/b", "--pool", "lab", "--insecure"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--name" in bad.stderr


def test_deploy_refuses_plaintext_rig_traffic_on_a_network(cloop_cmd: list[str], run_env: dict[str, str]) -> None:
    """Checked at deploy time, not when the first animal is already in the rig."""
    proc = subprocess.run([*cloop_cmd, "deploy", "--name", "room-1", "--pool", "lab", "--bind", "tcp://0.0.0.0:5555",
                           "--insecure"], env=run_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--insecure is refused" in proc.stderr
    nokeys = subprocess.run([*cloop_cmd, "deploy", "--name", "room-1", "--pool", "lab"], env=run_env,
                            capture_output=True, text=True, timeout=120)
    assert nokeys.returncode == 2 and "needs Curve keys" in nokeys.stderr


@pytest.mark.parametrize("status", ["completed", "stopped"])
def test_deployment_resume_refuses_a_finished_session(status: str, sqlite_url: str) -> None:
    """`-p resume=SESSION` on a closed record fails before anything is bound or written.

    (Called directly: running the flow's tasks here would start a temporary Prefect server.)
    """
    from orchestrator import REPO_ROOT
    from orchestrator.protocol import load_protocol
    from orchestrator.store import TrialStore, upgrade

    upgrade(sqlite_url)
    with TrialStore(sqlite_url) as store:
        sid = store.create_session(protocol_id=store.add_protocol(load_checked(REPO_ROOT / "protocols/retention.yaml")),
                                   subject_id=store.subject("m"), seed=1, bind="tcp://127.0.0.1:5555", status=status,
                                   meta={"request": {"protocol_path": "retention.yaml", "db_url": sqlite_url}})
    from orchestrator.flows import refuse_finished

    with pytest.raises(ValueError, match=f"session {sid} is already {status}"):
        refuse_finished(sqlite_url, sid[:8])  # what lab_session_flow(resume=...) checks before binding
    with TrialStore(sqlite_url) as store:
        assert store.session(sid)["status"] == status and store.trials(sid) == []
