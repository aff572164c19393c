"""Design strategies: which stimulus to present next (random, sweep, staircase, mutual information...).

`make_design(protocol, seed, override)` returns a strategy whose `propose(comparison, trial_index)`
gives a `Decision` whose stimulus has already passed `protocol.check_safe`.
"""
from __future__ import annotations

from typing import Any, Callable

from orchestrator.design.base import BaseStrategy, Decision, DesignStrategy
from orchestrator.design.baselines import RandomDesign, StaircaseDesign, SweepDesign
from orchestrator.design.grid import ExactGridDesign, exact_grid_applies
from orchestrator.design.limits import size_problems
from orchestrator.design.information import InformationDesign, ParameterEstimationDesign

STRATEGIES: dict[str, Callable[..., BaseStrategy]] = {
    "random": RandomDesign,
    "sweep": SweepDesign,
    "fixed": SweepDesign,
    "staircase": StaircaseDesign,
    "mutual_information": InformationDesign,
    "mi": InformationDesign,
    "ado": InformationDesign,
    "discriminate": lambda p, s, st=None: InformationDesign(p, s, st, mode="discriminate"),
    "parameter_estimation": ParameterEstimationDesign,
    "exact_grid": ExactGridDesign,
}
#: information designs that run as exact grid ADO when `exact_grid_applies` (settings.exact: false opts out)
EXACT_WHEN_SMALL = {"mutual_information": "auto", "mi": "auto", "ado": "auto", "discriminate": "discriminate",
                    "parameter_estimation": "characterize"}


def _population(name: str) -> Callable[..., Any]:
    """Population designs (orchestrator.neural.designs) are imported only when a protocol uses them."""
    def build(protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> Any:
        from orchestrator.neural.designs import STRATEGIES as POPULATION

        return POPULATION[name](protocol, seed, settings)
    return build


#: the designs an image protocol with a population response can use
POPULATION_STRATEGIES = ("population_synthesis", "population_pool", "population_random_pool", "population_random_noise")
STRATEGIES.update({name: _population(name) for name in POPULATION_STRATEGIES})


def fitting_strategies(protocol: Any) -> list[str]:
    """The design strategies that can run `protocol`: population designs for image protocols, the others for scalar ones."""
    population = bool(getattr(protocol, "is_population", False))
    return sorted(name for name in STRATEGIES if (name in POPULATION_STRATEGIES) == population)


def kind_mismatch(protocol: Any, name: str) -> str | None:
    """Why strategy `name` is of the other protocol kind (scalar vs population), or None when it fits."""
    population = bool(getattr(protocol, "is_population", False))
    if name not in STRATEGIES or (name in POPULATION_STRATEGIES) == population:
        return None
    design_kind, protocol_kind = ("scalar", "a population") if population else ("population", "a scalar")
    return (f"{name!r} is a {design_kind} design and this is {protocol_kind} protocol; "
            f"designs that fit: {', '.join(fitting_strategies(protocol))}")


def make_design(protocol: Any, seed: int, override: str | None = None) -> BaseStrategy:
    """The protocol's design strategy (or `override`, e.g. from `--design`), seeded with `seed`.

    Settings under `design.settings` apply only when the strategy is the protocol's own.
    The information designs (mutual_information, mi, ado, discriminate, parameter_estimation) run
    as exact grid ADO when `exact_grid_applies(protocol)`: every model has <= 3 parameters, one
    stimulus per decision, and the outcome tables fit (orchestrator.models.grid states the bound);
    `design.settings.exact: false` keeps the particle path.
    """
    name = override or protocol.design.strategy
    if name not in STRATEGIES:
        raise ValueError(f"design.strategy: unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    settings = dict(protocol.design.settings or {}) if name == protocol.design.strategy else {}
    if name in EXACT_WHEN_SMALL and settings.get("exact", True) and exact_grid_applies(protocol):
        return ExactGridDesign(protocol, seed, settings, mode=settings.get("mode", EXACT_WHEN_SMALL[name]))
    return STRATEGIES[name](protocol, seed, settings)


def catalogue() -> list[Any]:
    """Every design strategy with its settings (orchestrator.design.info.DesignInfo records)."""
    from orchestrator.design.info import catalogue as _catalogue

    return _catalogue()


def check_protocol(protocol: Any) -> list[tuple[str, str]]:
    """Design problems as (field path, message): unknown strategy, sizes beyond the limits of
    orchestrator.design.limits (checked from the numbers, never by enumerating), bad settings."""
    name = protocol.design.strategy
    if name not in STRATEGIES:
        return [("design.strategy", f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")]
    population = getattr(protocol, "is_population", False)
    if population != (name in POPULATION_STRATEGIES):
        return []  # a scalar design on an image protocol (or the reverse) is reported by the protocol's own check
    # Image protocols have no stimulus parameters to count: their designs check their own sizes.
    problems = [] if population else size_problems(protocol)
    if problems:
        return problems
    try:
        make_design(protocol, 0)
    except Exception as exc:  # noqa: BLE001 - report any construction problem against the field
        msg = str(exc)
        path = "design.settings"
        if msg.startswith(("design.", "stimulus.")):
            path, _, msg = msg.partition(": ")
        return [(path, msg)]
    return []


__all__ = ["Decision", "DesignStrategy", "BaseStrategy", "make_design", "check_protocol", "catalogue", "STRATEGIES",
           "POPULATION_STRATEGIES", "fitting_strategies", "kind_mismatch",
           "RandomDesign", "SweepDesign", "StaircaseDesign", "InformationDesign", "ParameterEstimationDesign",
           "ExactGridDesign"]
