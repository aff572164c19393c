"""The encoding-model interface and the registry of model ids (builtins + third-party entry points).

An encoding model maps stimulus variables and parameters to the mean of the response
(a probability for bernoulli/binomial, a rate for poisson, a mean for gaussian). Everything is
elementwise torch so that one call evaluates N particles x S stimuli by broadcasting.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from typing import ClassVar, Mapping

import torch

ENTRY_POINT_GROUP = "cloop.models"


class EncodingModel(ABC):
    """A parametric encoding model. Subclasses set `id`, `parameters`, `variables`, `doc`."""

    id: ClassVar[str]
    parameters: ClassVar[tuple[str, ...]]
    variables: ClassVar[tuple[str, ...]]
    doc: ClassVar[str] = ""

    @abstractmethod
    def mean(self, x: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Response mean; inputs broadcast against each other (e.g. theta (N,1) x stimuli (S,))."""


_REGISTRY: dict[str, type[EncodingModel]] = {}


def register_model(cls: type[EncodingModel]) -> type[EncodingModel]:
    """Class decorator adding a builtin model to the registry under `cls.id`."""
    if cls.id in _REGISTRY and _REGISTRY[cls.id] is not cls:
        raise ValueError(f"duplicate model id {cls.id!r}")
    _REGISTRY[cls.id] = cls
    return cls


def _entry_point_models() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_models() -> list[str]:
    """Ids usable as `builtin:` in a protocol (builtins and installed plug-ins)."""
    from orchestrator.models import builtin as _b  # noqa: F401  (registers builtins)

    return sorted(set(_REGISTRY) | set(_entry_point_models()) | {"gaussian_process"})


def get_model_class(model_id: str) -> type[EncodingModel]:
    """Resolve a model id: builtin first, then a `cloop.models` entry point. Raises ValueError."""
    from orchestrator.models import builtin as _b  # noqa: F401

    if model_id in _REGISTRY:
        return _REGISTRY[model_id]
    eps = _entry_point_models()
    if model_id in eps:
        cls = eps[model_id].load()  # type: ignore[attr-defined]
        if not (isinstance(cls, type) and issubclass(cls, EncodingModel)):
            raise ValueError(f"entry point {ENTRY_POINT_GROUP}:{model_id} does not name an EncodingModel subclass")
        return cls
    raise ValueError(f"unknown model {model_id!r}; known: {', '.join(available_models())}")
