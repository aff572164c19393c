"""Formula models: restricted grammar, clear errors with the field path, never Python evaluation."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.models import FormulaError, build_candidates, check_protocol, compile_formula
from orchestrator.protocol import ProtocolError, parse_protocol_text
from orchestrator.protocol_checks import parse_checked

ALLOWED = {"a": "parameter", "b": "parameter", "theta": "variable", "pref": "parameter", "k": "parameter"}

def _balanced(leaf: str, levels: int) -> str:
    """A wide but shallow expression (many terms, small depth, under the length limit)."""
    t = leaf
    for _ in range(levels):
        t = f"({t})+({t})"
    return t


PROTOCOL = """
name: f
version: "1"
stimulus:
  parameters:
    lag: {kind: integer, low: 0, high: 100}
response: {kind: binomial, n: 10}
models:
  - name: power
    builtin: retention_power
    inputs: {t: lag}
    priors:
      a: {dist: beta, alpha: 2, beta: 1}
      b: {dist: beta, alpha: 1, beta: 4}
  - name: custom
    formula: "FORMULA"
    priors:
      a: {dist: beta, alpha: 2, beta: 1}
      b: {dist: beta, alpha: 1, beta: 80}
"""


def _protocol(formula: str):
    return parse_checked(PROTOCOL.replace("FORMULA", formula))


def test_formula_matches_builtin_values() -> None:
    f = compile_formula("a*exp(-b*t)", {"a": "parameter", "b": "parameter", "t": "variable"})
    env = {"a": torch.tensor([0.9, 0.5], dtype=torch.float64).unsqueeze(-1),
           "b": torch.tensor([0.1, 0.02], dtype=torch.float64).unsqueeze(-1),
           "t": torch.tensor([0.0, 10.0, 50.0], dtype=torch.float64)}
    out = f(env)
    assert out.shape == (2, 3)
    assert out[0, 1].item() == pytest.approx(0.9 * math.exp(-1.0))
    assert out[1, 2].item() == pytest.approx(0.5 * math.exp(-1.0))


def test_tuning_formula_with_constants_and_functions() -> None:
    f = compile_formula("b + a*exp(k*(cos(2*(theta-pref)*pi/180)-1))", ALLOWED)
    v = f({n: torch.tensor(x, dtype=torch.float64) for n, x in
           {"a": 10.0, "b": 1.0, "k": 2.0, "pref": 45.0, "theta": 45.0}.items()})
    assert v.item() == pytest.approx(11.0)


@pytest.mark.parametrize("text, fragment", [
    ("__import__('os').system('echo hacked')", "only plain function calls"),
    ("__import__('os')", "unknown function '__import__'"),
    ("__builtins__", "may not start with '_'"),
    ("eval('1')", "unknown function 'eval'"),
    ("a.__class__", "Attribute is not allowed"),
    ("(lambda: 1)()", "only plain function calls"),
    ("a[0]", "Subscript is not allowed"),
    ("a if b else k", "IfExp is not allowed"),
    ("a < b", "Compare is not allowed"),
    ("'text' * 2", "only numeric constants"),
    ("exp(a, b)", "exp() takes 1 argument"),
    ("exp(x=a)", "keyword arguments"),
    ("a // b", "FloorDiv is not allowed"),
    ("open('/etc/passwd')", "unknown function 'open'"),
    ("a +", "syntax error"),
    ("foo * a", "unknown name(s) 'foo'"),
    ("_secret + a", "may not start with '_'"),
    ("exp", "used without a call"),
    ("a" * 2001, "longer than 2000"),
    ("a" + "+a" * 100, "nested deeper"),
    ("exp(" * 80 + "a" + ")" * 80, "nested deeper"),
    (_balanced("a*b*k*a*b*k*a*b", 6), "more than 500 terms"),
])
def test_rejected_formulas(text: str, fragment: str) -> None:
    with pytest.raises(FormulaError) as err:
        compile_formula(text, ALLOWED, "models.1.formula")
    assert str(err.value).startswith("models.1.formula: ")
    assert fragment in str(err.value)


def test_protocol_reports_formula_error_with_line_and_path() -> None:
    with pytest.raises(ProtocolError) as err:
        _protocol("a*exp(-b*lag) + evil(lag)")
    text = str(err.value)
    assert "models.1.formula" in text and "unknown function 'evil'" in text
    assert any(p.line is not None and p.path == "models.1.formula" for p in err.value.problems)


def test_protocol_reports_unknown_name_and_unused_prior() -> None:
    with pytest.raises(ProtocolError) as err:
        _protocol("a*exp(-c*lag)")
    assert "unknown name(s) 'c'" in str(err.value)
    with pytest.raises(ProtocolError) as err:
        _protocol("a*exp(-0.1*lag)")
    assert "models.1.priors.b" in str(err.value) and "not a parameter" in str(err.value)


def test_formula_candidate_uses_stimulus_parameter_directly() -> None:
    loaded = _protocol("a*exp(-b*lag)")
    cands = build_candidates(loaded.protocol)
    X = torch.tensor([[0.0], [10.0]], dtype=torch.float64)
    out = cands[1].mean(X, {"a": torch.tensor([0.8], dtype=torch.float64), "b": torch.tensor([0.1], dtype=torch.float64)})
    assert out.shape == (1, 2)
    assert out[0, 1].item() == pytest.approx(0.8 * math.exp(-1.0))
    assert check_protocol(loaded.protocol) == []


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab()+-*/., _ekxpsoin0123'\"[]:=<>lambd", max_size=40))
def test_arbitrary_text_either_compiles_or_raises_formula_error(text: str) -> None:
    try:
        f = compile_formula(text, ALLOWED)
    except FormulaError:
        return
    # whatever compiled only uses whitelisted names and evaluates to a tensor
    env = {n: torch.tensor(0.5, dtype=torch.float64) for n in ALLOWED}
    assert f.names <= set(ALLOWED)
    assert isinstance(f(env), torch.Tensor)
