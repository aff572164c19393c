"""What the population benchmarks share: the candidate networks and the protocol they are run under.

Gabor energy vs two seeded small CNNs (and a near-miss CNN, its weights mixed 0.95 with fresh ones)
on 32 x 32 grey images, a 1,000-image pool and the safety limits of protocols/v1_population.yaml.
"""
from __future__ import annotations

import json
from typing import Any

import yaml

GABOR = {"name": "gabor", "builtin": "gabor_energy", "settings": {"orientations": 8, "frequencies": [0.1, 0.2], "grid": 4}}
CNN_A = {"name": "cnn_a", "module": "orchestrator.neural.zoo:tiny_cnn", "settings": {"seed": 1, "width": 16, "grid": 4}}
CNN_B = {"name": "cnn_b", "module": "orchestrator.neural.zoo:tiny_cnn", "settings": {"seed": 2, "width": 16, "grid": 4}}
NEAR = {"name": "cnn_a_near", "module": "orchestrator.neural.zoo:mixed_cnn",
        "settings": {"seed": 1, "mix_seed": 7, "mix": 0.95, "width": 16, "grid": 4}}
SYNTH: dict[str, Any] = {}  # the product default: 3 best-pool starts + 1 random, 30 Adam steps


def protocol_for(models: list[dict], units: int, size: int = 32, noise: str = "poisson",
                 strategy: str = "population_synthesis", readout: dict[str, Any] | None = None) -> Any:
    """A population protocol over `models` (each given `readout` if set) with N = `units`."""
    from orchestrator.protocol import parse_protocol_text

    if readout:
        models = [dict(m, readout=json.loads(json.dumps(readout))) for m in models]
    doc = {"name": "bench", "version": "1",
           "stimulus": {"type": "image", "size": [size, size], "pool_size": 1000},
           "response": {"kind": "population", "units": units, "noise": noise, "window_s": 0.5},
           "models": models, "design": {"strategy": strategy, "settings": SYNTH},
           "stopping": {"model_probability": 0.99, "min_trials": 3},  # the sessions' own loops stop at .99
           "safety": {"mean_luminance": {"min": 0.4, "max": 0.6}, "rms_contrast": {"max": 0.35}}}
    return parse_protocol_text(yaml.safe_dump(doc)).protocol
