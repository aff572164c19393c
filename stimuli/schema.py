"""Parameter schemas of stimulus types: names, kinds, units, physical ranges, defaults.

Pure Python on purpose: the orchestrator validates protocols (``cloop validate``) on machines
without PsychoPy, so nothing here may import it. Drawing lives in :mod:`stimuli.draw`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

__all__ = [
    "ParamSpec",
    "StimulusType",
    "StimulusParameterError",
    "UnknownStimulusType",
    "UNIT_ALIASES",
    "canonical_unit",
]

Kind = Literal["continuous", "integer", "categorical", "boolean"]

#: Accepted spellings of each canonical unit. Units follow PsychoPy: spatial quantities in degrees
#: of visual angle (converted to pixels with the rig's monitor profile), colours as fractions.
UNIT_ALIASES: dict[str, tuple[str, ...]] = {
    "deg": ("deg", "degree", "degrees"),
    "cycles/deg": ("cycles/deg", "cpd", "c/deg", "cyc/deg", "cycles_per_deg"),
    "cycles": ("cycles", "cycle"),
    "fraction": ("fraction", "frac"),
    "Hz": ("Hz", "hz"),
    "deg/s": ("deg/s", "deg_per_s"),
    "s": ("s", "sec", "seconds"),
    "ms": ("ms",),
    "us": ("us", "µs", "microseconds"),
    "uA": ("uA", "µA", "microamps"),
    "pix": ("pix", "px", "pixels"),
    "frames": ("frames", "frame"),
    "count": ("count", "n"),
    "": ("",),
}
_ALIAS_TO_CANONICAL = {alias: unit for unit, aliases in UNIT_ALIASES.items() for alias in aliases}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def canonical_unit(text: str) -> str | None:
    """The canonical spelling of a unit, or None if cloop does not know it."""
    return _ALIAS_TO_CANONICAL.get(text.strip())


class UnknownStimulusType(KeyError):
    """A protocol or trial named a stimulus type that `stimuli` does not define."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown stimulus type {self.name!r} (known: {', '.join(self.known)})"


class StimulusParameterError(ValueError):
    """A stimulus value that the stimulus type cannot draw; ``parameter`` names it."""

    def __init__(self, stimulus_type: str, parameter: str, message: str) -> None:
        super().__init__(f"{stimulus_type}.{parameter}: {message}")
        self.stimulus_type = stimulus_type
        self.parameter = parameter
        self.reason = message


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a stimulus type.

    ``low``/``high`` are the physically meaningful range (inclusive unless ``*_open``), not a
    safety limit: safety limits live in the protocol and, for stimulators, in the rig config.
    ``choices=None`` on a categorical parameter means "any safe name" (e.g. image files).
    """

    name: str
    kind: Kind
    units: str
    default: Any
    description: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[Any, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is None

    def range_text(self) -> str:
        if self.kind == "categorical":
            return "any safe file name" if self.choices is None else ", ".join(map(str, self.choices))
        if self.kind == "boolean":
            return "true/false"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{lo}, {hi}]"

    def check_value(self, value: Any) -> Any:
        """Return ``value`` coerced to this parameter's kind, or raise ValueError saying why."""
        if self.kind == "categorical":
            if self.choices is None:
                if not isinstance(value, str) or not _SAFE_NAME.match(value):
                    raise ValueError(f"{value!r} is not a safe name (letters, digits, _ . -)")
                return value
            if value not in self.choices:
                raise ValueError(f"{value!r} is not one of {list(self.choices)}")
            return value
        if self.kind == "boolean":
            if not isinstance(value, bool):
                raise ValueError(f"expected true/false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{value!r} is not a finite number")
        if self.kind == "integer":
            if number != int(number):
                raise ValueError(f"{value!r} must be a whole number")
            number = int(number)
        self.check_bounds(number, number)
        return number

    def check_bounds(self, lo: float, hi: float) -> None:
        """Raise ValueError unless [lo, hi] lies inside this parameter's physical range."""
        if self.low is not None:
            if self.low_open and lo <= self.low:
                raise ValueError(f"{lo:g} must be above {self.low:g} ({self.units or 'no unit'})")
            if not self.low_open and lo < self.low:
                raise ValueError(f"{lo:g} is below the minimum {self.low:g} ({self.units or 'no unit'})")
        if self.high is not None and hi > self.high:
            raise ValueError(f"{hi:g} is above the maximum {self.high:g} ({self.units or 'no unit'})")


@dataclass(frozen=True)
class StimulusType:
    """A named stimulus type: its parameters and what kind of device presents it."""

    name: str
    modality: Literal["abstract", "visual", "stimulator"]
    description: str
    params: Mapping[str, ParamSpec] = field(default_factory=dict)
    default_duration_s: float | None = None
    drawer: str | None = None
    """For plugin types: "module:callable" building a PsychoPy drawable (see stimuli.draw)."""

    @property
    def parameter_names(self) -> list[str]:
        return list(self.params)

    @property
    def open(self) -> bool:
        """True for ``abstract``: any parameters, nothing drawn."""
        return self.modality == "abstract"

    def param(self, name: str) -> ParamSpec:
        try:
            return self.params[name]
        except KeyError:
            raise StimulusParameterError(
                self.name, name, f"not a parameter of {self.name} (known: {', '.join(self.params)})"
            ) from None

    # ------------------------------------------------------------------ protocol-time validation

    def check_space(
        self, parameters: Mapping[str, Any], fixed: Mapping[str, Any] | None = None
    ) -> list[tuple[str, str]]:
        """Problems with a protocol's stimulus space for this type, as (field path, message).

        ``parameters`` maps names to the protocol's parameter specs (objects or dicts with
        ``kind``, ``low``, ``high``, ``choices``, ``units``); ``fixed`` maps names to constant
        values. Paths are relative to the protocol root (``stimulus.parameters.sf.units``).
        """
        problems: list[tuple[str, str]] = []
        if self.open:
            return problems
        fixed = dict(fixed or {})
        known = ", ".join(self.params)
        for name, spec in parameters.items():
            path = f"stimulus.parameters.{name}"
            if name not in self.params:
                problems.append((path, f"{self.name} has no parameter {name!r} (known: {known})"))
                continue
            problems.extend(self._check_spec(self.params[name], spec, path))
            if name in fixed:
                problems.append((f"stimulus.fixed.{name}", f"{name!r} is both varied and fixed"))
        for name, value in fixed.items():
            path = f"stimulus.fixed.{name}"
            if name not in self.params:
                problems.append((path, f"{self.name} has no parameter {name!r} (known: {known})"))
                continue
            try:
                self.params[name].check_value(value)
            except ValueError as exc:
                problems.append((path, str(exc)))
        for name, spec in self.params.items():
            if spec.required and name not in parameters and name not in fixed:
                problems.append(
                    ("stimulus", f"{self.name} needs parameter {name!r}: give it under parameters or fixed")
                )
        return problems

    @staticmethod
    def _get(spec: Any, key: str) -> Any:
        return spec.get(key) if isinstance(spec, Mapping) else getattr(spec, key, None)

    def _check_spec(self, param: ParamSpec, spec: Any, path: str) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        units = self._get(spec, "units") or ""
        canonical = canonical_unit(units)
        if canonical is None:
            problems.append((f"{path}.units", f"unknown unit {units!r} (known units: {', '.join(u for u in UNIT_ALIASES if u)})"))
        elif units and canonical != param.units:
            want = param.units or "no unit"
            problems.append((f"{path}.units", f"{self.name}.{param.name} is in {want!r}, not {units!r}"))
        kind = self._get(spec, "kind")
        if param.kind == "categorical":
            if kind != "categorical":
                problems.append((f"{path}.kind", f"{self.name}.{param.name} is categorical, not {kind}"))
                return problems
            for i, choice in enumerate(self._get(spec, "choices") or []):
                try:
                    param.check_value(choice)
                except ValueError as exc:
                    problems.append((f"{path}.choices.{i}", str(exc)))
            return problems
        if param.kind == "boolean":
            if kind != "categorical":
                problems.append((f"{path}.kind", f"{self.name}.{param.name} is true/false: use kind categorical"))
                return problems
            for i, choice in enumerate(self._get(spec, "choices") or []):
                if not isinstance(choice, bool):
                    problems.append((f"{path}.choices.{i}", f"expected true/false, got {choice!r}"))
            return problems
        if kind == "categorical":
            for i, choice in enumerate(self._get(spec, "choices") or []):
                try:
                    param.check_value(choice)
                except ValueError as exc:
                    problems.append((f"{path}.choices.{i}", str(exc)))
            return problems
        if param.kind == "integer" and kind == "continuous":
            problems.append((f"{path}.kind", f"{self.name}.{param.name} takes whole numbers: use kind integer"))
        lo, hi = self._get(spec, "low"), self._get(spec, "high")
        if lo is not None and hi is not None:
            try:
                param.check_bounds(float(lo), float(hi))
            except ValueError as exc:
                problems.append((path, f"range [{lo:g}, {hi:g}] does not fit {self.name}.{param.name}: {exc}"))
        return problems

    # ------------------------------------------------------------------ rig-time resolution

    def resolve(self, values: Mapping[str, Any], fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Full parameter set for drawing: trial values over fixed values over defaults.

        Raises StimulusParameterError naming the first unknown, missing or invalid parameter.
        """
        merged = {**dict(fixed or {}), **dict(values)}
        if self.open:
            return merged
        out: dict[str, Any] = {}
        for name in merged:
            if name not in self.params:
                raise StimulusParameterError(
                    self.name, name, f"not a parameter of {self.name} (known: {', '.join(self.params)})"
                )
        for name, spec in self.params.items():
            if name not in merged:
                if spec.required:
                    raise StimulusParameterError(self.name, name, "missing and has no default")
                out[name] = spec.default
                continue
            try:
                out[name] = spec.check_value(merged[name])
            except ValueError as exc:
                raise StimulusParameterError(self.name, name, str(exc)) from None
        return out

    def describe(self) -> str:
        """A markdown table of the parameters (used by the docs)."""
        rows = [f"### `{self.name}` ({self.modality})", "", self.description, ""]
        if self.params:
            rows += ["| parameter | kind | units | range | default | meaning |", "|---|---|---|---|---|---|"]
            for p in self.params.values():
                default = "required" if p.required else repr(p.default)
                rows.append(
                    f"| `{p.name}` | {p.kind} | {p.units or '-'} | {p.range_text()} | {default} | {p.description} |"
                )
        return "\n".join(rows) + "\n"
