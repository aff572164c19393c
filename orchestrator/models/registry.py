"""Which model ids a protocol may name: the builtin library plus third-party `cloop.models` entry points.

The builtin table is a plain mapping built from orchestrator.models.builtin (no registration side
effects at import); `builtin_catalogue()` gives each model's metadata for `cloop models`.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

from orchestrator.models.base import EncodingModel, ParameterInfo, VariableInfo
from orchestrator.models.builtin import BUILTIN_MODELS

ENTRY_POINT_GROUP = "cloop.models"
GP_MODEL_ID = "gaussian_process"

_EXTRA: dict[str, type[EncodingModel]] = {}


@dataclass(frozen=True)
class ModelInfo:
    """Catalogue entry of one model id."""

    id: str
    formula: str
    parameters: tuple[ParameterInfo, ...]
    variables: tuple[VariableInfo, ...]
    source: str  # "builtin" or "entry point <module:attr>"


def register_model(cls: type[EncodingModel]) -> type[EncodingModel]:
    """Add a model class under `cls.id` for this process (tests, notebooks); plug-ins should
    prefer a `cloop.models` entry point so every process sees them."""
    if (cls.id in BUILTIN_MODELS and BUILTIN_MODELS[cls.id] is not cls) or \
            (cls.id in _EXTRA and _EXTRA[cls.id] is not cls):
        raise ValueError(f"duplicate model id {cls.id!r}")
    _EXTRA[cls.id] = cls
    return cls


def _entry_point_models() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_models() -> list[str]:
    """Ids usable as `builtin:` in a protocol (builtins and installed plug-ins)."""
    return sorted(set(BUILTIN_MODELS) | set(_EXTRA) | set(_entry_point_models()) | {GP_MODEL_ID})


def get_model_class(model_id: str) -> type[EncodingModel]:
    """Resolve a model id: builtin first, then a `cloop.models` entry point. Raises ValueError."""
    if model_id in BUILTIN_MODELS:
        return BUILTIN_MODELS[model_id]
    if model_id in _EXTRA:
        return _EXTRA[model_id]
    eps = _entry_point_models()
    if model_id in eps:
        cls = eps[model_id].load()  # type: ignore[attr-defined]
        if not (isinstance(cls, type) and issubclass(cls, EncodingModel)):
            raise ValueError(f"entry point {ENTRY_POINT_GROUP}:{model_id} does not name an EncodingModel subclass")
        return cls
    raise ValueError(f"unknown model {model_id!r}; known: {', '.join(available_models())}")


def _info(cls: type[EncodingModel], source: str) -> ModelInfo:
    return ModelInfo(cls.id, cls.doc, cls.describe_parameters(), cls.describe_variables(), source)


def builtin_catalogue(include_entry_points: bool = True) -> list[ModelInfo]:
    """Metadata of every parametric model a protocol can name (the GP candidate is a design of its
    own, listed by `orchestrator.catalogue`). Entry points that fail to load are skipped."""
    out = [_info(cls, "builtin") for _, cls in sorted(BUILTIN_MODELS.items())]
    out += [_info(cls, "registered") for _, cls in sorted(_EXTRA.items())]
    if include_entry_points:
        for name, ep in sorted(_entry_point_models().items()):
            if name in BUILTIN_MODELS:
                continue
            try:
                cls = get_model_class(name)
            except Exception:  # noqa: BLE001 - a broken plug-in must not hide the others
                continue
            out.append(_info(cls, f"entry point {getattr(ep, 'value', name)}"))
    return out


__all__ = ["ENTRY_POINT_GROUP", "GP_MODEL_ID", "ModelInfo", "register_model", "available_models",
           "get_model_class", "builtin_catalogue"]
