"""Gradient synthesis of the most discriminating image, kept where the models were fitted.

Pixels are parametrised as x = lo + (hi - lo) sigmoid(z), so every iterate is inside the pixel
limits; Adam climbs the acquisition from several starts (the best pool images and seeded random
ones), all starts as one batch through each network. Each start keeps its best iterate, and the
climb stops early once no start has improved for ``patience`` steps. Unconstrained, synthesis wins by driving one model's features far beyond anything in the
pool, where its linear readout extrapolates and real neurons saturate. So the objective carries a
penalty on every model's feature energy leaving its pool range (times ``1 + margin``), and the
result is then made feasible exactly: it is blended back towards its start, x(t) = s + t (x - s),
with the largest t in {1, 1/2, 1/4, ...} for which the quantised image meets the safety limits
(pixel range, mean luminance, RMS contrast: convex, and the start meets them) and the trust region.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from orchestrator.neural.acquisition import ReadoutSnapshot, discrimination_from_features
from orchestrator.neural.features import FeatureModel
from orchestrator.neural.numerics import without_denormals


@dataclass(frozen=True)
class SynthesisSettings:
    steps: int = 40
    lr: float = 0.08
    margin: float = 0.0
    """Allowed feature energy: up to (1 + margin) x the pool's largest, down to the pool's smallest / (1 + margin)."""
    penalty: float = 50.0
    patience: int = 4
    """Stop after this many steps in which no start improved its best objective by `tolerance` (relative)."""
    tolerance: float = 1e-3


@dataclass
class Synthesized:
    pixels: np.ndarray  # (H, W[, C]) floats, on the uint8 grid
    score: float
    start: int  # pool index of the start it came from (-1: a random start)
    blend: float  # t of the final blend towards the start (1 = the optimiser's image)
    energy_ratio: float  # max over models of energy / pool max


class _Adam:
    """Adam (Kingma & Ba 2015, torch's defaults: betas 0.9 / 0.999, eps 1e-8) on one tensor.

    Written out because constructing torch.optim.Adam the first time imports torch's compiler
    stack, seconds that would land on a session's first synthesized trial."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.param, self.lr, self.betas, self.eps = param, float(lr), betas, float(eps)
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        g = self.param.grad
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v.sqrt() / (1 - b2 ** self.t) ** 0.5).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1 ** self.t))


def _inside(models: Sequence[FeatureModel], images: torch.Tensor,
            margin: float) -> tuple[bool, float, list[torch.Tensor]]:
    """Whether one image is inside every model's trust region, the largest energy ratio, and the
    models' standardised features (one network pass per model serves both)."""
    ratio, ok, feats = 0.0, True, []
    with torch.no_grad():
        for fm in models:
            raw = fm.raw(images).to(torch.float64)
            e = float((raw ** 2).mean(dim=1)[0] / fm._energy_norm)
            feats.append(torch.cat([(raw - fm.center) / fm.scale, torch.ones(raw.shape[0], 1, dtype=raw.dtype)], 1))
            lo, hi = fm.energy_range
            ratio = max(ratio, e / hi)
            ok = ok and lo / (1 + margin) - 1e-9 <= e <= hi * (1 + margin) + 1e-9
    return ok, ratio, feats


@without_denormals
def synthesize(models: Sequence[FeatureModel], snaps: Sequence[ReadoutSnapshot], starts: torch.Tensor,
               start_ids: Sequence[int], protocol: Any, settings: SynthesisSettings) -> Synthesized:
    """Climb the acquisition from `starts` (K, C, H, W) and return the best feasible image."""
    limits = protocol.image_limits()
    lo, hi = limits["pixel"]
    span = hi - lo
    x0 = starts.to(torch.float32).clamp(lo + 1e-3 * span, hi - 1e-3 * span)
    z = torch.logit((x0 - lo) / span).detach().requires_grad_(True)
    adam = _Adam(z, settings.lr)
    mean_lo, mean_hi = limits["mean_luminance"]
    contrast_hi = limits["rms_contrast"][1]
    best_obj = torch.full((x0.shape[0],), -torch.inf, dtype=torch.float64)
    best_x = x0.clone()
    stalled = 0
    for step in range(settings.steps + 1):  # the last pass only evaluates the final step's image
        z.grad = None
        x = lo + span * torch.sigmoid(z)
        feats, penalty = [], torch.zeros(x.shape[0], dtype=torch.float64)
        for fm in models:
            raw = fm.raw(x).to(torch.float64)
            feats.append(torch.cat([(raw - fm.center) / fm.scale, torch.ones(raw.shape[0], 1, dtype=raw.dtype)], 1))
            energy = (raw ** 2).mean(1) / fm._energy_norm
            e_lo, e_hi = fm.energy_range
            penalty = penalty + torch.relu(energy / (e_hi * (1 + settings.margin)) - 1) ** 2
            penalty = penalty + torch.relu(1 - energy * (1 + settings.margin) / e_lo) ** 2
        flat = x.flatten(1).to(torch.float64)
        m, c = flat.mean(1), flat.std(1)
        penalty = penalty + (torch.relu(mean_lo - m) ** 2 + torch.relu(m - mean_hi) ** 2
                             + torch.relu(c - contrast_hi) ** 2) * 100.0
        score = discrimination_from_features(feats, snaps)
        objective = score - settings.penalty * penalty
        with torch.no_grad():  # keep every start's best iterate, not just its last
            gain = objective.detach() - best_obj
            better = gain > 0
            best_x[better] = x.detach()[better]
            floor = torch.where(torch.isfinite(best_obj), settings.tolerance * best_obj.abs(), torch.zeros_like(best_obj))
            improved = bool((gain > floor).any())
            best_obj = torch.where(better, objective.detach(), best_obj)
        stalled = 0 if improved else stalled + 1
        if stalled >= settings.patience or step == settings.steps:
            break
        (-objective.sum()).backward()
        adam.step()
    final = best_x
    best: Synthesized | None = None
    for k in range(final.shape[0]):
        cand = _feasible(models, snaps, x0[k], final[k], protocol, settings.margin)
        if cand is not None and (best is None or cand[1] > best.score):
            best = Synthesized(cand[0], cand[1], int(start_ids[k]), cand[2], cand[3])
    assert best is not None  # t = 0 (the start itself) is always feasible
    return best


def _to_layout(img: torch.Tensor) -> np.ndarray:
    arr = img.numpy().astype(np.float64)
    return arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)


def _feasible(models: Sequence[FeatureModel], snaps: Sequence[ReadoutSnapshot], start: torch.Tensor,
              end: torch.Tensor, protocol: Any, margin: float) -> tuple[np.ndarray, float, float, float] | None:
    from orchestrator.protocol import SafetyViolation

    t = 1.0
    while t >= 1.0 / 1024:
        img = start + t * (end - start)
        pixels = np.round(_to_layout(img) * 255.0) / 255.0
        try:
            protocol.check_image(pixels)
        except SafetyViolation:
            t /= 2
            continue
        tensor = torch.from_numpy(pixels.astype(np.float32))
        tensor = tensor[None, None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)[None]
        ok, ratio, feats = _inside(models, tensor, margin)
        if ok:
            with torch.no_grad():
                score = float(discrimination_from_features(feats, snaps)[0])
            return pixels, score, t, ratio
        t /= 2
    pixels = np.round(_to_layout(start) * 255.0) / 255.0
    tensor = torch.from_numpy(pixels.astype(np.float32))
    tensor = tensor[None, None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)[None]
    _, ratio, feats = _inside(models, tensor, margin)
    with torch.no_grad():
        score = float(discrimination_from_features(feats, snaps)[0])
    return pixels, score, 0.0, ratio
