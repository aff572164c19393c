"""Protocol loading: one pass over every problem, hostile YAML, fixed parameters, response ranges, rigs.

Each test feeds the real loader (and, where it is the user's path, the real `cloop validate`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.protocol import InvalidResponse, ProtocolError, parse_protocol_text
from orchestrator.protocol_checks import parse_checked

ROOT = Path(__file__).resolve().parent.parent
RETENTION = (ROOT / "protocols" / "retention.yaml").read_text()
runner = CliRunner()

# Problems of every stage in one file: a YAML duplicate key, schema errors (an unknown field, an unknown
# prior distribution, a plain number as a prior), a model check (an unknown builtin in a model that is
# valid on its own), a stimulus-type check and the design name.
SEVERAL_PROBLEMS = """\
name: several
version: 1
stimulus:
  type: abstract_typo
  parameters:
    lag: {kind: integer, low: 0, high: 100, units: s}
response:
  kind: binomial
  n: 10
  n: 12
models:
  - name: power
    builtin: retention_power
    inputs: {t: lag}
    priors:
      a: {dist: beta, alpha: 2, beta: 1}
      b: {dist: betta, alpha: 1, beta: 4}
  - name: exponential
    builtin: retention_exponentiall
    inputs: {t: lag}
    priors:
      a: {dist: beta, alpha: 2, beta: 1}
      b: {dist: beta, alpha: 1, beta: 80}
  - name: third
    builtin: retention_power
    inputs: {t: lag}
    priors:
      a: 0.5
design:
  strategy: mutual_informatio
stopping:
  max_trials: 40
  model_probabilty: 0.99
"""


def test_validate_reports_every_stage_in_one_pass(tmp_path: Path) -> None:
    path = tmp_path / "several.yaml"
    path.write_text(SEVERAL_PROBLEMS)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    rows = result.output.splitlines()
    expected = {
        "response.n": "duplicate key",
        "models.0.priors.b": "unknown dist 'betta'",
        "models.2.priors": "write `a: {dist: fixed, value: 0.5}`",
        "stopping.model_probabilty": "unknown field",
        "models.1.builtin": "retention_exponentiall",
        "stimulus.type": "abstract_typo",
        "design.strategy": "unknown strategy 'mutual_informatio'",
    }
    for field, fragment in expected.items():
        assert any(f": {field}: " in row and fragment in row for row in rows), (field, result.output)
    assert all(row.startswith(f"{path}:") for row in rows), result.output
    numbers = [int(row.split(":")[1]) for row in rows]
    assert numbers == sorted(numbers), "problems are listed in file order"


def test_yaml_alias_bomb_is_refused_before_expansion() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    code = (
        "from orchestrator.protocol import ProtocolError, parse_protocol_text\n"
        f"text = {bomb!r}\n"
        "try:\n    parse_protocol_text(text, 'bomb.yaml')\nexcept ProtocolError as exc:\n    print(exc)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking (pytest) process.
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    message, max_rss_kib = done.stdout.strip().splitlines()
    assert "anchors (&name) and aliases (*name) are not allowed" in message and "bomb.yaml:1:" in message
    assert int(max_rss_kib) < 400_000, f"{int(max_rss_kib) // 1024} MiB to refuse a {len(bomb)}-byte file"


def test_fixed_parameter_prior_is_the_same_as_settings_fixed() -> None:
    text = RETENTION.replace("      b: {dist: beta, alpha: 1, beta: 80}", "      b: {dist: fixed, value: 0.02}")
    protocol = parse_checked(text).protocol
    exponential = protocol.model("exponential")
    assert "b" not in exponential.priors and exponential.settings["fixed"] == {"b": 0.02}
    from orchestrator.models import build_candidates

    candidate = {c.name: c for c in build_candidates(protocol)}["exponential"]
    assert candidate.fixed == {"b": 0.02}


def test_a_parameter_fixed_twice_is_refused() -> None:
    text = RETENTION.replace("      b: {dist: beta, alpha: 1, beta: 80}",
                             "      b: {dist: fixed, value: 0.02}\n    settings: {fixed: {b: 0.03}}")
    with pytest.raises(ProtocolError, match=r"fixed both as a prior and in settings.fixed"):
        parse_checked(text)


POISSON = RETENTION.replace("  kind: binomial\n  n: 10\n", "  kind: poisson\n").replace(
    "builtin: retention_power", "formula: \"exp(a - b * t)\"").replace(
    "builtin: retention_exponential", "formula: \"exp(a) / (1 + b * t)\"")


@pytest.mark.parametrize("value", [1e7, 2**64 - 1, 10**400, -1])
def test_implausible_counts_are_invalid(value: float) -> None:
    spec = parse_checked(POISSON).protocol.response
    with pytest.raises(InvalidResponse):
        spec.validate({"value": value})
    assert spec.validate({"value": 1e6}) == 1e6


def test_response_range_is_widened_in_the_protocol() -> None:
    spec = parse_checked(POISSON.replace("  kind: poisson\n", "  kind: poisson\n  high: 1.0e8\n")).protocol.response
    assert spec.validate({"value": 1e7}) == 1e7 and spec.plausible_range() == (0.0, 1e8)
    gaussian = POISSON.replace("  kind: poisson\n", "  kind: gaussian\n")
    with pytest.raises(ProtocolError):  # gaussian models need a noise prior; the range itself is fine
        parse_checked(gaussian)
    from orchestrator.protocol import ResponseSpec

    default = ResponseSpec(kind="gaussian")
    assert default.plausible_range() == (-1e9, 1e9)
    with pytest.raises(InvalidResponse, match="above the plausible high"):
        default.validate({"value": 5e9})
    assert ResponseSpec(kind="gaussian", low=-1e12, high=1e12).validate({"value": 5e9}) == 5e9


def test_fixed_values_obey_safety_and_safety_may_name_them() -> None:
    path = ROOT / "tests" / "bad_protocols" / "27_fixed_value_over_safety.yaml"
    ok = path.read_text().replace("amplitude: 900000  # <-- here", "amplitude: 50")
    assert parse_checked(ok).protocol.stimulus.fixed["amplitude"] == 50
    with pytest.raises(ProtocolError) as info:
        parse_checked(path.read_text())
    assert [p.path for p in info.value.problems] == ["stimulus.fixed.amplitude"]


def test_a_rig_parses_a_protocol_without_torch() -> None:
    code = (
        "import sys, json\n"
        "from orchestrator.protocol import parse_protocol_text\n"
        f"loaded = parse_protocol_text({RETENTION!r}, checks=())\n"
        "from orchestrator.protocol_checks import stimulus_checks\n"
        f"parse_protocol_text({RETENTION!r}, checks=stimulus_checks())\n"
        "print(json.dumps([loaded.protocol.name, sorted(m for m in ('torch', 'botorch') if m in sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["retention", []]


def test_a_rig_still_gets_schema_problems() -> None:
    with pytest.raises(ProtocolError, match="unknown field"):
        parse_protocol_text(RETENTION.replace("max_trials: 40", "max_trails: 40"), checks=())
