"""The simulated population `cloop simulate` answers image trials with, in the simulator's rig pool.

`cloop simulate` runs the engine loop (orchestrator.engine.run_session) for every protocol; for an
image protocol with a population response the subject is a seeded population drawn from one model's
features (orchestrator.neural.truth). It answers the wire form of an image, as the simulated rig
worker does, and trial i with numpy.random.default_rng([seed + r, i]) in replicate r.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.neural.comparison import PopulationComparison
from orchestrator.neural.truth import build_population_truth
from orchestrator.wire_images import image_array


class SimulatedPopulation:
    """A population truth that answers a wire stimulus ``{"image": payload}`` (the pixels, hash-checked)."""

    def __init__(self, protocol: Any, spec: str) -> None:
        models = PopulationComparison.from_protocol(protocol, 0)  # the truth's features (seed-free)
        self.truth = build_population_truth(protocol, spec, models)  # ValueError naming a bad spec
        self.model_name = self.truth.model_name

    def sample(self, stimulus: dict[str, Any], rng: np.random.Generator) -> list[float]:
        """One population response (N numbers) to the image the rig received."""
        pixels = image_array(stimulus["image"], "stimulus.image")
        return self.truth.sample(stimulus, rng, pixels=pixels)
