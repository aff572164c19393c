"""Small population protocols for the neural tests: tiny images, few units, networks built in code."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def population_protocol(tmp_path: Path, *, units: int = 8, noise: str = "poisson", size: int = 16,
                        strategy: str = "population_synthesis", models: list[dict[str, Any]] | None = None,
                        stimulus: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
                        safety: dict[str, Any] | None = None) -> Path:
    """Write a protocol (Gabor energy vs two seeded 4-channel CNNs) and return its path."""
    doc = {
        "name": "tiny_population", "version": "1",
        "stimulus": {"type": "image", "size": [size, size], "channels": 1, "pool_size": 48, **(stimulus or {})},
        "response": {"kind": "population", "units": units, "noise": noise, "window_s": 0.2},
        "models": models or [
            {"name": "gabor", "builtin": "gabor_energy",
             "settings": {"orientations": 4, "frequencies": [0.2], "grid": 2}},
            {"name": "cnn_a", "module": "orchestrator.neural.zoo:tiny_cnn",
             "settings": {"seed": 1, "width": 4, "grid": 2}},
            {"name": "cnn_b", "module": "orchestrator.neural.zoo:tiny_cnn",
             "settings": {"seed": 2, "width": 4, "grid": 2}},
        ],
        "design": {"strategy": strategy, "settings": settings if settings is not None else {"steps": 5, "starts": 2}},
        "stopping": {"max_trials": 30, "model_probability": 0.99, "min_trials": 3},
        "safety": safety if safety is not None else {"mean_luminance": {"min": 0.35, "max": 0.65},
                                                     "rms_contrast": {"max": 0.3}},
    }
    path = tmp_path / "population.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
