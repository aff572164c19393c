"""What a population session needs around the engine loop: images beside the database, the
comparison of feature models, the weights check on resume, and the wire form of an image stimulus.
"""
from __future__ import annotations

import os
from typing import Any

from orchestrator.artifacts import ArtifactStore
from orchestrator.neural.comparison import PopulationComparison


class WeightsChanged(ValueError):
    """A resumed session's weights file is not the one the session started with."""


def open_population(protocol: Any, seed: int, store: Any, session_id: str,
                    artifacts_dir: str | None = None) -> tuple[PopulationComparison, ArtifactStore]:
    """The session's artifact store and model comparison; refuses weights that changed since trial 0."""
    artifacts = ArtifactStore.for_database(getattr(store, "url", None), artifacts_dir or os.environ.get("CLOOP_ARTIFACTS"))
    comparison = PopulationComparison.from_protocol(protocol, seed, images=artifacts.get)
    recorded: dict[str, Any] = {}
    for state in store.model_states(session_id):
        for name, summary in (state.get("summaries") or {}).items():
            if isinstance(summary, dict) and "weights_sha256" in summary:
                recorded.setdefault(name, summary["weights_sha256"])
    check_weights(protocol, comparison, recorded)
    return comparison, artifacts


def check_weights(protocol: Any, comparison: PopulationComparison, recorded: dict[str, str | None]) -> None:
    """Raise WeightsChanged naming models.i.weights when a file's sha256 differs from the recorded one."""
    for i, cand in enumerate(comparison.candidates):
        if cand.name in recorded and recorded[cand.name] != cand.features.weights_sha256:
            raise WeightsChanged(f"models.{i}.weights: {protocol.models[i].weights} has sha256 "
                                 f"{cand.features.weights_sha256}, the session started with {recorded[cand.name]}; "
                                 "restore that file or start a new session")


def keep_image(artifacts: ArtifactStore, decision: Any) -> None:
    """Store a proposed image before its trial is planned (write-ahead: a planned trial's pixels exist)."""
    pixels = getattr(decision, "pixels", None)
    if pixels is not None:
        sha = artifacts.put(pixels)
        assert sha == decision.stimulus["image"], "the design's image hash does not match its pixels"


def wire_stimulus(protocol: Any, artifacts: ArtifactStore, stimulus: dict[str, Any]) -> dict[str, Any]:
    """The stimulus as the rig receives it: the ref replaced by the pixels, checked against the limits."""
    pixels = artifacts.get(stimulus["image"])
    protocol.check_image(pixels)
    return artifacts.wire(stimulus)
