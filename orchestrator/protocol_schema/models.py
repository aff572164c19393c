"""The models section of a protocol: encoding models, their parameter priors and readout priors."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from orchestrator.protocol_schema.base import NAME_PATTERN, Strict, require_low_below_high


class _Prior(Strict):
    def median_hint(self) -> float | None:  # pragma: no cover - overridden where closed form exists
        return None


class UniformPrior(_Prior):
    dist: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ok(self) -> "UniformPrior":
        require_low_below_high(self.low, self.high)
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
        require_low_below_high(self.low, self.high)
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


class ReadoutPrior(Strict):
    """Prior of a per-unit linear readout, in units of the unit's noise SD (features standardised)."""

    weight_sd: Union[float, list[float]] = Field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    """Prior SD of the explained signal (sqrt of the prior SNR); a list is a grid marginalised over."""

    bias_sd: Union[float, list[float]] = Field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    """Prior SD of each unit's offset from the session's centre (the first trial's mean response),
    in noise SDs; a list is a grid marginalised over, like weight_sd (each extra value costs O(N)
    per trial, not a readout)."""

    @field_validator("weight_sd", "bias_sd")
    @classmethod
    def _positive(cls, value: Any, info: Any) -> Any:
        values = value if isinstance(value, list) else [value]
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"{info.field_name} must be > 0 (or a non-empty list of values > 0)")
        return value

    noise_levels: list[float] | None = Field(default_factory=lambda: [2.0 ** (k / 2) for k in range(-20, 9)])
    """Population noise levels marginalised over (the default): each unit's noise variance is
    InvGamma(noise_level_shape, (noise_level_shape - 1) v c), mean v c, with the level v shared by
    the units and learned from them on this grid, c the session's scale (the first trial's mean
    squared deviation of the units from their centre), so no response unit is assumed. The default,
    2^-10 .. 2^4 in steps of sqrt(2), spans noise 1/1000 of the units' spread to 16 times it (a
    step of 2 left the level between grid points and cost calibration: benchmarks/README.md). null: every unit's noise
    variance InvGamma(noise_shape, noise_scale) in response units, independently (the prior before
    noise levels existed; a protocol that sets noise_shape or noise_scale without noise_levels
    keeps it)."""

    noise_level_shape: float = Field(default=10.0, gt=1)
    """Shape of each unit's inverse-gamma around the population level (larger: units' noise closer to it)."""

    noise_shape: float = Field(default=2.0, gt=0)
    """With ``noise_levels: null``: inverse-gamma prior of each unit's noise variance, shape and scale."""
    noise_scale: float = Field(default=1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _legacy_noise_prior(cls, data: Any) -> Any:
        """A protocol written before noise levels that sets noise_shape / noise_scale keeps that prior."""
        if isinstance(data, dict) and "noise_levels" not in data and ({"noise_shape", "noise_scale"} & set(data)):
            return {**data, "noise_levels": None}
        return data

    @field_validator("noise_levels")
    @classmethod
    def _positive_levels(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(not (v > 0 and math.isfinite(v)) for v in value)):
            raise ValueError("noise_levels must be a non-empty list of finite values > 0, or null")
        return value


class ReadoutSpec(Strict):
    """Population models: a Bayesian linear readout from the model's features to every unit."""

    prior: ReadoutPrior = Field(default_factory=ReadoutPrior)
    transform: Literal["anscombe", "sqrt", "none"] | None = None
    """Applied to responses before the readout; default anscombe for poisson, none for gaussian."""


class ModelSpec(Strict):
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
