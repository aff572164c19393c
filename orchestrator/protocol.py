"""Protocol files: the pydantic schema of `protocols/*.yaml`, loading with line numbers, safety limits.

A protocol is the experimenter's whole contract with cloop: what may be shown (stimulus space and its
hard safety limits), what comes back (response kind), which hypotheses compete (encoding models with
priors), how stimuli are chosen (design), when to stop, and what the rig must provide. Everything that
is wrong with a file is reported at once, one line per problem, as ``FILE:LINE: field.path: message``.

Longer than most modules on purpose: the schema and its loader are one concept (every message names
a field of this schema at its line), and splitting them would put each field's rules in one file and
the way its problems are reported in another.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, field_validator,
                      model_validator)

__all__ = [
    "Protocol",
    "LoadedProtocol",
    "Problem",
    "ProtocolError",
    "SafetyViolation",
    "InvalidResponse",
    "PopulationResponseSpec",
    "ImageStimulusSpace",
    "load_protocol",
    "parse_protocol_text",
]

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]*$"


class _Strict(BaseModel):
    """Base for every schema node: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------- stimulus


class ContinuousParameter(_Strict):
    kind: Literal["continuous"]
    low: float
    high: float
    units: str = ""
    log: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> "ContinuousParameter":
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got low={self.low}")
        return self


class IntegerParameter(_Strict):
    kind: Literal["integer"]
    low: int
    high: int
    units: str = ""

    @model_validator(mode="after")
    def _bounds(self) -> "IntegerParameter":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class CategoricalParameter(_Strict):
    kind: Literal["categorical"]
    choices: list[Union[str, int, float]] = Field(min_length=1)
    units: str = ""

    @field_validator("choices")
    @classmethod
    def _unique(cls, choices: list[Any]) -> list[Any]:
        if len(set(map(str, choices))) != len(choices):
            raise ValueError("choices must be unique")
        return choices


StimulusParameter = Annotated[
    Union[ContinuousParameter, IntegerParameter, CategoricalParameter], Field(discriminator="kind")
]


class StimulusSpace(_Strict):
    type: str = "abstract"
    parameters: dict[str, StimulusParameter] = Field(min_length=1)
    fixed: dict[str, Any] = Field(default_factory=dict)
    """Stimulus-type parameters that are held constant (e.g. size, spatial frequency)."""
    duration_s: float | None = Field(default=None, gt=0)

    @field_validator("parameters")
    @classmethod
    def _names(cls, parameters: dict[str, Any]) -> dict[str, Any]:
        for name in parameters:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"parameter name {name!r} must be an identifier")
        return parameters


# ----------------------------------------------------------------------------------- image stimuli

#: safety limit names of an image stimulus space (pixel values in 0..1, 0 = black, 1 = white)
IMAGE_SAFETY_LIMITS = ("pixel", "mean_luminance", "rms_contrast")
IMAGE_REF = re.compile(r"^[0-9a-f]{64}$")


class ImageStimulusSpace(_Strict):
    """Images of a fixed size, chosen from a pool or synthesized pixel by pixel.

    Pixels are numbers in 0..1 (stored and sent as uint8 0..255). ``pool`` is a .npz file (one
    array of shape (n, H, W) or (n, H, W, C)) or a directory of .npy/.png images; without one the
    designs use a seeded pool of ``pool_size`` 1/f-noise images (natural-image-like spectra).
    """

    type: Literal["image"]
    size: tuple[int, int]
    channels: Literal[1, 3] = 1
    parametrization: Literal["pixels"] = "pixels"
    pool: str | None = None
    pool_size: int = Field(default=1000, ge=2, le=100_000)
    duration_s: float | None = Field(default=None, gt=0)

    @field_validator("size")
    @classmethod
    def _size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if not all(4 <= v <= 1024 for v in size):
            raise ValueError(f"each side must be 4..1024 pixels, got {list(size)}")
        return size

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape of one image: (H, W) for grey, (H, W, C) for colour."""
        h, w = self.size
        return (h, w) if self.channels == 1 else (h, w, self.channels)


def _stimulus_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "image" if kind == "image" else "scalar"


AnyStimulusSpace = Annotated[
    Union[Annotated[StimulusSpace, Tag("scalar")], Annotated[ImageStimulusSpace, Tag("image")]],
    Discriminator(_stimulus_kind),
]


# ----------------------------------------------------------------------------------------- response


class InvalidResponse(ValueError):
    """A response that must not reach the models (NaN, wrong type, out of range)."""


#: Plausible ranges of a response value when the protocol gives none (`response.low` / `response.high`
#: widen or narrow them). A value outside is stored as `invalid` and never reaches the models: one
#: absurd value (a counter overflow, 2**64-1) must not stall inference or a resume that replays it.
DEFAULT_RESPONSE_RANGE: dict[str, tuple[float, float]] = {
    "poisson": (0.0, 1e6),
    "gaussian": (-1e9, 1e9),
}


class ResponseSpec(_Strict):
    kind: Literal["bernoulli", "binomial", "poisson", "gaussian"]
    n: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=30.0, gt=0)
    low: float | None = None
    """Poisson and gaussian: the lowest plausible value (default 0 / -1e9); values below are invalid."""
    high: float | None = None
    """Poisson and gaussian: the highest plausible value (default 1e6 / 1e9); values above are invalid."""

    @model_validator(mode="after")
    def _n_for_binomial(self) -> "ResponseSpec":
        if self.kind == "binomial" and self.n is None:
            raise ValueError("binomial responses need n (number of sub-trials)")
        if self.kind != "binomial" and self.n is not None:
            raise ValueError(f"n is only meaningful for binomial responses, not {self.kind}")
        if (self.low is not None or self.high is not None) and self.kind not in DEFAULT_RESPONSE_RANGE:
            raise ValueError(f"low/high are only meaningful for poisson and gaussian responses, not {self.kind}")
        for name in ("low", "high"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number")
        lo, hi = self.plausible_range()
        if self.kind == "poisson" and lo < 0:
            raise ValueError(f"low must be >= 0 for poisson counts, got {lo:g}")
        if lo >= hi:
            raise ValueError(f"low ({lo:g}) must be below high ({hi:g})")
        return self

    def plausible_range(self) -> tuple[float, float]:
        """The values a response may take: (low, high), the protocol's own or the kind's default."""
        if self.kind == "bernoulli":
            return 0.0, 1.0
        if self.kind == "binomial":
            return 0.0, float(self.n or 0)
        lo, hi = DEFAULT_RESPONSE_RANGE[self.kind]
        return (lo if self.low is None else self.low), (hi if self.high is None else self.high)

    def validate(self, payload: Any) -> float:
        """Return the response value as a float, or raise InvalidResponse saying what is wrong."""
        if not isinstance(payload, dict) or "value" not in payload:
            raise InvalidResponse("response must be a mapping with a 'value' field")
        value = payload["value"]
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            raise InvalidResponse(f"response.value must be a number, got {type(value).__name__}")
        try:
            value = float(value)
        except OverflowError:  # an int beyond float range
            raise InvalidResponse("response.value is too large to be a plausible response") from None
        if not math.isfinite(value):
            raise InvalidResponse(f"response.value is not finite ({value})")
        if self.kind in ("bernoulli", "binomial", "poisson") and value != int(value):
            raise InvalidResponse(f"{self.kind} response must be a whole number, got {value}")
        if self.kind == "bernoulli" and value not in (0.0, 1.0):
            raise InvalidResponse(f"bernoulli response must be 0 or 1, got {value:g}")
        if self.kind == "binomial" and not 0 <= value <= (self.n or 0):
            raise InvalidResponse(f"binomial response must be in 0..{self.n}, got {value:g}")
        if self.kind == "poisson" and value < 0:
            raise InvalidResponse(f"poisson count must be >= 0, got {value:g}")
        if self.kind in DEFAULT_RESPONSE_RANGE:
            lo, hi = self.plausible_range()
            if value < lo:
                raise InvalidResponse(f"response {value:g} is below the plausible low {lo:g} (response.low sets it)")
            if value > hi:
                raise InvalidResponse(f"response {value:g} is above the plausible high {hi:g} (response.high sets it)")
        return value


class PopulationResponseSpec(_Strict):
    """A vector response: one number per recorded unit per trial (spike counts or dF/F, say).

    ``units`` is a count or the list of unit ids (the wire order). A NaN entry masks that unit for
    that trial (it is stored, and the unit's readout skips the trial); the trial itself stays valid.
    """

    kind: Literal["population"]
    units: Union[int, list[Union[str, int]]]
    noise: Literal["gaussian", "poisson"] = "gaussian"
    window_s: float = Field(gt=0)
    latency_s: float = Field(default=0.0, ge=0)
    timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("units")
    @classmethod
    def _units(cls, units: Any) -> Any:
        if isinstance(units, bool):
            raise ValueError("units must be a count or a list of unit ids")
        if isinstance(units, int):
            if not 1 <= units <= 100_000:
                raise ValueError(f"units must be 1..100000, got {units}")
        else:
            if not units:
                raise ValueError("the unit list is empty")
            if len(set(map(str, units))) != len(units):
                raise ValueError("unit ids must be unique")
        return units

    @property
    def unit_ids(self) -> list[str]:
        """Unit ids in wire order (``0..N-1`` when only a count is given)."""
        return [str(u) for u in (range(self.units) if isinstance(self.units, int) else self.units)]

    @property
    def n_units(self) -> int:
        return self.units if isinstance(self.units, int) else len(self.units)

    def validate(self, payload: Any) -> Any:
        """Return the response as a float64 ndarray (N,), NaN = masked unit; else InvalidResponse."""
        import numpy as np

        if not isinstance(payload, dict) or "value" not in payload:
            raise InvalidResponse("response must be a mapping with a 'value' field")
        value = payload["value"]
        ids = self.unit_ids
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if not isinstance(value, (list, tuple)):
            raise InvalidResponse(f"response.value must be a list of {len(ids)} numbers, got {type(value).__name__}")
        if len(value) != len(ids):
            raise InvalidResponse(f"response.value has {len(value)} entries, the protocol has {len(ids)} units")
        out = np.empty(len(ids), dtype=np.float64)
        for i, v in enumerate(value):
            if v is None:
                v = math.nan
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidResponse(f"response.value[{i}] (unit {ids[i]}) must be a number or NaN, got {v!r}")
            v = float(v)
            if math.isinf(v):
                raise InvalidResponse(f"response.value[{i}] (unit {ids[i]}) is infinite")
            if self.noise == "poisson" and not math.isnan(v) and (v < 0 or v != int(v)):
                raise InvalidResponse(f"response.value[{i}] (unit {ids[i]}) must be a count >= 0, got {v:g}")
            out[i] = v
        return out


AnyResponseSpec = Annotated[
    Union[Annotated[ResponseSpec, Tag("scalar")], Annotated[PopulationResponseSpec, Tag("population")]],
    Discriminator(lambda v: "population" if (v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None))
                  == "population" else "scalar"),
]


# ----------------------------------------------------------------------------------------- priors


class _Prior(_Strict):
    def median_hint(self) -> float | None:  # pragma: no cover - overridden where closed form exists
        return None


class UniformPrior(_Prior):
    dist: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ok(self) -> "UniformPrior":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class NormalPrior(_Prior):
    dist: Literal["normal"]
    mean: float
    sd: float = Field(gt=0)


class LogNormalPrior(_Prior):
    dist: Literal["lognormal"]
    mu: float
    sigma: float = Field(gt=0)


class BetaPrior(_Prior):
    dist: Literal["beta"]
    alpha: float = Field(gt=0)
    beta: float = Field(gt=0)


class GammaPrior(_Prior):
    dist: Literal["gamma"]
    shape: float = Field(gt=0)
    rate: float = Field(gt=0)


class HalfNormalPrior(_Prior):
    dist: Literal["halfnormal"]
    scale: float = Field(gt=0)


class TruncNormalPrior(_Prior):
    dist: Literal["truncnormal"]
    mean: float
    sd: float = Field(gt=0)
    low: float
    high: float

    @model_validator(mode="after")
    def _ok(self) -> "TruncNormalPrior":
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class FixedPrior(_Prior):
    """Not a distribution: the parameter is held at `value` (the same as `settings.fixed`)."""

    dist: Literal["fixed"]
    value: float

    @field_validator("value")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("value must be a finite number")
        return value


Prior = Annotated[
    Union[UniformPrior, NormalPrior, LogNormalPrior, BetaPrior, GammaPrior, HalfNormalPrior, TruncNormalPrior,
          FixedPrior],
    Field(discriminator="dist"),
]

#: Each prior's argument names, for messages that show how to write one.
PRIOR_EXAMPLES = {
    "uniform": "{dist: uniform, low: 0, high: 1}", "normal": "{dist: normal, mean: 0, sd: 1}",
    "lognormal": "{dist: lognormal, mu: 0, sigma: 1}", "beta": "{dist: beta, alpha: 2, beta: 1}",
    "gamma": "{dist: gamma, shape: 2, rate: 1}", "halfnormal": "{dist: halfnormal, scale: 1}",
    "truncnormal": "{dist: truncnormal, mean: 0, sd: 1, low: -1, high: 1}", "fixed": "{dist: fixed, value: 0.5}",
}


# ----------------------------------------------------------------------------------------- models


class ReadoutPrior(_Strict):
    """Prior of a per-unit linear readout, in units of the unit's noise SD (features standardised)."""

    weight_sd: Union[float, list[float]] = Field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    """Prior SD of the explained signal (sqrt of the prior SNR); a list is a grid marginalised over."""

    @field_validator("weight_sd")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        if not values or any(v <= 0 for v in values):
            raise ValueError("weight_sd must be > 0 (or a non-empty list of values > 0)")
        return value
    bias_sd: float = Field(default=10.0, gt=0)
    noise_shape: float = Field(default=2.0, gt=0)
    """Inverse-gamma prior of each unit's noise variance: shape and scale."""
    noise_scale: float = Field(default=1.0, gt=0)


class ReadoutSpec(_Strict):
    """Population models: a Bayesian linear readout from the model's features to every unit."""

    prior: ReadoutPrior = Field(default_factory=ReadoutPrior)
    transform: Literal["anscombe", "sqrt", "none"] | None = None
    """Applied to responses before the readout; default anscombe for poisson, none for gaussian."""


class ModelSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    builtin: str | None = None
    formula: str | None = None
    inputs: dict[str, str] = Field(default_factory=dict)
    """Model variable -> stimulus parameter; variables not listed use the parameter of the same name."""
    prior_probability: float | None = Field(default=None, gt=0)
    priors: dict[str, Prior] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    module: str | None = None
    """Population models: a torch feature extractor as ``package.module:Factory``."""
    weights: str | None = None
    """Population models: a file of weights for ``module`` (its sha256 is recorded with the session)."""
    readout: ReadoutSpec | None = None

    @field_validator("priors", mode="before")
    @classmethod
    def _priors_are_mappings(cls, priors: Any) -> Any:
        if isinstance(priors, dict):
            for name, prior in priors.items():
                if isinstance(prior, (int, float)) and not isinstance(prior, bool):
                    raise ValueError(
                        f"{name}: a prior is a mapping such as {PRIOR_EXAMPLES['beta']}; to fix {name} at "
                        f"{prior:g} write `{name}: {{dist: fixed, value: {prior:g}}}`")
        return priors

    @model_validator(mode="after")
    def _fixed_priors_to_settings(self) -> "ModelSpec":
        """`{dist: fixed, value: v}` means what `settings.fixed` means: the model sees one form."""
        fixed = {name: prior.value for name, prior in self.priors.items() if isinstance(prior, FixedPrior)}
        if not fixed:
            return self
        settings = dict(self.settings)
        already = dict(settings.get("fixed") or {}) if isinstance(settings.get("fixed"), dict) else {}
        both = sorted(set(already) & set(fixed))
        if both:
            raise ValueError(f"priors: {both} are fixed both as a prior and in settings.fixed; keep one")
        settings["fixed"] = {**already, **fixed}
        object.__setattr__(self, "priors", {n: p for n, p in self.priors.items() if n not in fixed})
        object.__setattr__(self, "settings", settings)
        return self

    @model_validator(mode="after")
    def _one_definition(self) -> "ModelSpec":
        given = [k for k in ("builtin", "formula", "module") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'builtin' or 'formula'" + (
                " (or 'module' for a population model)" if self.module is not None else ""))
        if self.weights is not None and self.module is None:
            raise ValueError("weights need a 'module' to load them into")
        if self.module is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", self.module):
            raise ValueError(f"module {self.module!r} must look like package.module:Factory")
        if self.formula is not None and not self.formula.strip():
            raise ValueError("formula is empty")
        return self


class DesignSpec(_Strict):
    strategy: str = "random"
    settings: dict[str, Any] = Field(default_factory=dict)
    characterize_threshold: float | None = Field(default=None, gt=0, lt=1)
    batch_size: int = Field(default=1, ge=1)


class StoppingSpec(_Strict):
    max_trials: int = Field(default=100, ge=1)
    model_probability: float | None = Field(default=None, gt=0.5, le=1)
    min_trials: int = Field(default=0, ge=0)


class RigSpec(_Strict):
    capabilities: list[str] = Field(default_factory=lambda: ["simulated"])
    count: int = Field(default=1, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    wait_for_rig_s: float = Field(default=60.0, gt=0)


class NumericLimit(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ok(self) -> "NumericLimit":
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class CategoricalLimit(_Strict):
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


class Protocol(_Strict):
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


# ----------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a protocol file, located by field path and line."""

    source: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.path or '<root>'}: {self.message}"


class ProtocolError(ValueError):
    """A protocol file that cannot be used; `problems` holds every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class LoadedProtocol:
    """A validated protocol together with its exact text (stored verbatim) and content hash."""

    protocol: Protocol
    text: str
    sha256: str
    source: str


#: A semantic check owned by another module (model formulas, stimulus types, design capabilities):
#: takes the protocol (validated, or partly validated: see _partial_protocol) and returns
#: (field path, message) pairs. Each declares the top-level fields it reads in `NEEDS`.
Checker = Callable[[Any], list[tuple[str, str]]]

#: The text sizes a protocol file may have; a protocol is a page of YAML, not a data set.
MAX_PROTOCOL_BYTES = 1_000_000


def load_protocol(path: str | Path, checks: Sequence[Checker] = ()) -> LoadedProtocol:
    """Read and validate a protocol file; raise ProtocolError listing every problem (see parse_protocol_text)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProtocolError([Problem(str(path), None, "", f"cannot read file: {exc}")]) from exc
    return parse_protocol_text(text, source=str(path), checks=checks)


def parse_protocol_text(text: str, source: str = "<string>", checks: Sequence[Checker] = ()) -> LoadedProtocol:
    """Validate protocol YAML text; raise ProtocolError listing every problem with its line, in one pass.

    `checks` are the semantic checks to run beside the schema; this module knows none of them, so
    it imports neither torch nor the modules that own them. The orchestrator passes its own
    (`orchestrator.protocol_checks.parse_checked` / `load_checked`: models, stimulus types, design
    limits); a rig passes none: it parses the text the orchestrator already validated. The YAML is
    parsed once; anchors and aliases are refused before anything is expanded.
    """
    node, data, problems = _compose(text, source)
    if node is None:
        raise ProtocolError(problems)
    lines: dict[tuple[str, ...], int] = {}
    _index_lines(node, (), lines, problems, source)
    if not isinstance(data, dict):
        raise ProtocolError(problems + [Problem(source, lines.get((), 1), "", "top level must be a mapping of protocol fields")])
    protocol: Protocol | None = None
    try:
        protocol = Protocol.model_validate(data)
        valid_fields = set(Protocol.model_fields)
    except ValidationError as exc:
        problems.extend(_problems_from_validation(exc, lines, source))
        partial, valid_fields = _partial_protocol(data)
    target = protocol if protocol is not None else partial
    found: list[tuple[str, str]] = []
    for check in checks:
        needs = set(getattr(check, "NEEDS", Protocol.model_fields))
        if needs <= valid_fields:
            found.extend(check(target))
        elif needs - valid_fields == {"models"} and "models" in data:
            found.extend(_check_each_model(check, target, data["models"]))
    problems.extend(Problem(source, _line_for(tuple(path.split(".")), lines), path, message) for path, message in found)
    problems.sort(key=lambda problem: problem.line or 0)  # file order, whichever stage found it
    if problems or protocol is None:
        raise ProtocolError(problems)
    return LoadedProtocol(protocol, text, hashlib.sha256(text.encode("utf-8")).hexdigest(), source)


class _NoAnchorsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors and aliases as it meets them (before any expansion)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AnchorRefused(event.start_mark)
        return super().compose_node(parent, index)


class _AnchorRefused(Exception):
    def __init__(self, mark: Any) -> None:
        self.mark = mark


def _compose(text: str, source: str) -> tuple[Any, Any, list[Problem]]:
    """Parse the text once: (node tree, data, []) or (None, None, [the problem]).

    Refused: syntax errors, anchors/aliases (an alias bomb expands a few hundred bytes into
    gigabytes), empty files and files larger than a protocol can need.
    """
    if len(text.encode("utf-8", errors="replace")) > MAX_PROTOCOL_BYTES:
        return None, None, [Problem(source, None, "", f"file is larger than {MAX_PROTOCOL_BYTES:,} bytes; "
                                                      "a protocol is a page of YAML")]
    loader = _NoAnchorsLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None, [Problem(source, 1, "", "file is empty")]
        return node, loader.construct_document(node), []
    except _AnchorRefused as refused:
        return None, None, [Problem(source, refused.mark.line + 1, "",
                                    "YAML anchors (&name) and aliases (*name) are not allowed in a protocol; "
                                    "write each value out")]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        message = getattr(exc, "problem", None) or str(exc)
        return None, None, [Problem(source, line, "", f"YAML syntax error: {message}")]
    finally:
        loader.dispose()


def _check_each_model(check: Checker, partial: Protocol, models: Any) -> list[tuple[str, str]]:
    """Run a model check on each model that validates alone (the list as a whole did not)."""
    found: list[tuple[str, str]] = []
    for i, raw in enumerate(models if isinstance(models, list) else []):
        try:
            model = ModelSpec.model_validate(raw)
        except ValidationError:
            continue
        for path, message in check(partial.model_copy(update={"models": [model]})):
            if path == "models.0" or path.startswith("models.0."):
                path = f"models.{i}" + path[len("models.0"):]
            found.append((path, message))
    return found


def _partial_protocol(data: dict[str, Any]) -> tuple[Protocol, set[str]]:
    """The top-level fields that validate on their own, so semantic checks can run on them too."""
    valid: dict[str, Any] = {}
    for name, field in Protocol.model_fields.items():
        adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)
        if name not in data:
            if not field.is_required():
                valid[name] = field.get_default(call_default_factory=True)
            continue
        value = data[name]
        if name == "version" and isinstance(value, (int, float)):
            value = str(value)
        try:
            valid[name] = adapter.validate_python(value)
        except ValidationError:
            continue
    return Protocol.model_construct(**valid), set(valid)


def _index_lines(
    node: yaml.Node, path: tuple[str, ...], lines: dict[tuple[str, ...], int], problems: list[Problem], source: str
) -> None:
    """Record the 1-based line of every field path; report duplicate keys (YAML silently keeps the last)."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                problems.append(
                    Problem(source, key_node.start_mark.line + 1, ".".join(path + (key,)), "duplicate key")
                )
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _index_lines(value_node, path + (key,), lines, problems, source)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, path + (str(i),), lines, problems, source)


def _line_for(path: tuple[str, ...], lines: dict[tuple[str, ...], int]) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())


_UNION_TAGS = {"continuous", "integer", "categorical", "NumericLimit", "CategoricalLimit"} | {
    "uniform", "normal", "lognormal", "beta", "gamma", "halfnormal", "truncnormal",
}
_UNION_TAGS |= {"scalar", "image", "population"}  # tags of the stimulus/response unions


def _problems_from_validation(exc: ValidationError, lines: dict[tuple[str, ...], int], source: str) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"] if str(part) not in _UNION_TAGS)
        message = error["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if error["type"] == "extra_forbidden":
            message = "unknown field (check spelling)"
        elif error["type"] == "union_tag_invalid":
            ctx = error.get("ctx", {})
            message = (
                f"unknown {ctx.get('discriminator', 'kind').strip(chr(39))} {ctx.get('tag')!r}; "
                f"expected one of {ctx.get('expected_tags')}"
            )
        if loc == () and ": " in message:
            # Cross-field checks from Protocol._cross_checks carry their own field paths.
            for part in message.split("; "):
                field, _, text = part.partition(": ")
                problems.append(Problem(source, _line_for(tuple(field.split(".")), lines), field, text))
            continue
        key = (".".join(loc), message)
        if key in seen:
            continue
        seen.add(key)
        problems.append(Problem(source, _line_for(loc, lines), ".".join(loc), message))
    return problems
