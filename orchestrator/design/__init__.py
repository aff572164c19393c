"""Design strategies: which stimulus to present next (random, sweep, staircase, mutual information...).

`make_design(protocol, seed, override)` returns a strategy whose `propose(comparison, trial_index)`
gives a `Decision` whose stimulus has already passed `protocol.check_safe`.
"""
from __future__ import annotations

from typing import Any, Callable

from orchestrator.design.base import BaseStrategy, Decision, DesignStrategy
from orchestrator.design.baselines import RandomDesign, StaircaseDesign, SweepDesign
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
}


def _population(name: str) -> Callable[..., Any]:
    """Population designs (orchestrator.neural.designs) are imported only when a protocol uses them."""
    def build(protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> Any:
        from orchestrator.neural.designs import STRATEGIES as POPULATION

        return POPULATION[name](protocol, seed, settings)
    return build


STRATEGIES.update({name: _population(name) for name in (
    "population_synthesis", "population_pool", "population_random_pool", "population_random_noise")})


def make_design(protocol: Any, seed: int, override: str | None = None) -> BaseStrategy:
    """The protocol's design strategy (or `override`, e.g. from `--design`), seeded with `seed`.

    Settings under `design.settings` apply only when the strategy is the protocol's own.
    """
    name = override or protocol.design.strategy
    if name not in STRATEGIES:
        raise ValueError(f"design.strategy: unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    settings = dict(protocol.design.settings or {}) if name == protocol.design.strategy else {}
    return STRATEGIES[name](protocol, seed, settings)


def check_protocol(protocol: Any) -> list[tuple[str, str]]:
    """Hook used by orchestrator.protocol: design problems as (field path, message)."""
    name = protocol.design.strategy
    if name not in STRATEGIES:
        return [("design.strategy", f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")]
    try:
        STRATEGIES[name](protocol, 0, dict(protocol.design.settings or {}))
    except Exception as exc:  # noqa: BLE001 - report any construction problem against the field
        msg = str(exc)
        path = "design.settings"
        if msg.startswith("design."):
            path, _, msg = msg.partition(": ")
        return [(path, msg)]
    return []


__all__ = ["Decision", "DesignStrategy", "BaseStrategy", "make_design", "check_protocol", "STRATEGIES",
           "RandomDesign", "SweepDesign", "StaircaseDesign", "InformationDesign", "ParameterEstimationDesign"]
