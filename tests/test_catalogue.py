"""The catalogue (`cloop models`, `cloop designs`, docs/protocols.md) says what the code ships."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from typer.testing import CliRunner

from orchestrator import catalogue
from orchestrator.cli import app

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocols.md"


def _doc_section() -> str:
    text = DOC.read_text(encoding="utf-8")
    _head, _mark, rest = text.partition(catalogue.BEGIN_MARK)
    section, _end, _tail = rest.partition(catalogue.END_MARK)
    return section.strip("\n") + "\n"


def test_protocols_doc_catalogue_is_generated_from_the_code() -> None:
    assert _doc_section() == catalogue.render_reference(), (
        "docs/protocols.md is out of date: run `python -m orchestrator.catalogue docs/protocols.md`")


def test_cloop_models_prints_the_documented_models_and_priors() -> None:
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert result.output == catalogue.render_models()
    assert result.output in _doc_section()
    for model_id in ("retention_power", "psychometric_weibull", "gaussian_process"):
        assert f"#### `{model_id}`" in result.output
    assert "| `lognormal` | `mu`, `sigma` |" in result.output


def test_cloop_designs_prints_strategies_and_installed_plugins() -> None:
    result = CliRunner().invoke(app, ["designs"])
    assert result.exit_code == 0, result.output
    strategies, _sep, plugins = result.output.partition("### Installed plug-ins")
    assert strategies.strip() in _doc_section()
    assert "#### `mutual_information` (aliases: `mi`, `ado`)" in strategies
    for group in catalogue.ENTRY_POINT_GROUPS:
        assert f"`{group}`" in plugins
    assert "`simulated` (rig_adapters.simulated:SimulatedAdapter)" in plugins


def test_every_builtin_model_input_and_parameter_has_a_meaning() -> None:
    from orchestrator.models import builtin_catalogue
    from orchestrator.models.builtin import BUILTIN_MODELS

    listed = {m.id: m for m in builtin_catalogue() if m.source == "builtin"}
    assert set(listed) == set(BUILTIN_MODELS)
    for model_id, info in listed.items():
        cls = BUILTIN_MODELS[model_id]
        assert [v.name for v in info.variables] == list(cls.variables), model_id
        assert [p.name for p in info.parameters] == list(cls.parameters), model_id
        blank = [i.name for i in info.variables + info.parameters if not i.meaning]
        assert not blank, f"{model_id}: no meaning for {blank}"
        assert f"#### `{model_id}`" in catalogue.render_models()


def test_priors_of_the_schema_match_the_prior_builder() -> None:
    from orchestrator.models.priors import PRIOR_FIELDS

    listed = {p.dist: p.arguments for p in catalogue.priors()}
    assert listed == dict(PRIOR_FIELDS)
    assert listed["fixed"] == ("value",)


def _settings_read_by(cls: type) -> set[str]:
    """String keys a strategy's own code reads from its settings (`s.get("k")`, `self.settings["k"]`)."""
    keys: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith(("orchestrator.design", "orchestrator.neural")):
            continue
        for node in ast.walk(ast.parse(inspect.cleandoc("\n" + inspect.getsource(klass)))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                receiver, key = node.func.value, (node.args[0] if node.args else None)
            elif isinstance(node, ast.Subscript):
                receiver, key = node.value, node.slice
            else:
                continue
            if ast.unparse(receiver) in ("s", "self.settings") and isinstance(key, ast.Constant) \
                    and isinstance(key.value, str):
                keys.add(key.value)
    return keys


def _documented_designs() -> dict[str, set[str]]:
    """Strategy name or alias -> the settings the catalogue documents for it."""
    from orchestrator.design import catalogue as design_catalogue

    found: dict[str, set[str]] = {}
    for entry in design_catalogue():
        for name in (entry.name, *entry.aliases):
            found[name] = {s.name for s in entry.settings}
    return found


def test_every_strategy_and_every_setting_the_code_reads_is_documented() -> None:
    from orchestrator.design import STRATEGIES
    from orchestrator.neural.designs import STRATEGIES as POPULATION

    documented = _documented_designs()
    assert set(STRATEGIES) == set(documented), "strategies without a catalogue entry (or entries without one)"
    classes = {name: target for name, target in STRATEGIES.items() if isinstance(target, type)}
    classes.update(POPULATION)
    for name, cls in classes.items():
        read = _settings_read_by(cls) | set(getattr(cls, "known_settings", ()))
        if cls.__name__ == "ParameterEstimationDesign":
            read.discard("mode")  # fixed to characterize by the class itself
        assert read <= documented[name], f"{name} reads undocumented settings {sorted(read - documented[name])}"
    from orchestrator.design import InformationDesign

    assert {"maxiter", "raw_samples", "mode"} <= _settings_read_by(InformationDesign)  # the scan sees them
    assert {"points", "stimuli", "values"} <= documented["sweep"]
    assert documented["population_synthesis"] >= {"starts", "steps", "lr", "margin", "pipeline"}
