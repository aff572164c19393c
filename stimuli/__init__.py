"""Stimulus types: parameter schemas (importable without PsychoPy) and PsychoPy drawing.

The orchestrator validates a protocol's ``stimulus`` block with :func:`check_protocol` (called by
``orchestrator.protocol`` for ``cloop validate``); rigs resolve trial values with
``get_stimulus_type(name).resolve(values, fixed)`` and draw with :mod:`stimuli.draw` (PsychoPy,
imported only there). Labs add types through the ``cloop.stimuli`` entry point group: each entry
point names a :class:`StimulusType` (set its ``drawer`` to "module:callable" for visual types).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from stimuli.library import BUILTIN_TYPES
from stimuli.schema import (
    UNIT_ALIASES,
    ParamSpec,
    StimulusParameterError,
    StimulusType,
    UnknownStimulusType,
    canonical_unit,
)

__all__ = [
    "ParamSpec",
    "StimulusType",
    "StimulusParameterError",
    "UnknownStimulusType",
    "UNIT_ALIASES",
    "canonical_unit",
    "get_stimulus_type",
    "stimulus_type_names",
    "check_protocol",
    "describe_types",
]

ENTRY_POINT_GROUP = "cloop.stimuli"
_plugins: dict[str, StimulusType] | None = None


def _plugin_types() -> dict[str, StimulusType]:
    """Stimulus types contributed by installed packages (loaded once; broken plugins are named)."""
    global _plugins
    if _plugins is None:
        found: dict[str, StimulusType] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            obj = ep.load()
            if not isinstance(obj, StimulusType):
                raise TypeError(f"entry point {ENTRY_POINT_GROUP}:{ep.name} is not a stimuli.StimulusType")
            if obj.name in BUILTIN_TYPES:
                raise ValueError(f"entry point {ENTRY_POINT_GROUP}:{ep.name} redefines built-in type {obj.name!r}")
            found[obj.name] = obj
        _plugins = found
    return _plugins


def _all_types() -> dict[str, StimulusType]:
    return {**BUILTIN_TYPES, **_plugin_types()}


def stimulus_type_names() -> list[str]:
    """Names of every known stimulus type (built-in first, then plugins)."""
    return list(_all_types())


def get_stimulus_type(name: str) -> StimulusType:
    """The schema of stimulus type ``name``; raises UnknownStimulusType listing the known ones."""
    types = _all_types()
    try:
        return types[name]
    except KeyError:
        raise UnknownStimulusType(name, list(types)) from None


def check_protocol(protocol: Any) -> list[tuple[str, str]]:
    """Problems with a protocol's ``stimulus`` block as (field path, message) pairs.

    Checks that ``stimulus.type`` exists, that every varied and fixed parameter belongs to it with
    the right kind, units and a range the type can draw, that required parameters are given, and
    that ``duration_s`` is only set for visual types. Called by ``orchestrator.protocol``.
    """
    stimulus = protocol.stimulus
    try:
        stype = get_stimulus_type(stimulus.type)
    except UnknownStimulusType as exc:
        return [("stimulus.type", str(exc))]
    problems = stype.check_space(stimulus.parameters, getattr(stimulus, "fixed", None) or {})
    duration = getattr(stimulus, "duration_s", None)
    if duration is not None and stype.modality == "stimulator":
        problems.append(("stimulus.duration_s", f"{stype.name} has no display duration (use its own parameters)"))
    return problems


def describe_types() -> str:
    """Markdown reference of every stimulus type's parameters."""
    return "\n".join(t.describe() for t in _all_types().values())
