"""Protocol schema: every bad file in the corpus is rejected with its own message, field path and line."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.protocol import (
    InvalidResponse,
    ProtocolError,
    SafetyViolation,
    load_protocol,
    parse_protocol_text,
)
from orchestrator.protocol_checks import parse_checked, load_checked

ROOT = Path(__file__).resolve().parent.parent
BAD = sorted((ROOT / "tests" / "bad_protocols").glob("*.yaml"))
GOOD = sorted((ROOT / "protocols").glob("*.yaml"))
runner = CliRunner()


def _expectation(path: Path) -> tuple[str, str, int | None]:
    """Each corpus file says what it expects: `# expect: field.path: message`, and marks its line."""
    lines = path.read_text().splitlines()
    match = re.match(r"# expect: (\S+): (.+)$", lines[0])
    assert match, f"{path.name} lacks an '# expect:' header"
    marked = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith("# <-- here")]
    return match.group(1), match.group(2), (marked[0] if marked else None)


def test_corpus_is_large_enough() -> None:
    assert len(BAD) >= 15


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_protocol_is_rejected_with_path_line_and_message(path: Path) -> None:
    field, message, line = _expectation(path)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    output = result.stderr if hasattr(result, "stderr") else result.output
    matching = [
        row for row in output.splitlines() if row.startswith(f"{path}:") and f": {field}: " in row and message in row
    ]
    assert matching, f"expected '{field}: ...{message}...' in:\n{output}"
    if line is not None:
        assert matching[0].startswith(f"{path}:{line}: "), f"expected line {line}: {matching[0]}"


@pytest.mark.parametrize("path", GOOD, ids=[p.stem for p in GOOD])
def test_shipped_protocols_validate(path: Path) -> None:
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_bad_protocol_run_writes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    result = runner.invoke(app, ["run", str(BAD[0]), "--db", f"sqlite:///{db}", "--no-prefect"])
    assert result.exit_code == 2
    assert not db.exists()


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    text = (ROOT / "protocols" / "retention.yaml").read_text()
    text = text.replace("kind: binomial", "kind: binomal").replace("max_trials: 40", "max_trails: 40")
    with pytest.raises(ProtocolError) as info:
        parse_checked(text, "x.yaml")
    paths = {p.path for p in info.value.problems}
    assert {"response.kind", "stopping.max_trails"} <= paths


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cannot read file" in result.output


def _retention():
    return load_checked(ROOT / "protocols" / "retention.yaml").protocol


def test_check_safe_rejects_out_of_limits_and_wrong_types() -> None:
    protocol = _retention()
    protocol.check_safe({"lag": 5})
    for stimulus, fragment in [
        ({"lag": 101}, "outside the safety limits"),
        ({"lag": -1}, "outside the safety limits"),
        ({"lag": 2.5}, "must be an integer"),
        ({"lag": math.nan}, "not a finite number"),
        ({"lag": "3"}, "not a finite number"),
        ({}, "missing ['lag']"),
        ({"lag": 1, "volume": 3}, "unexpected ['volume']"),
    ]:
        with pytest.raises(SafetyViolation, match=re.escape(fragment)):
            protocol.check_safe(stimulus)


def test_safety_limits_narrow_the_parameter_range() -> None:
    text = (ROOT / "protocols" / "retention.yaml").read_text().replace(
        "lag: {min: 0, max: 100}", "lag: {min: 2, max: 50}"
    )
    protocol = parse_checked(text).protocol
    assert protocol.safety_limits() == {"lag": (2.0, 50.0)}
    with pytest.raises(SafetyViolation):
        protocol.check_safe({"lag": 60})


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"value": math.nan}, "not finite"),
        ({"value": math.inf}, "not finite"),
        ({"value": "7"}, "must be a number"),
        ({"value": 11}, "0..10"),
        ({"value": -1}, "0..10"),
        ({"value": 2.5}, "whole number"),
        ({"nothing": 1}, "'value'"),
        (7, "mapping"),
    ],
)
def test_invalid_responses(payload: object, fragment: str) -> None:
    with pytest.raises(InvalidResponse, match=re.escape(fragment)):
        _retention().response.validate(payload)


def test_valid_response_and_prior_probabilities() -> None:
    protocol = _retention()
    assert protocol.response.validate({"value": 7, "rt_s": 1.2}) == 7.0
    assert protocol.model_prior_probabilities() == {"power": 0.5, "exponential": 0.5}
