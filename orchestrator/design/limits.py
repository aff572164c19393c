"""What the design strategies can run: size limits checked from the protocol's numbers alone.

`size_problems(protocol)` never enumerates a stimulus space or builds a strategy, so a hostile
protocol (a 6-D sweep, a batch of a million, a categorical with a million choices) is refused in
microseconds with the limit in the message. The strategies raise the same messages when built
directly (e.g. from `--design`), so `cloop simulate` cannot hang on what `cloop validate` refuses.
"""
from __future__ import annotations

import math
from typing import Any

#: stimuli proposed per decision (design.batch_size)
MAX_BATCH = 256
#: points of a sweep (settings.points ** dimensions, or the length of settings.stimuli / values)
MAX_SWEEP_POINTS = 100_000
#: choices of one categorical stimulus parameter
MAX_CHOICES = 10_000
#: stimulus parameters
MAX_DIMENSIONS = 16


def _settings(protocol: Any) -> dict[str, Any]:
    return dict(getattr(protocol.design, "settings", None) or {})


def _levels(spec: Any) -> int | None:
    """Number of values of a discrete parameter (None for continuous)."""
    kind = getattr(spec, "kind", "continuous")
    if kind == "categorical":
        return len(spec.choices)
    if kind == "integer":
        return max(int(math.floor(spec.high)) - int(math.ceil(spec.low)) + 1, 0)
    return None


def sweep_points(protocol: Any) -> int:
    """Points a default sweep (settings.points per dimension) would visit, computed, not built."""
    s = _settings(protocol)
    for key in ("stimuli", "values"):
        if key in s and isinstance(s[key], (list, tuple)):
            return len(s[key])
    k = int(s.get("points", 10))
    total = 1
    for spec in protocol.stimulus.parameters.values():
        n = _levels(spec)
        total *= k if n is None else min(k, n)
    return total


def size_problems(protocol: Any, strategy: str | None = None) -> list[tuple[str, str]]:
    """(field, message) for every size the design cannot run."""
    out: list[tuple[str, str]] = []
    params = getattr(protocol.stimulus, "parameters", None) or {}  # an image space has none: its own checks apply
    if len(params) > MAX_DIMENSIONS:
        out.append(("stimulus.parameters", f"{len(params)} parameters; the designs take at most {MAX_DIMENSIONS}"))
    for name, spec in params.items():
        if getattr(spec, "kind", None) == "categorical" and len(spec.choices) > MAX_CHOICES:
            out.append((f"stimulus.parameters.{name}.choices",
                        f"{len(spec.choices)} choices; the designs take at most {MAX_CHOICES}"))
    batch = int(getattr(protocol.design, "batch_size", 1) or 1)
    if batch > MAX_BATCH:
        out.append(("design.batch_size", f"{batch} stimuli per decision; the limit is {MAX_BATCH}"))
    name = strategy or protocol.design.strategy
    if name in ("sweep", "fixed") and not out:
        n = sweep_points(protocol)
        if n > MAX_SWEEP_POINTS:
            field = "design.settings.points" if "points" in _settings(protocol) or not any(
                k in _settings(protocol) for k in ("stimuli", "values")) else "design.settings"
            out.append((field, f"a sweep of {n} points over {len(params)} parameters; the limit is "
                               f"{MAX_SWEEP_POINTS} (lower settings.points or list settings.stimuli)"))
    return out


def raise_if_too_large(protocol: Any, strategy: str) -> None:
    """The strategies' own guard: the first size problem as a ValueError 'field: message'."""
    problems = size_problems(protocol, strategy)
    if problems:
        field, msg = problems[0]
        raise ValueError(f"{field}: {msg}")


__all__ = ["MAX_BATCH", "MAX_SWEEP_POINTS", "MAX_CHOICES", "MAX_DIMENSIONS", "size_problems", "sweep_points",
           "raise_if_too_large"]
