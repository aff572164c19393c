"""Population responses to images, with deep-network encoding models as the competing hypotheses.

Feature models (orchestrator.neural.features) -> per-unit Bayesian readouts (readout) -> P(model)
(comparison); designs choose or synthesize images that split the models' predictions (acquisition,
synthesis, designs); simulated populations answer like a rig (truth).
"""
from __future__ import annotations

from typing import Any


def check_protocol(protocol: Any) -> list[tuple[str, str]]:
    """Hook used by orchestrator.protocol: pool and feature-model problems as (field path, message)."""
    from orchestrator.neural.features import FeatureSpecError
    from orchestrator.neural.pool import PoolError, load_pool

    try:
        pool = load_pool(protocol)
    except PoolError as exc:
        return [("stimulus.pool", str(exc))]
    from orchestrator.neural.comparison import PopulationComparison

    try:
        PopulationComparison.from_protocol(protocol, 0, pool=pool[:64])
    except FeatureSpecError as exc:
        return exc.problems
    return []
