"""The orchestrator's semantic checks of a protocol, passed to orchestrator.protocol's loaders.

The schema (orchestrator.protocol) knows nothing of model formulas, stimulus types or what a design
can compute; those checks live with their modules and import torch. The orchestrator passes them
in explicitly (this list is the default of `parse_protocol_text`); a rig passes none, so parsing a
protocol on a rig PC imports neither torch nor BoTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from orchestrator.protocol import LoadedProtocol, load_protocol, parse_protocol_text

Checker = Callable[[Any], list[tuple[str, str]]]  # the shape orchestrator.protocol.Checker names
__all__ = ["load_checked", "orchestrator_checks", "parse_checked", "stimulus_checks"]


def load_checked(path: str | Path) -> LoadedProtocol:
    """Load a protocol file with every orchestrator check (what `cloop validate` and `cloop run` see)."""
    return load_protocol(path, checks=orchestrator_checks())


def parse_checked(text: str, source: str = "<string>") -> LoadedProtocol:
    """Parse protocol text with every orchestrator check."""
    return parse_protocol_text(text, source=source, checks=orchestrator_checks())


def _needs(check: Any, *fields: str) -> Checker:
    """Tag a check with the top-level protocol fields it reads (it runs only when they are valid)."""
    def run(protocol: Any) -> list[tuple[str, str]]:
        return list(check(protocol))

    run.NEEDS = frozenset(fields)  # type: ignore[attr-defined]
    run.__name__ = getattr(check, "__module__", "check")
    return run


def _is_population(protocol: Any) -> bool:
    """Image stimuli and a population response: feature models are checked instead of formulas."""
    return getattr(getattr(protocol, "response", None), "kind", None) == "population"


def _scalar_only(check: Any) -> Checker:
    def run(protocol: Any) -> list[tuple[str, str]]:
        return [] if _is_population(protocol) else list(check(protocol))

    run.__module__ = getattr(check, "__module__", __name__)
    return run


def _population_only(protocol: Any) -> list[tuple[str, str]]:
    """Pools and torch feature models (they load weights and run the networks on a few images)."""
    if not _is_population(protocol):
        return []
    from orchestrator import neural

    return neural.check_protocol(protocol)


def stimulus_checks() -> list[Checker]:
    """Stimulus-type checks only (no torch): what a rig may run on a protocol it is given."""
    import stimuli

    return [_needs(_scalar_only(stimuli.check_protocol), "stimulus")]


def orchestrator_checks() -> list[Checker]:
    """Every semantic check, cheapest first: stimulus types, model definitions, design capabilities."""
    from orchestrator import design, models

    checks = stimulus_checks()
    checks.append(_needs(_design_name, "design"))
    checks.append(_needs(_scalar_only(models.check_protocol), "stimulus", "response", "models"))
    checks.append(_needs(_population_only, "stimulus", "response", "models", "safety"))
    checks.append(_needs(_design_check(design.check_protocol), "stimulus", "response", "models", "design",
                         "stopping", "safety"))
    return checks


def _design_name(protocol: Any) -> list[tuple[str, str]]:
    """An unknown strategy name, reported even when the rest of the file has problems."""
    from orchestrator.design import STRATEGIES

    name = protocol.design.strategy
    if name in STRATEGIES:
        return []
    return [("design.strategy", f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")]


def _design_check(check: Any) -> Any:
    """The design's own check; a design that cannot even be built is reported against design.settings."""
    def run(protocol: Any) -> list[tuple[str, str]]:
        if _design_name(protocol):
            return []  # reported by _design_name
        try:
            return list(check(protocol))
        except Exception as exc:  # noqa: BLE001 - a check must report, never crash validate
            return [("design.settings", f"{type(exc).__name__}: {exc}")]

    return run
