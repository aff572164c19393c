"""The response section of a protocol: scalar kinds and population vectors, and their validation."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from orchestrator.protocol_schema.base import Strict


class InvalidResponse(ValueError):
    """A response that must not reach the models (NaN, wrong type, out of range)."""


#: Plausible ranges of a response value when the protocol gives none (`response.low` / `response.high`
#: widen or narrow them). A value outside is stored as `invalid` and never reaches the models: one
#: absurd value (a counter overflow, 2**64-1) must not stall inference or a resume that replays it.
DEFAULT_RESPONSE_RANGE: dict[str, tuple[float, float]] = {
    "poisson": (0.0, 1e6),
    "gaussian": (-1e9, 1e9),
}


class ResponseSpec(Strict):
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


class PopulationResponseSpec(Strict):
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
