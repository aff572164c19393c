"""Reference: exact grid-based ADO for model discrimination (Cavagnaro et al. 2010 style), in numpy.

Each model's (a, b) prior lives on a 100 x 100 grid of cell midpoints in (0, 1)^2 weighted by the Beta
densities; the posterior and model probabilities are exact on that grid, and the next lag maximises the
mutual information between model identity and the binomial response, summed exactly over the
11 outcomes. Used by benchmarks/retention.py as `--designs grid_ado` to run the reference in the same
harness (same subjects, same response streams) as cloop's design.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
from scipy import stats

LAGS = np.arange(101)
N = 10


class GridADO:
    def __init__(self, grid: int = 100) -> None:
        g = (np.arange(grid) + 0.5) / grid
        a, b = np.meshgrid(g, g, indexing="ij")
        a, b = a.ravel(), b.ravel()
        y = np.arange(N + 1)
        self.models = ["power", "exponential"]
        self.log_prior = []
        self.pmf = []  # per model: (grid^2, lags, outcomes)
        for m, bprior in (("power", stats.beta(1, 4)), ("exponential", stats.beta(1, 80))):
            lp = stats.beta(2, 1).logpdf(a) + bprior.logpdf(b)
            self.log_prior.append(lp - np.logaddexp.reduce(lp))
            p = a[:, None] * (LAGS[None, :] + 1.0) ** (-b[:, None]) if m == "power" else a[:, None] * np.exp(-b[:, None] * LAGS[None, :])
            p = np.clip(p, 1e-12, 1 - 1e-12)
            self.pmf.append(stats.binom.pmf(y[None, None, :], N, p[:, :, None]).astype(np.float64))
        self.reset()

    def reset(self) -> None:
        self.log_post = [lp.copy() for lp in self.log_prior]
        self.log_model = np.log(np.array([0.5, 0.5]))

    def probabilities(self) -> dict[str, float]:
        p = np.exp(self.log_model - np.logaddexp.reduce(self.log_model))
        return dict(zip(self.models, map(float, p)))

    def propose(self) -> int:
        pm = []
        for lp, pmf in zip(self.log_post, self.pmf):
            w = np.exp(lp - lp.max())
            w /= w.sum()
            pm.append(np.tensordot(w, pmf, axes=(0, 0)))  # (lags, outcomes)
        pm = np.stack(pm)
        pi = np.exp(self.log_model - np.logaddexp.reduce(self.log_model))
        mix = np.tensordot(pi, pm, axes=(0, 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(pm > 0, pm * (np.log(pm) - np.log(mix[None])), 0.0).sum(-1)
        mi = (pi[:, None] * kl).sum(0)
        return int(np.argmax(mi))

    def update(self, lag: int, y: int) -> None:
        for j, pmf in enumerate(self.pmf):
            ll = np.log(pmf[:, lag, y])
            joint = self.log_post[j] + ll
            z = np.logaddexp.reduce(joint)
            self.log_model[j] += z
            self.log_post[j] = joint - z


def run_subject_grid(engine: GridADO, truth: Any, seed: int, max_trials: int,
                     criteria: tuple[float, ...] = (0.95, 0.99)) -> dict[str, Any]:
    engine.reset()
    reached: dict[float, int | None] = {c: None for c in criteria}
    decision_ms, cpu_ms = [], []
    probs = engine.probabilities()
    for trial in range(max_trials):
        t0, c0 = time.perf_counter(), time.thread_time()
        lag = engine.propose()
        decision_ms.append((time.perf_counter() - t0) * 1000)
        cpu_ms.append((time.thread_time() - c0) * 1000)
        y = truth.sample({"lag": lag}, np.random.default_rng([seed, trial]))
        engine.update(lag, int(y))
        probs = engine.probabilities()
        for c in criteria:
            if reached[c] is None and probs[truth.model_name] >= c:
                reached[c] = trial + 1
        if all(v is not None for v in reached.values()):
            break
    return {"seed": seed, "trials_to": {str(c): reached[c] for c in criteria}, "decision_ms": decision_ms,
            "decision_cpu_ms": cpu_ms, "update_ms": [], "final": probs}
