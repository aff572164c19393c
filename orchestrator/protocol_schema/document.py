"""The whole protocol document: design, stopping, rig and safety sections, and the cross-field checks."""

from __future__ import annotations

import math
from typing import Any, Union

from pydantic import Field, field_validator, model_validator

from orchestrator.protocol_schema.base import NAME_PATTERN, Strict
from orchestrator.protocol_schema.stimulus import (AnyStimulusSpace, CategoricalParameter, IMAGE_REF, IMAGE_SAFETY_LIMITS,
                                                   ImageStimulusSpace, IntegerParameter)
from orchestrator.protocol_schema.response import AnyResponseSpec, PopulationResponseSpec
from orchestrator.protocol_schema.models import ModelSpec


class DesignSpec(Strict):
    strategy: str = "random"
    settings: dict[str, Any] = Field(default_factory=dict)
    characterize_threshold: float | None = Field(default=None, gt=0, lt=1)
    batch_size: int = Field(default=1, ge=1)


class StoppingSpec(Strict):
    max_trials: int = Field(default=100, ge=1)
    model_probability: float | None = Field(default=None, gt=0.5, le=1)
    min_trials: int = Field(default=0, ge=0)
    #: population sessions: a leader is declared only when it also predicts better trial by trial
    #: (orchestrator.neural.check.RivalTest)
    rival_test: bool = False
    #: population sessions: the leader's trial-by-trial lead over every rival, in standard errors,
    #: must exceed this (1: no single trial can carry it; 1.5: nor two; 0: no such gate)
    rival_lead: float = Field(default=1.5, ge=0)
    #: population sessions: P(leader) must reach model_probability even with each rival's evidence
    #: gap cut by this many standard errors of its trial-by-trial sum (0: the plain P(model))
    evidence_margin: float = Field(default=1.0, ge=0)


class RigSpec(Strict):
    capabilities: list[str] = Field(default_factory=lambda: ["simulated"])
    count: int = Field(default=1, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    wait_for_rig_s: float = Field(default=60.0, gt=0)


class NumericLimit(Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ok(self) -> "NumericLimit":
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class CategoricalLimit(Strict):
    allowed: list[Union[str, int, float]] = Field(min_length=1)


def _fixed_outside(name: str, value: Any, limit: "NumericLimit | CategoricalLimit") -> str | None:
    """Why a fixed stimulus value breaks its safety limit, or None: fixed values obey `safety` too."""
    if isinstance(limit, CategoricalLimit):
        return None if value in limit.allowed else f"{value!r} is not in safety.{name}.allowed {limit.allowed}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{value!r} is not a finite number, but safety.{name} sets numeric limits"
    if limit.min is not None and value < limit.min:
        return f"{value:g} is below safety.{name}.min={limit.min:g}"
    if limit.max is not None and value > limit.max:
        return f"{value:g} is above safety.{name}.max={limit.max:g}"
    return None


class SafetyViolation(ValueError):
    """A stimulus outside the protocol's hard limits. It is never sent to a rig."""


class Protocol(Strict):
    """A validated protocol. Immutable: a session's behaviour is a function of it and the seed."""

    name: str = Field(pattern=NAME_PATTERN)
    version: str
    description: str = ""
    stimulus: AnyStimulusSpace
    response: AnyResponseSpec
    models: list[ModelSpec] = Field(min_length=2)
    design: DesignSpec = Field(default_factory=DesignSpec)
    stopping: StoppingSpec = Field(default_factory=StoppingSpec)
    rig: RigSpec = Field(default_factory=RigSpec)
    safety: dict[str, Union[NumericLimit, CategoricalLimit]] = Field(default_factory=dict)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    @model_validator(mode="after")
    def _cross_checks(self) -> "Protocol":
        if isinstance(self.stimulus, ImageStimulusSpace) or isinstance(self.response, PopulationResponseSpec):
            return self._population_checks()
        problems: list[str] = []
        for i, model in enumerate(self.models):
            for key in ("module", "weights", "readout"):
                if getattr(model, key) is not None:
                    problems.append(f"models.{i}.{key}: only population protocols (response.kind: population) "
                                    "have feature models")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"models: duplicate model names {duplicates}")
        for i, model in enumerate(self.models):
            for variable, parameter in model.inputs.items():
                if parameter not in self.stimulus.parameters:
                    problems.append(
                        f"models.{i}.inputs.{variable}: {parameter!r} is not a stimulus parameter "
                        f"(known: {sorted(self.stimulus.parameters)})"
                    )
        for name, limit in self.safety.items():
            spec = self.stimulus.parameters.get(name)
            if spec is None and name in self.stimulus.fixed:
                problem = _fixed_outside(name, self.stimulus.fixed[name], limit)
                if problem:
                    problems.append(f"stimulus.fixed.{name}: {problem}")
            elif spec is None:
                problems.append(
                    f"safety.{name}: not a stimulus parameter (known: {sorted(self.stimulus.parameters)}"
                    + (f"; fixed: {sorted(self.stimulus.fixed)})" if self.stimulus.fixed else ")")
                )
            elif isinstance(spec, CategoricalParameter):
                if not isinstance(limit, CategoricalLimit):
                    problems.append(f"safety.{name}: categorical parameter needs 'allowed: [...]'")
                else:
                    unknown = [c for c in limit.allowed if c not in spec.choices]
                    if unknown:
                        problems.append(f"safety.{name}.allowed: {unknown} are not among the choices")
            elif isinstance(limit, CategoricalLimit):
                problems.append(f"safety.{name}: numeric parameter needs min/max, not 'allowed'")
            else:
                lo = spec.low if limit.min is None else max(spec.low, limit.min)
                hi = spec.high if limit.max is None else min(spec.high, limit.max)
                if lo > hi:
                    problems.append(
                        f"safety.{name}: limits [{limit.min}, {limit.max}] leave nothing of the "
                        f"parameter range [{spec.low}, {spec.high}]"
                    )
        if self.stopping.min_trials > self.stopping.max_trials:
            problems.append("stopping.min_trials: must not exceed stopping.max_trials")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _population_checks(self) -> "Protocol":
        """Image stimuli go with population responses; models are feature extractors with readouts."""
        problems: list[str] = []
        if not isinstance(self.stimulus, ImageStimulusSpace):
            problems.append("stimulus.type: population responses need an image stimulus space (type: image)")
        if not isinstance(self.response, PopulationResponseSpec):
            problems.append("response.kind: image stimuli need a population response (kind: population)")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"models: duplicate model names {duplicates}")
        for i, model in enumerate(self.models):
            if model.formula is not None:
                problems.append(f"models.{i}.formula: population models are 'builtin' or 'module' feature models")
            if model.inputs or model.priors:
                problems.append(f"models.{i}.{'inputs' if model.inputs else 'priors'}: not used by feature "
                                "models (the readout prior goes under readout.prior)")
        if not self.design.strategy.startswith("population_"):
            problems.append(f"design.strategy: {self.design.strategy!r} is for scalar stimuli (population protocols use "
                            "population_synthesis, population_pool, population_random_pool or population_random_noise)")
        for name, limit in self.safety.items():
            if name not in IMAGE_SAFETY_LIMITS:
                problems.append(f"safety.{name}: not an image limit (known: {', '.join(IMAGE_SAFETY_LIMITS)})")
            elif not isinstance(limit, NumericLimit):
                problems.append(f"safety.{name}: needs min/max, not 'allowed'")
            elif any(v is not None and not 0 <= v <= 1 for v in (limit.min, limit.max)):
                problems.append(f"safety.{name}: limits are in pixel units 0..1")
        if self.stopping.min_trials > self.stopping.max_trials:
            problems.append("stopping.min_trials: must not exceed stopping.max_trials")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_population(self) -> bool:
        """True for image stimuli with population responses (orchestrator.neural runs them)."""
        return isinstance(self.response, PopulationResponseSpec)

    def image_limits(self) -> dict[str, tuple[float, float]]:
        """Effective image limits: pixel range, mean luminance and RMS contrast (pixel units 0..1)."""
        out = {"pixel": (0.0, 1.0), "mean_luminance": (0.0, 1.0), "rms_contrast": (0.0, 0.5)}
        for name, limit in self.safety.items():
            if isinstance(limit, NumericLimit) and name in out:
                lo, hi = out[name]
                out[name] = (lo if limit.min is None else max(lo, limit.min), hi if limit.max is None else min(hi, limit.max))
        return out

    def check_image(self, pixels: Any, where: str = "stimulus.image") -> None:
        """Raise SafetyViolation unless `pixels` (0..1 floats or uint8) has the protocol's shape and limits."""
        import numpy as np

        assert isinstance(self.stimulus, ImageStimulusSpace)
        arr = np.asarray(pixels)
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float64) / 255.0
        if arr.shape != self.stimulus.shape:
            raise SafetyViolation(f"{where}: shape {list(arr.shape)} is not the protocol's {list(self.stimulus.shape)}")
        if not np.isfinite(arr).all():
            raise SafetyViolation(f"{where}: has non-finite pixels")
        limits = self.image_limits()
        measured = {"pixel": (float(arr.min()), float(arr.max())), "mean_luminance": (float(arr.mean()),) * 2,
                    "rms_contrast": (float(arr.std()),) * 2}
        for name, (lo, hi) in limits.items():
            got_lo, got_hi = measured[name]
            if got_lo < lo - 1e-9 or got_hi > hi + 1e-9:
                shown = f"{got_lo:.4g}..{got_hi:.4g}" if name == "pixel" else f"{got_lo:.4g}"
                raise SafetyViolation(f"{where}: {name} {shown} is outside the safety limits [{lo:g}, {hi:g}]")

    # -- safety ------------------------------------------------------------------------------

    def safety_limits(self) -> dict[str, tuple[float, float]]:
        """Effective numeric limits per parameter: the parameter range intersected with `safety`."""
        limits: dict[str, tuple[float, float]] = {}
        for name, spec in self.stimulus.parameters.items():
            if isinstance(spec, CategoricalParameter):
                continue
            lo, hi = float(spec.low), float(spec.high)
            limit = self.safety.get(name)
            if isinstance(limit, NumericLimit):
                lo = lo if limit.min is None else max(lo, limit.min)
                hi = hi if limit.max is None else min(hi, limit.max)
            limits[name] = (lo, hi)
        return limits

    def allowed_choices(self, name: str) -> list[Any]:
        """Categorical choices a stimulus may use (the safety allow-list, if any)."""
        spec = self.stimulus.parameters[name]
        assert isinstance(spec, CategoricalParameter)
        limit = self.safety.get(name)
        return list(limit.allowed) if isinstance(limit, CategoricalLimit) else list(spec.choices)

    def check_safe(self, stimulus: dict[str, Any]) -> None:
        """Raise SafetyViolation unless `stimulus` names exactly the protocol's parameters, all in limits."""
        if isinstance(self.stimulus, ImageStimulusSpace):  # pixels are checked where they exist (check_image)
            ref = stimulus.get("image") if isinstance(stimulus, dict) else None
            if set(stimulus) != {"image"} or not isinstance(ref, str) or not IMAGE_REF.match(ref):
                raise SafetyViolation("stimulus: an image stimulus is {'image': '<sha256 hex>'}")
            return
        expected = set(self.stimulus.parameters)
        given = set(stimulus)
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise SafetyViolation(f"stimulus parameters mismatch: missing {missing}, unexpected {extra}")
        limits = self.safety_limits()
        for name, spec in self.stimulus.parameters.items():
            value = stimulus[name]
            if isinstance(spec, CategoricalParameter):
                if value not in self.allowed_choices(name):
                    raise SafetyViolation(f"stimulus.{name}={value!r} is not an allowed choice")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SafetyViolation(f"stimulus.{name}={value!r} is not a finite number")
            if isinstance(spec, IntegerParameter) and value != int(value):
                raise SafetyViolation(f"stimulus.{name}={value!r} must be an integer")
            lo, hi = limits[name]
            if not lo <= value <= hi:
                raise SafetyViolation(f"stimulus.{name}={value!r} is outside the safety limits [{lo:g}, {hi:g}]")

    def model(self, name: str) -> ModelSpec:
        """The model spec called `name` (KeyError lists the known names)."""
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(f"unknown model {name!r}; the protocol defines {[m.name for m in self.models]}")

    def model_prior_probabilities(self) -> dict[str, float]:
        """Prior model probabilities, normalised; unspecified ones share what is left equally."""
        given = {m.name: m.prior_probability for m in self.models}
        fixed = sum(p for p in given.values() if p is not None)
        free = [n for n, p in given.items() if p is None]
        rest = max(1.0 - fixed, 0.0) / len(free) if free else 0.0
        raw = {n: (p if p is not None else rest) for n, p in given.items()}
        if any(v <= 0 for v in raw.values()):
            raw = {n: (p if p is not None else 1.0 / len(raw)) for n, p in given.items()}
        total = sum(raw.values())
        return {n: v / total for n, v in raw.items()}
