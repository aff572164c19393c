"""`cloop simulate`: the in-process loop and its command, via a fresh Typer app and the real cloop CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from orchestrator.cli_simulate import register
from orchestrator.protocol import parse_protocol_text
from orchestrator.simulate import SimulationConfig, simulate
from orchestrator.protocol_checks import parse_checked

PROTOCOL = """
name: retention
version: "1"
stimulus:
  parameters:
    lag: {kind: integer, low: 0, high: 100}
response: {kind: binomial, n: 10}
models:
  - name: power
    builtin: retention_power
    inputs: {t: lag}
    settings: {particles: 400}
    priors:
      a: {dist: beta, alpha: 2, beta: 1}
      b: {dist: beta, alpha: 1, beta: 4}
  - name: exponential
    formula: "a*exp(-b*lag)"
    settings: {particles: 400}
    priors:
      a: {dist: beta, alpha: 2, beta: 1}
      b: {dist: beta, alpha: 1, beta: 80}
design:
  strategy: mutual_information
  settings: {max_components: 64}
stopping:
  max_trials: 30
  model_probability: 0.99
"""


@pytest.fixture()
def protocol_file(tmp_path: Path) -> Path:
    path = tmp_path / "retention.yaml"
    path.write_text(PROTOCOL)
    return path


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    register(app)
    return app


def test_simulate_json_lines(protocol_file: Path) -> None:
    result = CliRunner().invoke(_app(), ["simulate", str(protocol_file), "--truth", "power:a=0.9025,b=0.4861",
                                         "--replicates", "2", "--seed", "3", "--max-trials", "6", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["replicate"] for r in rows} == {0, 1}
    for r in rows:
        assert {"replicate", "trial", "stimulus", "response", "model_probabilities", "decision_ms"} <= set(r)
        assert set(r["model_probabilities"]) == {"power", "exponential"}
        assert sum(r["model_probabilities"].values()) == pytest.approx(1.0)
        assert 0 <= r["stimulus"]["lag"] <= 100 and 0 <= r["response"] <= 10
        assert r["decision_ms"] >= 0
    rep0 = [r for r in rows if r["replicate"] == 0]
    assert [r["trial"] for r in rep0] == list(range(len(rep0)))
    # stops early once a model passes stopping.model_probability, else runs to --max-trials
    assert len(rep0) == 6 or max(rep0[-1]["model_probabilities"].values()) >= 0.99


def test_simulate_is_reproducible_and_design_override_applies(protocol_file: Path) -> None:
    p = parse_checked(PROTOCOL).protocol
    cfg = SimulationConfig(truth="exponential", seed=5, max_trials=5, design="sweep")
    a = [(r["stimulus"], r["response"], r["model_probabilities"]) for r in simulate(p, cfg)]
    b = [(r["stimulus"], r["response"], r["model_probabilities"]) for r in simulate(p, cfg)]
    assert a == b
    rows = list(simulate(p, cfg))
    assert all(r["strategy"] == "sweep" for r in rows)
    assert [r["stimulus"]["lag"] for r in rows] == [0, 11, 22, 33, 44]


@pytest.mark.parametrize("args, message", [
    (["--truth", "powr:a=1"], "unknown model 'powr'"),
    (["--truth", "power:z=1"], "no parameter(s) ['z']"),
    (["--truth", "power", "--design", "nope"], "unknown strategy 'nope'"),
])
def test_simulate_bad_input_exit_2(protocol_file: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(_app(), ["simulate", str(protocol_file), *args, "--json"])
    assert result.exit_code == 2
    assert message in result.output


def test_simulate_reports_protocol_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(PROTOCOL.replace('formula: "a*exp(-b*lag)"', 'formula: "a*exp(-b*lag) + os.system(1)"'))
    result = CliRunner().invoke(_app(), ["simulate", str(bad), "--truth", "power", "--json"])
    assert result.exit_code == 2
    assert "models.1.formula" in result.output


def test_cloop_console_script_has_simulate(protocol_file: Path) -> None:
    cli = Path(sys.executable).with_name("cloop")
    if not cli.exists():
        pytest.skip("cloop console script not installed in this environment")
    out = subprocess.run([str(cli), "simulate", str(protocol_file), "--truth", "power", "--max-trials", "2", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 2


def _blocking(monkeypatch: pytest.MonkeyPatch, until: int | None) -> None:
    """Give ModelComparison a declaration check that refuses while fewer than `until` trials are in."""
    from orchestrator.inference import ModelComparison

    def blocker(self: ModelComparison, name: str) -> str | None:
        if until is None:
            return "the held-out check fails"
        if self.n_observations < until:
            return f"the held-out check needs {until} trials"
        return None

    monkeypatch.setattr(ModelComparison, "declaration_blocker", blocker)


def test_a_blocked_leader_is_not_declared_and_the_session_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    p = parse_checked(PROTOCOL).protocol
    cfg = SimulationConfig(truth="exponential", seed=0, max_trials=15, design="sweep", stop_at=0.7)
    free = list(simulate(p, cfg))
    assert len(free) < 12 and free[-1]["p_truth"] >= 0.7  # declared on P alone
    _blocking(monkeypatch, until=len(free) + 3)
    held = list(simulate(p, cfg))
    assert held[: len(free)] == [{**r, "decision_ms": h["decision_ms"], "update_ms": h["update_ms"]}
                                 for r, h in zip(free, held)]  # the same session, only longer
    assert len(held) == len(free) + 3 and max(held[-1]["model_probabilities"].values()) >= 0.7


def test_a_leader_blocked_to_the_end_is_named_in_the_stop_reason(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from orchestrator.engine import run_session
    from orchestrator.models import build_truth
    from orchestrator.simulate import SimulatedRigPool
    from orchestrator.store import TrialStore, upgrade

    loaded = parse_checked(PROTOCOL.replace("model_probability: 0.99", "model_probability: 0.6"))
    _blocking(monkeypatch, until=None)
    url = f"sqlite:///{tmp_path}/s.db"
    upgrade(url)
    with TrialStore(url) as store, caplog.at_level("INFO", logger="cloop.engine"):
        session_id = store.create_session(protocol_id=store.add_protocol(loaded), subject_id=None, seed=0,
                                          design="sweep")
        truth = build_truth(loaded.protocol, "exponential")
        result = run_session(loaded, store=store, rigs=SimulatedRigPool(truth, 0), session_id=session_id, seed=0,
                             max_trials=10, design_override="sweep")
    assert result.trials_completed == 10 and result.status == "completed"
    assert result.stop_reason.startswith("reached max_trials=10; model 'exponential' reached P=")
    assert result.stop_reason.endswith("not declared: the held-out check fails")
    held = [r for r in caplog.messages if "not declared" in r]
    assert len(held) == 1 and "the session goes on" in held[0]  # logged once while the reason stays the same
