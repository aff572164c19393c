"""Baseline designs in the same interface: random, fixed sweep, and a transformed up/down staircase."""
from __future__ import annotations

import time
from typing import Any

import torch

from orchestrator.design.base import BaseStrategy, Decision


class RandomDesign(BaseStrategy):
    """Uniform over the stimulus space within the safety limits (log-uniform for `log: true`)."""

    name = "random"

    def propose(self, comparison: Any, trial_index: int) -> Decision:
        t0 = time.perf_counter()
        pts = self.space.random_design(self.rng(trial_index), self.batch_size)
        return self.finish(pts, "uniform random draw", None, t0)


class SweepDesign(BaseStrategy):
    """Cycles through a fixed list of stimuli.

    settings.stimuli: list of stimulus dicts, or settings.values: list of values of the (single)
    numeric parameter, or settings.points: number of evenly spaced points per dimension (default 10).
    Entries outside the safety limits are a protocol error (reported by `check_settings`).
    """

    name = "sweep"

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> None:
        super().__init__(protocol, seed, settings)
        self.points = self._points()
        key = next((k for k in ("stimuli", "values") if k in self.settings), None)
        for i, z in enumerate(self.points):
            stim = self.space.design_to_stimulus(z)
            given = self.settings[key][i] if key else None
            if key == "values" and stim[self.space.names[0]] != given:
                raise ValueError(f"design.settings.values.{i}: {given!r} is outside the safety limits "
                                 f"{self.protocol.safety_limits().get(self.space.names[0])} or not a valid value")
            if key == "stimuli":
                try:
                    self.protocol.check_safe(dict(given))
                except Exception as exc:  # noqa: BLE001 - reported against the field
                    raise ValueError(f"design.settings.stimuli.{i}: {exc}") from None

    def _points(self) -> torch.Tensor:
        s = self.settings
        if "stimuli" in s:
            return torch.stack([self.space.stimulus_to_design(dict(st)) for st in s["stimuli"]])
        if "values" in s:
            if self.space.d != 1:
                raise ValueError("design.settings.values: only for one-parameter stimuli; use settings.stimuli")
            name = self.space.names[0]
            return torch.stack([self.space.stimulus_to_design({name: v}) for v in s["values"]])
        k = int(s.get("points", 10))
        axes = []
        for dim in self.space.dims:
            if dim.kind == "continuous":
                axes.append(torch.linspace(0, 1, k, dtype=torch.float64))
            else:
                n = int(dim.hi - dim.lo) + 1
                axes.append(torch.unique(torch.linspace(dim.lo, dim.hi, min(k, n), dtype=torch.float64).round()))
        grids = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([g.reshape(-1) for g in grids], -1)

    def propose(self, comparison: Any, trial_index: int) -> Decision:
        t0 = time.perf_counter()
        n = self.points.shape[0]
        idx = [(trial_index * self.batch_size + j) % n for j in range(self.batch_size)]
        return self.finish(self.points[idx], f"fixed sweep point {idx[0] % n + 1} of {n}", None, t0)


class StaircaseDesign(BaseStrategy):
    """Transformed up/down staircase on one numeric parameter (psychometric protocols).

    settings: parameter (default: the first numeric one), start (default: the upper limit),
    step (default: 1/10 of the range; halved at each reversal down to min_step), down (correct
    answers in a row before stepping down, default 2), up (default 1). A binomial response counts
    as correct when value >= n/2. Other parameters are held at the middle of their range/first choice.
    """

    name = "staircase"

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> None:
        super().__init__(protocol, seed, settings)
        numeric = [d for d in self.space.dims if d.kind != "categorical"]
        if not numeric:
            raise ValueError("design.strategy: staircase needs a numeric stimulus parameter")
        pname = self.settings.get("parameter", numeric[0].name)
        if pname not in self.space.index:
            raise ValueError(f"design.settings.parameter: {pname!r} is not a stimulus parameter")
        self.dim = self.space.dims[self.space.index[pname]]
        rng = self.dim.hi - self.dim.lo
        self.start = float(self.settings.get("start", self.dim.hi))
        self.step0 = float(self.settings.get("step", rng / 10.0))
        self.min_step = float(self.settings.get("min_step", self.step0 / 8.0))
        self.down = int(self.settings.get("down", 2))
        self.up = int(self.settings.get("up", 1))

    def _level(self, comparison: Any) -> tuple[float, int]:
        """Replay the observation history (deterministic, resume-safe) to get the current level."""
        level, step, n_right, n_wrong, last_dir, reversals = self.start, self.step0, 0, 0, 0, 0
        col = self.space.index[self.dim.name]
        n = getattr(self.protocol.response, "n", None) or 1
        for x, y in getattr(comparison, "history", []):
            level = float(x[col])  # the stimulus actually shown is the reference (robust to resumes)
            correct = y >= n / 2.0 if n > 1 else y >= 0.5
            move = 0
            if correct:
                n_right, n_wrong = n_right + 1, 0
                if n_right >= self.down:
                    move, n_right = -1, 0
            else:
                n_right, n_wrong = 0, n_wrong + 1
                if n_wrong >= self.up:
                    move, n_wrong = 1, 0
            if move:
                if last_dir and move != last_dir:
                    reversals += 1
                    step = max(step / 2.0, self.min_step)
                last_dir = move
                level = min(max(level + move * step, self.dim.lo), self.dim.hi)
        return level, reversals

    def propose(self, comparison: Any, trial_index: int) -> Decision:
        t0 = time.perf_counter()
        level, reversals = self._level(comparison)
        z = self.space.stimulus_to_design(self._fill(level))
        pts = z.unsqueeze(0).repeat(self.batch_size, 1)
        return self.finish(pts, f"{self.down}-down/{self.up}-up staircase at {level:g} ({reversals} reversals)", None, t0)

    def _fill(self, level: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for dim in self.space.dims:
            if dim.kind == "categorical":
                out[dim.name] = dim.allowed[0]
            elif dim is self.dim:
                out[dim.name] = round(level) if dim.kind == "integer" else level
            else:
                mid = (dim.lo + dim.hi) / 2
                out[dim.name] = round(mid) if dim.kind == "integer" else mid
        return out
