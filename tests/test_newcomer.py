"""The newcomer path: every mistake in `cloop run` / `cloop demo` options is one line, exit 2, no session row.

The options are checked before the session is registered (orchestrator.preflight); the database must
not even be created, so nothing a user has to clean up is left behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq
from typer.testing import CliRunner

from conftest import free_port
from orchestrator.cli import app
from orchestrator.keys import generate
from orchestrator.protocol_checks import load_checked

ROOT = Path(__file__).resolve().parent.parent
RETENTION = str(ROOT / "protocols" / "retention.yaml")
runner = CliRunner()


def _refused(tmp_path: Path, args: list[str], flag: str, fragment: str) -> None:
    db = tmp_path / "never.db"
    result = runner.invoke(app, [*args, "--db", f"sqlite:///{db}"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}: "), result.output
    assert fragment in lines[0], lines[0]
    assert not db.exists(), "a refused option must not create the database, let alone a session row"


def test_bind_port_in_use(tmp_path: Path) -> None:
    port = free_port()
    holder = zmq.Context.instance().socket(zmq.ROUTER)
    holder.bind(f"tcp://127.0.0.1:{port}")
    try:
        _refused(tmp_path, ["run", RETENTION, "--bind", f"tcp://127.0.0.1:{port}", "--no-prefect"],
                 "--bind", "Address already in use")
    finally:
        holder.close(0)


@pytest.mark.parametrize("bind, fragment", [
    ("tcp://127.0.0.1", "is not tcp://HOST:PORT"),
    ("tcp://127.0.0.1:99999", "outside 0..65535"),
    ("tcp://127.0.0.1:port", "is not tcp://HOST:PORT"),
])
def test_malformed_bind(tmp_path: Path, bind: str, fragment: str) -> None:
    _refused(tmp_path, ["run", RETENTION, "--bind", bind, "--no-prefect"], "--bind", fragment)


def test_unknown_design(tmp_path: Path) -> None:
    _refused(tmp_path, ["run", RETENTION, "--design", "nosuch", "--no-prefect"], "--design", "unknown strategy 'nosuch'")


def test_keys_directory_without_the_orchestrators_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    (keys / "rigs").mkdir(parents=True)
    _refused(tmp_path, ["run", RETENTION, "--keys", str(keys), "--no-prefect"], "--keys", "orchestrator.key_secret")


def test_malformed_key_text(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate(keys, "orchestrator")
    (keys / "rigs").mkdir()
    secret = keys / "orchestrator.key_secret"
    text = secret.read_text()
    start = text.index('secret-key = "') + len('secret-key = "')
    secret.write_text(text[:start] + "not-a-key" + text[text.index('"', start):])
    _refused(tmp_path, ["run", RETENTION, "--keys", str(keys), "--no-prefect"], "--keys", "not a valid Curve key")


def test_subject_name_too_long(tmp_path: Path) -> None:
    _refused(tmp_path, ["run", RETENTION, "--subject", "m" * 201, "--no-prefect"], "--subject", "at most 200")


def test_demo_truth_with_an_unknown_model(tmp_path: Path) -> None:
    _refused(tmp_path, ["demo", "--truth", "powr:a=0.9", "--no-prefect"], "--truth", "powr")


def test_demo_conclusion_line_compares_truth_and_conclusion() -> None:
    from orchestrator.cli import DEMO_WRONG_FRACTION, conclusion_line

    reached = {"stop_reason": "model 'power' reached P=0.9951 >= 0.99", "probabilities": {"power": 0.9951,
                                                                                          "exponential": 0.0049}}
    assert conclusion_line("power:a=0.9,b=0.5", reached).endswith("the conclusion is right")
    wrong = conclusion_line("exponential:a=0.8,b=0.02", reached)
    assert "wrong" in wrong and f"{100 * DEMO_WRONG_FRACTION:.1f}%" in wrong
    assert 0 < DEMO_WRONG_FRACTION < 0.05
    undecided = {"stop_reason": "reached max_trials=40", "probabilities": {"power": 0.7, "exponential": 0.3}}
    assert "no model reached the threshold" in conclusion_line("power", undecided)


def test_demo_seed_is_a_subject_the_rule_gets_right() -> None:
    """The demo's own seed, through the same closed loop the demo runs: the truth is what it concludes."""
    from orchestrator.cli import DEMO_SEED, DEMO_TRUTH
    from orchestrator.protocol import load_protocol
    from orchestrator.simulate import SimulationConfig, simulate

    last = list(simulate(load_checked(RETENTION), SimulationConfig(truth=DEMO_TRUTH, seed=DEMO_SEED)))[-1]
    assert last["leader"] == DEMO_TRUTH.split(":")[0] and last["p_truth"] >= 0.99


def test_good_options_pass_the_checks(tmp_path: Path) -> None:
    """The checks refuse only what the session would refuse: a real key set and a free port pass."""
    from orchestrator.preflight import check_bind, check_keys, check_subject

    keys = tmp_path / "keys"
    generate(keys, "orchestrator")
    generate(keys / "rigs", "rig-1")
    (keys / "rigs" / "rig-1.key_secret").unlink()
    check_keys(keys)
    port = free_port()
    check_bind(f"tcp://127.0.0.1:{port}")
    check_bind(f"tcp://127.0.0.1:{port}")  # the probe let the address go again
    check_bind("tcp://127.0.0.1:*")
    check_subject("m" * 200)


def test_resume_with_a_malformed_bind_changes_nothing(tmp_path: Path) -> None:
    from orchestrator.protocol import load_protocol
    from orchestrator.session import SessionRequest, register_session
    from orchestrator.store import TrialStore

    db = f"sqlite:///{tmp_path / 'lab.db'}"
    request = SessionRequest(protocol_path=RETENTION, db_url=db, bind="tcp://127.0.0.1:5555", insecure=True)
    session_id, _ = register_session(request, load_checked(RETENTION))
    result = runner.invoke(app, ["resume", session_id, "--db", db, "--bind", "tcp://127.0.0.1", "--no-prefect"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --bind: "), result.output
    with TrialStore(db) as store:
        assert store.session(session_id)["status"] == "created"



@pytest.mark.parametrize("design, kind", [("mutual_information", "population"), ("staircase", "population"),
                                          ("population_pool", "scalar")])
@pytest.mark.parametrize("command", ["run", "simulate"])
def test_a_design_of_the_other_protocol_kind(tmp_path: Path, design: str, kind: str, command: str) -> None:
    from orchestrator.design import POPULATION_STRATEGIES
    from test_neural_helpers import population_protocol

    protocol = str(population_protocol(tmp_path)) if kind == "population" else RETENTION
    other = "scalar" if kind == "population" else "population"
    fragment = f"{design!r} is a {other} design and this is a {kind} protocol; designs that fit: "
    if command == "run":
        _refused(tmp_path, ["run", protocol, "--design", design, "--no-prefect"], "--design", fragment)
        return
    result = runner.invoke(app, ["simulate", protocol, "--design", design,
                                 "--truth", "cnn_a" if kind == "population" else "power"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --design: "), result.output
    assert fragment in lines[0]
    fitting = lines[0].split("designs that fit: ")[1].split(", ")
    assert len(fitting) >= 4 and design not in fitting
    assert all((name in POPULATION_STRATEGIES) == (kind == "population") for name in fitting)


def test_log_lines_follow_stderr_after_the_stream_they_started_on_is_closed(capsys) -> None:
    import io
    import sys
    import logging

    from orchestrator.cli_common import setup_logging

    original, swapped = sys.stderr, io.StringIO()
    sys.stderr = swapped
    try:
        setup_logging(False)
    finally:
        sys.stderr = original
        swapped.close()
    logging.getLogger("cloop.newcomer").warning("written after the swap")
    err = capsys.readouterr().err
    assert "written after the swap" in err and "Logging error" not in err
