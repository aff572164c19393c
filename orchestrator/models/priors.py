"""Prior distributions for model parameters, built from the protocol's `priors:` entries.

Each prior is a torch distribution plus a bijection to the unconstrained real line, so that
the resample-move step of inference can take random-walk steps without leaving the support.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import distributions as D
from torch.distributions import constraint_registry, constraints, transforms

DTYPE = torch.float64

#: distribution name -> required numeric fields, in the order the torch constructor takes them
PRIOR_FIELDS: dict[str, tuple[str, ...]] = {
    "uniform": ("low", "high"),
    "normal": ("mean", "sd"),
    "lognormal": ("mu", "sigma"),
    "beta": ("alpha", "beta"),
    "gamma": ("shape", "rate"),
    "halfnormal": ("scale",),
    "truncnormal": ("mean", "sd", "low", "high"),
    "fixed": ("value",),
}


class PriorError(ValueError):
    """A prior specification is invalid (message names the field path)."""


def _field(spec: Any, name: str) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(name)
    return getattr(spec, name, None)


class TruncatedNormal(D.Distribution):
    """Normal(mean, sd) restricted to [low, high]; enough API for sampling, log_prob and icdf."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, mean: float, sd: float, low: float, high: float) -> None:
        self.mean_, self.sd, self.low, self.high = (torch.tensor(v, dtype=DTYPE) for v in (mean, sd, low, high))
        self._n = D.Normal(self.mean_, self.sd)
        self._clo = self._n.cdf(self.low)
        self._chi = self._n.cdf(self.high)
        self._logz = torch.log(self._chi - self._clo)
        super().__init__(validate_args=False)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.interval(float(self.low), float(self.high))

    def sample(self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(sample_shape, dtype=DTYPE, generator=generator)
        return self.icdf(u)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        p = self._clo + u * (self._chi - self._clo)
        return self._n.icdf(p.clamp(1e-15, 1 - 1e-15)).clamp(self.low, self.high)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        inside = (value >= self.low) & (value <= self.high)
        lp = self._n.log_prob(value) - self._logz
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))


@dataclass
class Prior:
    """One parameter's prior: sampling, density, median and the unconstraining bijection."""

    dist_name: str
    args: dict[str, float]
    dist: D.Distribution | None  # None for `fixed`

    @property
    def fixed(self) -> bool:
        return self.dist is None

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw n values using inverse-CDF sampling from `generator` (deterministic given its state)."""
        if self.dist is None:
            return torch.full((n,), self.args["value"], dtype=DTYPE)
        u = torch.rand(n, dtype=DTYPE, generator=generator).clamp(1e-12, 1 - 1e-12)
        return self.icdf(u)

    def icdf(self, u: torch.Tensor) -> torch.Tensor:
        """Quantile function (used for sampling and medians; scipy-free and deterministic)."""
        d = self.dist
        if d is None:
            return torch.full_like(u, self.args["value"])
        if isinstance(d, (D.Beta, D.Gamma, D.HalfNormal)):
            import scipy.stats as st

            a = self.args
            if isinstance(d, D.Beta):
                q = st.beta(a["alpha"], a["beta"]).ppf(u.numpy())
            elif isinstance(d, D.Gamma):
                q = st.gamma(a["shape"], scale=1.0 / a["rate"]).ppf(u.numpy())
            else:
                q = st.halfnorm(scale=a["scale"]).ppf(u.numpy())
            return torch.as_tensor(q, dtype=DTYPE)
        return d.icdf(u)

    def median(self) -> float:
        m = self.__dict__.get("_median")
        if m is None:
            m = self.__dict__["_median"] = float(self.icdf(torch.tensor([0.5], dtype=DTYPE))[0])
        return m

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self.dist is None:
            return torch.zeros_like(x)
        sup = self.support()
        inside = sup.check(x)
        safe = torch.where(inside, x, torch.full_like(x, self._inside_point()))
        lp = self.dist.log_prob(safe)
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))

    def support(self) -> constraints.Constraint:
        assert self.dist is not None
        return self.dist.support

    def _inside_point(self) -> float:
        return self.median()

    def to_unconstrained(self) -> transforms.Transform:
        """Bijection real line -> support (call `.inv` to go to the real line)."""
        return constraint_registry.biject_to(self.support())


def make_prior(spec: Any, path: str) -> Prior:
    """Build a Prior from a protocol prior entry (mapping or pydantic object with `dist` + fields)."""
    dist_name = _field(spec, "dist")
    if dist_name is None:
        raise PriorError(f"{path}.dist: missing prior distribution name")
    dist_name = str(dist_name).lower()
    if dist_name not in PRIOR_FIELDS:
        raise PriorError(f"{path}.dist: unknown prior distribution {dist_name!r} (known: {', '.join(PRIOR_FIELDS)})")
    args: dict[str, float] = {}
    for f in PRIOR_FIELDS[dist_name]:
        v = _field(spec, f)
        if v is None:
            raise PriorError(f"{path}.{f}: required for a {dist_name} prior")
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise PriorError(f"{path}.{f}: must be a number, got {v!r}") from None
        if not math.isfinite(v):
            raise PriorError(f"{path}.{f}: must be finite, got {v!r}")
        args[f] = v
    positive = {"sd", "sigma", "alpha", "beta", "shape", "rate", "scale"}
    for f, v in args.items():
        if f in positive and v <= 0:
            raise PriorError(f"{path}.{f}: must be > 0, got {v}")
    if "low" in args and "high" in args and not args["low"] < args["high"]:
        raise PriorError(f"{path}.high: must exceed low ({args['low']} >= {args['high']})")
    t = lambda v: torch.tensor(v, dtype=DTYPE)  # noqa: E731
    dist: D.Distribution | None
    if dist_name == "uniform":
        dist = D.Uniform(t(args["low"]), t(args["high"]))
    elif dist_name == "normal":
        dist = D.Normal(t(args["mean"]), t(args["sd"]))
    elif dist_name == "lognormal":
        dist = D.LogNormal(t(args["mu"]), t(args["sigma"]))
    elif dist_name == "beta":
        dist = D.Beta(t(args["alpha"]), t(args["beta"]))
    elif dist_name == "gamma":
        dist = D.Gamma(t(args["shape"]), t(args["rate"]))
    elif dist_name == "halfnormal":
        dist = D.HalfNormal(t(args["scale"]))
    elif dist_name == "truncnormal":
        dist = TruncatedNormal(args["mean"], args["sd"], args["low"], args["high"])
    else:
        dist = None
    return Prior(dist_name, args, dist)
