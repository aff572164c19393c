"""Design strategies for population protocols: synthesized, best-of-pool, random-pool, random noise.

Each ``propose(comparison, trial_index)`` returns an ``ImageDecision`` whose stimulus is
``{"image": sha256}`` and which carries the pixels (the engine stores them before planning the
trial). Everything is a function of the seed, the trial index and the readout states, so a resumed
session that replays its history proposes the same next image.

Pipelining (``population_synthesis``, setting ``pipeline: true``, the default): the image for trial
t is computed from the readouts as they were before the latest trial (a lag of one). That
snapshot exists as soon as trial t-1 is proposed, so synthesis for t starts in a background thread
at the end of propose(t-1) and runs while t-1 is presented; propose(t) only collects it. If the
background result does not match (a failed trial in between), the same computation runs inline from
the same lagged snapshot, so the image never depends on timing.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from orchestrator.artifacts import image_sha256, to_uint8
from orchestrator.design.base import Decision
from orchestrator.neural.acquisition import ReadoutSnapshot, discrimination_from_features
from orchestrator.neural.features import pool_tensor
from orchestrator.neural.synthesis import SynthesisSettings, synthesize


@dataclass(frozen=True)
class ImageDecision(Decision):
    """A Decision for an image stimulus: the pixels travel with it until they are stored."""

    pixels: Any = None  # uint8 (H, W[, C])
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "image": self.info}


def _decide(pixels: np.ndarray, strategy: str, reason: str, score: float | None, t0: float,
            info: dict[str, Any]) -> ImageDecision:
    arr = to_uint8(pixels)
    return ImageDecision(stimulus={"image": image_sha256(arr)}, strategy=strategy, reason=reason, score=score,
                         compute_ms=(time.perf_counter() - t0) * 1000.0, pixels=arr, info=info)


class PopulationStrategy:
    """Common plumbing: settings, the per-trial RNG, the pool's features, safety at the exit."""

    name = "population"
    known_settings: frozenset[str] = frozenset()

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> None:
        if not getattr(protocol, "is_population", False):
            raise ValueError(f"design.strategy: {self.name!r} needs a population protocol (image stimuli)")
        self.protocol, self.seed = protocol, int(seed)
        self.settings = dict(settings or {})
        unknown = set(self.settings) - self.known_settings
        if unknown:
            raise ValueError(f"design.settings: unknown setting(s) {sorted(unknown)} for {self.name!r}; "
                             f"known: {sorted(self.known_settings)}")
        self._pool_feats: list[torch.Tensor] | None = None
        self._pool_flat: np.ndarray | None = None
        self._pool_sq: np.ndarray | None = None
        self._pool_feats32: list[torch.Tensor] | None = None

    def rng(self, trial_index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, trial_index, 0xD6])

    def pool_features(self, comparison: Any) -> list[torch.Tensor]:
        """Every model's features of every pool image (computed once)."""
        if self._pool_feats is None:
            self._pool_feats = [c.features.pool_features for c in comparison.candidates]
            self._pool_flat = np.ascontiguousarray(comparison.pool.reshape(len(comparison.pool), -1), dtype=np.float64)
            self._pool_sq = (self._pool_flat ** 2).sum(1)
        return self._pool_feats

    def pool_distance(self, pixels: np.ndarray) -> float:
        """RMS pixel distance from the image to its nearest pool image (0 = a pool image).

        Candidates come from |p|^2 - 2 p.x + |x|^2 (one matrix-vector product); the nearest few are
        then measured directly, so a pool image is at exactly 0."""
        assert self._pool_flat is not None
        flat = np.asarray(pixels, dtype=np.float64).reshape(-1) / (255.0 if pixels.dtype == np.uint8 else 1.0)
        approx = self._pool_sq - 2.0 * (self._pool_flat @ flat) + flat @ flat
        near = np.argpartition(approx, min(7, len(approx) - 1))[:8]
        return float(np.sqrt(((self._pool_flat[near] - flat) ** 2).mean(1).min()))

    def snapshots(self, comparison: Any, lagged: bool = False) -> list[ReadoutSnapshot]:
        return [ReadoutSnapshot.of(st, log_prob) for st, log_prob in comparison.design_states(lagged=lagged)]

    def finish(self, decision: ImageDecision) -> ImageDecision:
        self.protocol.check_image(decision.pixels)  # a bug in a design, never a stimulus on the rig
        return decision


class RandomNoiseDesign(PopulationStrategy):
    """White noise at the mean luminance and the largest allowed contrast (a baseline)."""

    name = "population_random_noise"
    known_settings = frozenset({"contrast"})

    def propose(self, comparison: Any, trial_index: int) -> ImageDecision:
        t0 = time.perf_counter()
        limits = self.protocol.image_limits()
        lo_m, hi_m = limits["mean_luminance"]
        mean = min(max(0.5, lo_m), hi_m)
        contrast = float(self.settings.get("contrast", 0.8 * limits["rms_contrast"][1]))
        noise = self.rng(trial_index).standard_normal(self.protocol.stimulus.shape)
        lo, hi = limits["pixel"]
        img = np.clip(mean + contrast * noise / noise.std(), lo, hi)
        img = np.round(img * 255) / 255
        self.pool_features(comparison)
        return self.finish(_decide(img, self.name, "random noise image", None, t0,
                                   {"source": "noise", "pool_distance": self.pool_distance(img)}))


class RandomPoolDesign(PopulationStrategy):
    """A pool image drawn uniformly (a baseline)."""

    name = "population_random_pool"

    def propose(self, comparison: Any, trial_index: int) -> ImageDecision:
        t0 = time.perf_counter()
        i = int(self.rng(trial_index).integers(len(comparison.pool)))
        return self.finish(_decide(comparison.pool[i], self.name, f"pool image {i} at random", None, t0,
                                   {"source": "pool", "pool_index": i, "pool_distance": 0.0}))


class BestOfPoolDesign(PopulationStrategy):
    """The pool image with the highest discrimination bound under the current readouts."""

    name = "population_pool"

    def scores(self, comparison: Any, snaps: list[ReadoutSnapshot]) -> torch.Tensor:
        """The bound at every pool image. The moments come from single-precision products (the
        pool's quadratic forms are most of the cost; 1e-6 relative error only reorders near-ties,
        the same way on every run); the bound itself is computed in double precision."""
        if self._pool_feats32 is None:
            self._pool_feats32 = [f.to(torch.float32) for f in self.pool_features(comparison)]
        return discrimination_from_features(self._pool_feats32, snaps)

    def propose(self, comparison: Any, trial_index: int) -> ImageDecision:
        t0 = time.perf_counter()
        scores = self.scores(comparison, self.snapshots(comparison))
        i = int(torch.argmax(scores))
        return self.finish(_decide(comparison.pool[i], self.name, f"pool image {i}: best of {len(scores)}",
                                   float(scores[i]), t0, {"source": "pool", "pool_index": i, "pool_distance": 0.0}))


class SynthesisDesign(BestOfPoolDesign):
    """Gradient synthesis from the best pool images, inside the models' trust region, pipelined."""

    name = "population_synthesis"
    known_settings = frozenset({"starts", "random_starts", "steps", "lr", "margin", "pipeline"})

    def __init__(self, protocol: Any, seed: int, settings: dict[str, Any] | None = None) -> None:
        super().__init__(protocol, seed, settings)
        s = self.settings
        self.starts, self.random_starts = int(s.get("starts", 3)), int(s.get("random_starts", 1))
        self.synth = SynthesisSettings(steps=int(s.get("steps", 30)), lr=float(s.get("lr", 0.08)),
                                       margin=float(s.get("margin", 0.0)))
        self.pipeline = bool(s.get("pipeline", True))
        if self.starts + self.random_starts < 1 or self.synth.steps < 0 or self.synth.margin < 0:
            raise ValueError("design.settings: starts + random_starts must be >= 1; steps and margin >= 0")
        self._pending: tuple[tuple[int, int], threading.Thread, dict[str, Any]] | None = None

    def _compute(self, comparison: Any, snaps: list[ReadoutSnapshot], trial_index: int,
                 pending: list[np.ndarray] | None = None) -> dict[str, Any]:
        if pending is not None:  # the lagged readouts have not seen this trial's response yet
            snaps = [s.with_pending(x) for s, x in zip(snaps, pending)]
        scores = self.scores(comparison, snaps)
        top = torch.argsort(scores, descending=True)[: self.starts].tolist()
        rng = self.rng(trial_index)
        rand = rng.choice(len(comparison.pool), size=self.random_starts, replace=False).tolist() if self.random_starts else []
        ids = top + [i for i in rand if i not in top]
        starts = pool_tensor(comparison.pool[ids])
        result = synthesize(comparison_models(comparison), snaps, starts, ids, self.protocol, self.synth)
        best_pool = float(scores[top[0]]) if top else float("-inf")
        return {"result": result, "best_pool": best_pool, "best_pool_index": top[0] if top else -1}

    def propose(self, comparison: Any, trial_index: int) -> ImageDecision:
        t0 = time.perf_counter()
        self.pool_features(comparison)
        n = comparison.n_observations
        key = (trial_index, max(n - 1, 0) if self.pipeline else n)
        out: dict[str, Any] | None = None
        if self._pending is not None:
            pkey, thread, box = self._pending
            thread.join()
            self._pending = None
            if pkey == key and "result" in box:
                out, waited = box, True
        if out is None:
            lagged = self.pipeline and n > 0
            # lagged, the latest trial is pending unless it was the first (which only sets the centre)
            pending = comparison.latest_features if lagged and n >= 2 else None
            out, waited = self._compute(comparison, self.snapshots(comparison, lagged=lagged), trial_index,
                                        pending), False
        res = out["result"]
        pool_wins = res.score < out["best_pool"]  # synthesis never does worse than the pool it started from
        shown = comparison.pool[out["best_pool_index"]] if pool_wins else res.pixels
        if self.pipeline:
            self._start_next(comparison, trial_index + 1, shown)
        info = {"source": "synthesized", "start_pool_index": res.start, "blend": res.blend,
                "energy_ratio": res.energy_ratio, "pool_distance": self.pool_distance(res.pixels),
                "best_pool_score": out["best_pool"], "pipelined": waited, "lag": 1 if self.pipeline else 0}
        if pool_wins:
            i = out["best_pool_index"]
            info.update(source="pool", pool_index=i, pool_distance=0.0)
            return self.finish(_decide(comparison.pool[i], self.name, f"pool image {i} (synthesis did not beat it)",
                                       out["best_pool"], t0, info))
        return self.finish(_decide(res.pixels, self.name, f"synthesized from pool image {res.start}, blend {res.blend:g}",
                                   res.score, t0, info))

    def close(self) -> None:
        """Wait for a background synthesis still running (end of a session)."""
        if self._pending is not None:
            self._pending[1].join()
            self._pending = None

    def _start_next(self, comparison: Any, next_index: int, shown: np.ndarray) -> None:
        """Plan trial `next_index` in the background while `shown` (this trial's image, 0..1 floats
        on the uint8 grid) is presented: from the current readouts, this trial pending unless it is
        the session's first (which is not compared)."""
        snaps = self.snapshots(comparison)  # copies: the thread never sees later updates
        compared = comparison.n_observations >= 1
        shown_uint8 = to_uint8(shown)
        pixels = shown_uint8.astype(np.float64) / 255.0  # exactly what update() will see
        box: dict[str, Any] = {}

        def work() -> None:
            pending = None
            if compared:
                pending = comparison.features_of(pixels)
                comparison.remember_features(image_sha256(shown_uint8), pending)
            box.update(self._compute(comparison, snaps, next_index, pending))

        # not a daemon: the interpreter waits for it at exit instead of killing torch mid-computation
        thread = threading.Thread(target=work, name="cloop-synthesis", daemon=False)
        thread.start()
        self._pending = ((next_index, comparison.n_observations), thread, box)


def comparison_models(comparison: Any) -> list[Any]:
    return [c.features for c in comparison.candidates]


STRATEGIES = {
    "population_synthesis": SynthesisDesign,
    "population_pool": BestOfPoolDesign,
    "population_random_pool": RandomPoolDesign,
    "population_random_noise": RandomNoiseDesign,
}
