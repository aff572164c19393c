"""Built-in encoding models (one small class each). Angles are in degrees; orientation has period 180.

Each class declares its parameters' meaning, unit and natural axis and its inputs' units, which
`orchestrator.models.builtin_catalogue()` lists; `BUILTIN_MODELS` at the end is the id table.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from orchestrator.models.base import EncodingModel, ParameterInfo as P, VariableInfo as V

T = Mapping[str, torch.Tensor]
DEG = math.pi / 180.0

# declarations that several models share (the catalogue shows the same text for each)
_INTERVAL = V("t", "retention interval", "s")
_THETA = V("theta", "grating orientation (period 180)", "deg")
_CONTRAST = V("c", "Michelson contrast", "contrast (0-1)")
_RECALL_AT_ZERO = P("a", "recall probability at t = 0", "", "linear")
_NULL_BASELINE = P("baseline", "response to the null orientation", "response units", "linear")
_AMPLITUDE = P("amplitude", "peak response above baseline", "response units", "linear")
_PREF = P("pref", "preferred orientation", "deg", "linear")
_SPONTANEOUS = P("baseline", "spontaneous response", "response units", "linear")
_RMAX = P("rmax", "peak response above baseline", "response units", "linear")
_KAPPA = P("kappa", "orientation tuning concentration", "", "log")


def _von_mises(theta: torch.Tensor, pref: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """Orientation tuning in (0, 1], peak 1 at `pref` (period 180 deg)."""
    return torch.exp(kappa * (torch.cos(2 * (theta - pref) * DEG) - 1))


def _circ_diff(theta: torch.Tensor, pref: torch.Tensor) -> torch.Tensor:
    """Smallest orientation difference in degrees (period 180), differentiable almost everywhere."""
    d = torch.remainder(theta - pref + 90.0, 180.0) - 90.0
    return d


def _naka_rushton(c: torch.Tensor, c50: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    cn = c.clamp_min(0) ** n
    return cn / (cn + c50 ** n)


# ---------------------------------------------------------------- memory retention
class RetentionPower(EncodingModel):
    id = "retention_power"
    parameters = ("a", "b")
    variables = ("t",)
    parameter_info = (
        _RECALL_AT_ZERO,
        P("b", "power-law decay exponent", "", "log"),
    )
    variable_info = (
        _INTERVAL,
    )
    doc = "p = a (t+1)^-b  (Wickelgren-style power forgetting)"

    def mean(self, x: T, th: T) -> torch.Tensor:
        return th["a"] * (x["t"] + 1.0) ** (-th["b"])


class RetentionExponential(EncodingModel):
    id = "retention_exponential"
    parameters = ("a", "b")
    variables = ("t",)
    parameter_info = (
        _RECALL_AT_ZERO,
        P("b", "exponential decay rate", "1/s", "log"),
    )
    variable_info = (
        _INTERVAL,
    )
    doc = "p = a exp(-b t)"

    def mean(self, x: T, th: T) -> torch.Tensor:
        return th["a"] * torch.exp(-th["b"] * x["t"])


# ---------------------------------------------------------------- orientation tuning
class OrientationVonMises(EncodingModel):
    id = "orientation_von_mises"
    parameters = ("baseline", "amplitude", "kappa", "pref")
    variables = ("theta",)
    parameter_info = (
        _NULL_BASELINE,
        _AMPLITUDE,
        P("kappa", "tuning concentration (larger = narrower)", "", "log"),
        _PREF,
    )
    variable_info = (
        _THETA,
    )
    doc = "r = baseline + amplitude exp(kappa (cos 2(theta-pref) - 1))"

    def mean(self, x: T, th: T) -> torch.Tensor:
        return th["baseline"] + th["amplitude"] * _von_mises(x["theta"], th["pref"], th["kappa"])


class OrientationGaussian(EncodingModel):
    id = "orientation_gaussian"
    parameters = ("baseline", "amplitude", "width", "pref")
    variables = ("theta",)
    parameter_info = (
        _NULL_BASELINE,
        _AMPLITUDE,
        P("width", "tuning width (SD)", "deg", "log"),
        _PREF,
    )
    variable_info = (
        _THETA,
    )
    doc = "r = baseline + amplitude exp(-d^2 / (2 width^2)), d circular orientation difference"

    def mean(self, x: T, th: T) -> torch.Tensor:
        d = _circ_diff(x["theta"], th["pref"])
        return th["baseline"] + th["amplitude"] * torch.exp(-0.5 * (d / th["width"]) ** 2)


# ---------------------------------------------------------------- contrast response
class ContrastNakaRushton(EncodingModel):
    id = "contrast_naka_rushton"
    parameters = ("baseline", "rmax", "c50", "n")
    variables = ("c",)
    parameter_info = (
        P("baseline", "response at zero contrast", "response units", "linear"),
        P("rmax", "saturated response above baseline", "response units", "linear"),
        P("c50", "semi-saturation contrast", "contrast (0-1)", "log"),
        P("n", "exponent (steepness)", "", "log"),
    )
    variable_info = (
        _CONTRAST,
    )
    doc = "r = baseline + rmax c^n / (c^n + c50^n)"

    def mean(self, x: T, th: T) -> torch.Tensor:
        return th["baseline"] + th["rmax"] * _naka_rushton(x["c"], th["c50"], th["n"])


class ContrastLinearThreshold(EncodingModel):
    id = "contrast_linear_threshold"
    parameters = ("baseline", "slope", "threshold")
    variables = ("c",)
    parameter_info = (
        P("baseline", "response below threshold", "response units", "linear"),
        P("slope", "response gain per unit contrast above threshold", "response units", "linear"),
        P("threshold", "contrast threshold", "contrast (0-1)", "linear"),
    )
    variable_info = (
        _CONTRAST,
    )
    doc = "r = baseline + slope max(c - threshold, 0) (softplus-smoothed for gradients)"

    def mean(self, x: T, th: T) -> torch.Tensor:
        # a very sharp softplus keeps the gradient in the stimulus non-zero for the optimizer
        return th["baseline"] + th["slope"] * torch.nn.functional.softplus(x["c"] - th["threshold"], beta=200.0)


# ---------------------------------------------------------------- orientation x contrast
class OrientationContrast(EncodingModel):
    id = "orientation_contrast"
    parameters = ("baseline", "rmax", "kappa", "pref", "c50", "n")
    variables = ("theta", "c")
    parameter_info = (
        _SPONTANEOUS,
        _RMAX,
        _KAPPA,
        _PREF,
        P("c50", "semi-saturation contrast", "contrast (0-1)", "log"),
        P("n", "contrast exponent", "", "log"),
    )
    variable_info = (
        _THETA,
        _CONTRAST,
    )
    doc = "r = baseline + rmax vonMises(theta; pref, kappa) c^n/(c^n + c50^n)  (separable tuning x contrast)"

    def mean(self, x: T, th: T) -> torch.Tensor:
        tune = _von_mises(x["theta"], th["pref"], th["kappa"])
        return th["baseline"] + th["rmax"] * tune * _naka_rushton(x["c"], th["c50"], th["n"])


class DivisiveNormalization(EncodingModel):
    id = "divisive_normalization"
    parameters = ("baseline", "rmax", "kappa", "pref", "sigma", "n")
    variables = ("theta", "c")
    parameter_info = (
        _SPONTANEOUS,
        _RMAX,
        _KAPPA,
        _PREF,
        P("sigma", "semi-saturation constant of the normalization pool", "contrast (0-1)", "log"),
        P("n", "exponent", "", "log"),
    )
    variable_info = (
        _THETA,
        _CONTRAST,
    )
    doc = "r = baseline + rmax (c vonMises)^n / (sigma^n + c^n): tuned drive over an untuned pool"

    def mean(self, x: T, th: T) -> torch.Tensor:
        c = x["c"].clamp_min(0)
        drive = (c * _von_mises(x["theta"], th["pref"], th["kappa"])) ** th["n"]
        return th["baseline"] + th["rmax"] * drive / (th["sigma"] ** th["n"] + c ** th["n"])


# ---------------------------------------------------------------- psychometric functions
class _Psychometric(EncodingModel):
    parameters = ("threshold", "slope", "guess", "lapse")
    variables = ("x",)
    parameter_info = (
        P("threshold", "stimulus level at the curve's midpoint", "stimulus units", "linear"),
        P("slope", "steepness", "1/stimulus units", "log"),
        P("guess", "guess rate (lower asymptote)", "probability", "linear"),
        P("lapse", "lapse rate (1 - upper asymptote)", "probability", "linear"),
    )
    variable_info = (
        V("x", "stimulus intensity", "stimulus units"),
    )

    def core(self, x: torch.Tensor, th: T) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, x: T, th: T) -> torch.Tensor:
        return th["guess"] + (1 - th["guess"] - th["lapse"]) * self.core(x["x"], th)


class PsychometricLogistic(_Psychometric):
    id = "psychometric_logistic"
    doc = "p = guess + (1-guess-lapse) / (1 + exp(-slope (x - threshold)))"

    def core(self, x: torch.Tensor, th: T) -> torch.Tensor:
        return torch.sigmoid(th["slope"] * (x - th["threshold"]))


class PsychometricWeibull(_Psychometric):
    id = "psychometric_weibull"
    doc = "p = guess + (1-guess-lapse) (1 - exp(-(x/threshold)^slope)), x > 0"

    def core(self, x: torch.Tensor, th: T) -> torch.Tensor:
        return 1 - torch.exp(-((x.clamp_min(0) / th["threshold"]) ** th["slope"]))


class PsychometricCumulativeNormal(_Psychometric):
    id = "psychometric_cumulative_normal"
    doc = "p = guess + (1-guess-lapse) Phi(slope (x - threshold))"

    def core(self, x: torch.Tensor, th: T) -> torch.Tensor:
        return 0.5 * (1 + torch.erf(th["slope"] * (x - th["threshold"]) / math.sqrt(2)))


# ---------------------------------------------------------------- delay discounting
class _Discounting(EncodingModel):
    parameters = ("k", "tau")
    variables = ("r_ss", "t_ss", "r_ll", "t_ll")
    parameter_info = (
        P("k", "discount rate", "1/delay unit", "log"),
        P("tau", "choice sensitivity (inverse temperature)", "1/reward unit", "log"),
    )
    variable_info = (
        V("r_ss", "smaller-sooner reward", "reward units"),
        V("t_ss", "smaller-sooner delay", "delay units"),
        V("r_ll", "larger-later reward", "reward units"),
        V("t_ll", "larger-later delay", "delay units"),
    )

    def discount(self, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, x: T, th: T) -> torch.Tensor:
        v_ll = x["r_ll"] * self.discount(x["t_ll"], th["k"])
        v_ss = x["r_ss"] * self.discount(x["t_ss"], th["k"])
        return torch.sigmoid(th["tau"] * (v_ll - v_ss))


class DiscountingExponential(_Discounting):
    id = "discounting_exponential"
    doc = "P(choose later-larger) = sigmoid(tau (r_ll e^{-k t_ll} - r_ss e^{-k t_ss}))"

    def discount(self, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.exp(-k * t)


class DiscountingHyperbolic(_Discounting):
    id = "discounting_hyperbolic"
    doc = "P(choose later-larger) = sigmoid(tau (r_ll/(1+k t_ll) - r_ss/(1+k t_ss)))"

    def discount(self, t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 + k * t)


#: model id -> class, every concrete builtin (the registry reads this; importing registers nothing)
BUILTIN_MODELS: dict[str, type[EncodingModel]] = {cls.id: cls for cls in (
    RetentionPower, RetentionExponential, OrientationVonMises, OrientationGaussian, ContrastNakaRushton,
    ContrastLinearThreshold, OrientationContrast, DivisiveNormalization, PsychometricLogistic,
    PsychometricWeibull, PsychometricCumulativeNormal, DiscountingExponential, DiscountingHyperbolic)}
