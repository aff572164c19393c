"""Numeric encoding of a protocol's stimulus space, shared by the models and the design code.

Two coordinate systems:
- *raw* values (what models see): continuous and integer values as they are; categorical values are
  the choice itself when numeric, else the choice's index in `choices`.
- *design* coordinates (what optimizers see): continuous dims scaled to [0, 1] over the safety
  limits (after log for `log: true`), integer dims as the integer value, categorical dims as the
  index into the safety allow-list. Their bounds are always inside the safety limits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

DTYPE = torch.float64


@dataclass(frozen=True)
class Dim:
    name: str
    kind: str  # continuous | integer | categorical
    lo: float  # safety-limited raw bounds (numeric kinds)
    hi: float
    log: bool = False
    allowed: tuple[Any, ...] = ()  # categorical: safety allow-list
    codes: tuple[float, ...] = ()  # categorical: raw numeric code of each allowed choice


class StimulusEncoding:
    """Maps stimulus dicts <-> raw tensors <-> design coordinates for one protocol."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        limits = protocol.safety_limits()
        dims: list[Dim] = []
        for name, spec in protocol.stimulus.parameters.items():
            if spec.kind == "categorical":
                allowed = tuple(protocol.allowed_choices(name))
                choices = list(spec.choices)
                numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)
                codes = tuple(float(c) if numeric else float(choices.index(c)) for c in allowed)
                dims.append(Dim(name, "categorical", 0.0, float(len(allowed) - 1), allowed=allowed, codes=codes))
            elif spec.kind == "integer":
                lo, hi = limits[name]
                dims.append(Dim(name, "integer", float(math.ceil(lo)), float(math.floor(hi))))
            else:
                lo, hi = limits[name]
                dims.append(Dim(name, "continuous", float(lo), float(hi), log=bool(getattr(spec, "log", False))))
        self.dims = tuple(dims)
        self.names = tuple(d.name for d in dims)
        self.index = {d.name: i for i, d in enumerate(dims)}

    @property
    def d(self) -> int:
        return len(self.dims)

    # -- bounds and enumeration --------------------------------------------------------------
    def design_bounds(self) -> torch.Tensor:
        """2 x d bounds in design coordinates."""
        lo, hi = [], []
        for dim in self.dims:
            if dim.kind == "continuous":
                lo.append(0.0)
                hi.append(1.0)
            else:
                lo.append(dim.lo)
                hi.append(dim.hi)
        return torch.tensor([lo, hi], dtype=DTYPE)

    def discrete_dims(self) -> list[int]:
        return [i for i, d in enumerate(self.dims) if d.kind != "continuous"]

    def n_discrete_combinations(self) -> int:
        n = 1
        for i in self.discrete_dims():
            n *= int(self.dims[i].hi - self.dims[i].lo) + 1
        return n

    def enumerate_discrete(self) -> torch.Tensor:
        """All combinations of the discrete dims in design coordinates (only for all-discrete spaces)."""
        axes = [torch.arange(int(d.lo), int(d.hi) + 1, dtype=DTYPE) for d in self.dims]
        grids = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([g.reshape(-1) for g in grids], dim=-1)

    def enumerate_discrete_subset(self, dims: list[int]) -> torch.Tensor:
        """All combinations of the given discrete dims (values in design coordinates), (n, len(dims))."""
        axes = [torch.arange(int(self.dims[i].lo), int(self.dims[i].hi) + 1, dtype=DTYPE) for i in dims]
        grids = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([g.reshape(-1) for g in grids], dim=-1)

    # -- conversions -------------------------------------------------------------------------
    def design_to_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Design coordinates (..., d) -> raw model values (..., d); differentiable in continuous dims."""
        cols = []
        for i, dim in enumerate(self.dims):
            c = z[..., i]
            if dim.kind == "continuous":
                if dim.log:
                    a, b = math.log(dim.lo), math.log(dim.hi)
                    c = torch.exp(a + c * (b - a))
                else:
                    c = dim.lo + c * (dim.hi - dim.lo)
            elif dim.kind == "categorical":
                codes = torch.tensor(dim.codes, dtype=z.dtype)
                idx = c.detach().round().clamp(0, len(dim.codes) - 1).long()
                c = codes[idx]
            cols.append(c)
        return torch.stack(cols, dim=-1)

    def raw_to_unit(self, X: torch.Tensor) -> torch.Tensor:
        """Raw values (..., d) -> [0, 1] per dim (log scale for log dims); input space of the GP."""
        cols = []
        for i, dim in enumerate(self.dims):
            c = X[..., i]
            if dim.kind == "categorical":
                lo, hi = min(dim.codes), max(dim.codes)
                cols.append((c - lo) / (hi - lo) if hi > lo else c * 0)
            elif dim.log:
                a, b = math.log(dim.lo), math.log(dim.hi)
                cols.append((torch.log(c.clamp_min(dim.lo * 1e-3)) - a) / (b - a) if b > a else c * 0)
            else:
                cols.append((c - dim.lo) / (dim.hi - dim.lo) if dim.hi > dim.lo else c * 0)
        return torch.stack(cols, dim=-1)

    def design_to_stimulus(self, z: torch.Tensor) -> dict[str, Any]:
        """One design point (d,) -> stimulus dict, clipped into the safety limits and rounded."""
        out: dict[str, Any] = {}
        zz = z.detach().to(DTYPE).reshape(-1)
        raw = self.design_to_raw(zz.clamp(self.design_bounds()[0], self.design_bounds()[1]))
        for i, dim in enumerate(self.dims):
            if dim.kind == "categorical":
                out[dim.name] = dim.allowed[int(round(float(zz[i].clamp(0, len(dim.allowed) - 1))))]
            elif dim.kind == "integer":
                out[dim.name] = int(min(max(round(float(zz[i])), dim.lo), dim.hi))
            else:
                out[dim.name] = float(min(max(float(raw[i]), dim.lo), dim.hi))
        return out

    def stimulus_to_raw(self, stimulus: dict[str, Any]) -> torch.Tensor:
        """Stimulus dict -> raw tensor (d,). Unknown or missing parameters raise ValueError."""
        missing = [n for n in self.names if n not in stimulus]
        if missing:
            raise ValueError(f"stimulus is missing parameter(s) {missing}")
        vals = []
        for dim in self.dims:
            v = stimulus[dim.name]
            if dim.kind == "categorical":
                spec = self.protocol.stimulus.parameters[dim.name]
                choices = list(spec.choices)
                if v not in choices:
                    raise ValueError(f"stimulus.{dim.name}={v!r} is not one of {choices}")
                numeric = all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)
                vals.append(float(v) if numeric else float(choices.index(v)))
            else:
                vals.append(float(v))
        return torch.tensor(vals, dtype=DTYPE)

    def stimulus_to_design(self, stimulus: dict[str, Any]) -> torch.Tensor:
        vals = []
        for dim in self.dims:
            v = stimulus[dim.name]
            if dim.kind == "categorical":
                vals.append(float(dim.allowed.index(v)))
            elif dim.kind == "integer":
                vals.append(float(v))
            elif dim.log:
                a, b = math.log(dim.lo), math.log(dim.hi)
                vals.append((math.log(float(v)) - a) / (b - a) if b > a else 0.0)
            else:
                vals.append((float(v) - dim.lo) / (dim.hi - dim.lo) if dim.hi > dim.lo else 0.0)
        return torch.tensor(vals, dtype=DTYPE)

    def random_design(self, rng: np.random.Generator, n: int = 1) -> torch.Tensor:
        """Uniform draws in design coordinates (log-uniform for log dims; integers inclusive)."""
        cols = []
        for dim in self.dims:
            if dim.kind == "continuous":
                cols.append(rng.random(n))
            else:
                cols.append(rng.integers(int(dim.lo), int(dim.hi) + 1, size=n).astype(float))
        return torch.tensor(np.stack(cols, axis=-1), dtype=DTYPE)
