"""The readout's hyperparameters (weight scale, offset spread, noise level) marginalised on a grid.

A model's evidence depends on its readout prior: with a prior SNR far above the population's the
model whose features are weakest at the images shown wins whatever the truth, and a per-unit noise
prior lets every model trade noise for signal unit by unit, the most diffuse feature space gaining
most; with 100 units either bias is multiplied by 100. So each model reports

    log Z = log sum_{k,j,l} (1 / (K J V)) Z_kjl

over a grid of weight scales k (``weight_sd``), offset spreads j (``bias_sd``) and noise priors l,
a uniform hyperprior, every Z_kjl exact. Only the weight scales need a readout each (one
ReadoutStack, batched BLAS). The other two are closed-form corrections of it, O(N) per component:

* Noise. The shape matrix S = L^-1 and the means do not depend on the inverse-gamma (a0, b0), so
  with n_u the unit's trials and R_u = sum r^2 / (1 + q) (the stack's b with b0 = 0),

      log Z_u = -n_u/2 log 2 pi - 1/2 sum log(1 + q) + a0 log b0 - a_n log(b0 + R_u / 2)
                + lnG(a_n) - lnG(a0),     a_n = a0 + n_u / 2.

  A learned noise level is a population variance v shared by the units, each unit's
  s^2 ~ InvGamma(alpha, (alpha - 1) v c) (mean v c): v on a log grid relative to the session's
  scale c (the first trial's mean squared deviation of the units from their centre, set by
  ``set_scale`` like the centre), so the comparison does not depend on the response units: scaling
  every response by f shifts every model's log evidence by the same -N T log f.
* Offset. Components j differ from the stack's prior only in the offset's prior precision,
  L0' = L0 + delta e e^T (e the offset coordinate), so L' = L + delta e e^T at every trial and by
  Sherman-Morrison, with g = delta / (1 + delta S_bb) (S_bb = e^T S e),

      S' = S - g (S e)(S e)^T,    m' = m - g (S e) m_b,    R' = R + g m_b^2,
      log |L'| - log |L0'| = sum log(1 + q) + log(1 + delta S_bb) - log(1 + delta / l0)

  (m_b the offset coordinate of the unit's mean, l0 the stack's offset precision; the offset's
  prior mean is 0 because responses enter relative to the centre). The stack holds the smallest
  offset precision so delta >= 0 (no cancellation).

A masked unit uses its private S and mean in the same formulas. The design predicts with the most
probable component, built on demand (``state``). benchmarks/README.md ("Population") gives the
wrong-decision rates and costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy.special import gammaln, stdtr

from orchestrator.neural.check import normal_scores
from orchestrator.neural.readout import NIGPrior, ReadoutStack, ReadoutState, _Private

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class NoiseGrid:
    """The noise priors marginalised over: per level an inverse-gamma shape and scale.

    ``relative`` scales are multiplied by the session's scale (``ReadoutGrid.set_scale``);
    absolute ones are in response units (a fixed per-unit prior, the protocol's noise_shape and
    noise_scale)."""

    shapes: tuple[float, ...]
    scales: tuple[float, ...]
    relative: bool

    @classmethod
    def learned(cls, levels: list[float], shape: float) -> "NoiseGrid":
        """Population levels v (relative variances), each unit's s^2 ~ InvGamma(shape, (shape - 1) v)."""
        return cls(tuple(float(shape) for _ in levels), tuple((float(shape) - 1.0) * float(v) for v in levels), True)

    @classmethod
    def fixed(cls, shape: float, scale: float) -> "NoiseGrid":
        return cls((float(shape),), (float(scale),), False)


@dataclass(frozen=True)
class HeldOutTrial:
    """One trial's responses and every component's one-step-ahead predictive ingredients.

    Normal scores for the predictive check are read under one component (``scores``): given the
    hyperparameters the units are independent, so a trial's scores across units are independent
    standard normals under a well-specified model. Under the mixture over components they are not:
    while the shared noise level is uncertain every unit's score is scaled by the same error, which
    the check's trial-level criteria would read as a misfit."""

    y: np.ndarray  # (N,), NaN where masked
    loc: np.ndarray  # (K, J, N)
    q: np.ndarray  # (K, J, N): x' S x, the predictive's variance inflation minus 1
    R: np.ndarray  # (K, J, N): residual sum of squares behind the noise posterior
    n: np.ndarray  # (N,): trials each unit had seen
    a0: np.ndarray  # (V,) noise priors' shapes
    b0: np.ndarray  # (V,) and scales, in response units
    shape: tuple[int, int, int]

    def scores(self, index: int) -> np.ndarray:
        """Normal scores Phi^-1(F(y)) (N,) under component `index` ((k, j, l) flattened), NaN where masked."""
        k, j, l = (int(i) for i in np.unravel_index(index, self.shape))
        a = self.a0[l] + 0.5 * self.n
        scale2 = (self.b0[l] + 0.5 * self.R[k, j]) / a * (1.0 + self.q[k, j])
        return normal_scores(stdtr(2.0 * a, (self.y - self.loc[k, j]) / np.sqrt(scale2)))


class ReadoutGrid:
    """One model's readouts over the hyperparameter grid; evidence marginalised, every component exact.

    Components are indexed (k, j, l) = (weight scale, offset precision, noise prior), flattened in
    that order (``index``)."""

    def __init__(self, n_units: int, weight_precisions: list[np.ndarray], bias_precisions: list[float],
                 noise: NoiseGrid) -> None:
        self.n_units = int(n_units)
        self.weight_precisions = [np.asarray(p, dtype=np.float64) for p in weight_precisions]
        self.bias_precisions = np.asarray(bias_precisions, dtype=np.float64)
        self.noise = noise
        if not self.weight_precisions or not self.bias_precisions.size or not noise.shapes:
            raise ValueError("a readout grid needs at least one value of every hyperparameter")
        self.base_bias = float(self.bias_precisions.min())
        self.delta = self.bias_precisions - self.base_bias  # (J,) >= 0
        stack_priors = []
        for p in self.weight_precisions:
            precision = p.copy()
            precision[-1] = self.base_bias
            stack_priors.append(NIGPrior(precision, 0.0, 0.0))  # b = R / 2, a = n / 2
        self.stack = ReadoutStack(self.n_units, stack_priors, track_evidence=False)
        self.shape = (len(self.weight_precisions), self.bias_precisions.size, len(noise.shapes))
        self.scale = 1.0
        self._a0 = np.asarray(noise.shapes, dtype=np.float64)
        self._evidence = np.zeros(self.shape)
        self._states: dict[tuple[int, int], ReadoutState] = {}

    def fresh(self) -> "ReadoutGrid":
        return ReadoutGrid(self.n_units, self.weight_precisions, list(self.bias_precisions), self.noise)

    @property
    def K(self) -> int:
        return int(np.prod(self.shape))

    def index(self, k: int, j: int, l: int) -> int:
        return int(np.ravel_multi_index((k, j, l), self.shape))

    def set_scale(self, scale: float) -> None:
        """The session's response scale (variance units) that relative noise levels multiply."""
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"a readout grid's scale must be a positive number, not {scale}")
        self.scale = float(scale)
        self._refresh()

    def b0(self) -> np.ndarray:
        """Each noise prior's inverse-gamma scale in response units (V,)."""
        scales = np.asarray(self.noise.scales, dtype=np.float64)
        return scales * self.scale if self.noise.relative else scales

    def prior(self, index: int) -> NIGPrior:
        """Component `index`'s NIG prior, in response units at the current scale."""
        k, j, l = np.unravel_index(index, self.shape)
        precision = self.weight_precisions[k].copy()
        precision[-1] = self.bias_precisions[j]
        return NIGPrior(precision, float(self._a0[l]), float(self.b0()[l]))

    # -- update and evidence ---------------------------------------------------------------------------

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Absorb one trial (features x (d,), responses y (N,), NaN masked) into every component."""
        self.stack.update(x, y)
        self._refresh()

    def _unit_offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """Every unit's S_bb and offset mean m_b under each weight scale: (K, N) each."""
        st = self.stack
        s_bb = np.repeat(st.S[:, -1, -1][:, None], self.n_units, axis=1)
        m_b = st.means[:, :, -1].copy()
        for u, p in st.private.items():
            s_bb[:, u] = p.S[:, -1, -1]
            m_b[:, u] = p.mean[:, -1]
        return s_bb, m_b

    def _refresh(self) -> None:
        """The closed-form log evidence of every component (module docstring), O(K J V N)."""
        st = self.stack
        self._states.clear()
        if st.n_trials == 0:
            self._evidence = np.zeros(self.shape)
            return
        n = 2.0 * st.a[0]  # (N,) trials seen per unit, the same under every prior
        s_bb, m_b = self._unit_offsets()
        delta = self.delta[None, :, None]  # (1, J, 1)
        one_d = 1.0 + delta * s_bb[:, None, :]  # (K, J, N)
        R = 2.0 * st.b[:, None, :] + (delta / one_d) * m_b[:, None, :] ** 2  # (K, J, N)
        half_logdet = -0.5 * (st.log_det_gain[:, None, :] + np.log(one_d)
                              - np.log1p(self.delta / self.base_bias)[None, :, None])  # (K, J, N)
        a0, b0 = self._a0[:, None], self.b0()[:, None]  # (V, 1)
        an = a0 + 0.5 * n[None, :]  # (V, N); a unit not seen yet contributes 0 to every term
        const = -0.5 * LOG_2PI * n.sum() + half_logdet.sum(axis=2)  # (K, J)
        per_level = a0[:, 0] * np.log(b0[:, 0]) * self.n_units + (gammaln(an) - gammaln(a0)).sum(axis=1)  # (V,)
        fit = (an[None, None, :, :] * np.log(b0[None, None, :, :] + 0.5 * R[:, :, None, :])).sum(axis=3)
        self._evidence = const[:, :, None] + per_level[None, None, :] - fit  # (K, J, V)

    @property
    def component_evidence(self) -> np.ndarray:
        """Log evidence of every component (K,), flattened in (k, j, l) order."""
        return self._evidence.reshape(-1).copy()

    @property
    def log_evidence(self) -> float:
        ev = self._evidence.reshape(-1)
        top = float(ev.max())
        return top + math.log(float(np.exp(ev - top).mean()))

    def weights(self) -> np.ndarray:
        """Posterior over the grid (K,), sums to 1."""
        ev = self._evidence.reshape(-1)
        w = np.exp(ev - ev.max())
        return w / w.sum()

    def marginal(self, axis: int) -> np.ndarray:
        """Posterior over one hyperparameter: 0 weight scale, 1 offset spread, 2 noise prior."""
        w = self.weights().reshape(self.shape)
        return w.sum(axis=tuple(a for a in range(3) if a != axis))

    # -- what the designs and the predictive check use -----------------------------------------------------

    @property
    def best_index(self) -> int:
        return int(np.argmax(self._evidence))

    @property
    def state(self) -> ReadoutState:
        """The most probable component's posterior (what the designs predict with)."""
        return self.component_state(self.best_index)

    def component_state(self, index: int) -> ReadoutState:
        """Component `index`'s posterior, built from the stack by the offset correction (cached per trial)."""
        k, j, l = (int(i) for i in np.unravel_index(index, self.shape))
        base = self._states.get((k, j))
        st = self.stack
        a0, b0 = float(self._a0[l]), float(self.b0()[l])
        if base is None:
            S, means = st.S[k], st.means[k]
            delta = float(self.delta[j])
            private = {u: _Private(p.S[k], p.mean[k]) for u, p in st.private.items()}
            R = 2.0 * st.b[k]
            if delta != 0.0:
                Se = S[:, -1]
                g = delta / (1.0 + delta * S[-1, -1])
                R = R + g * means[:, -1] ** 2
                S, means = S - g * np.outer(Se, Se), means - g * np.outer(means[:, -1], Se)
                for u, p in list(private.items()):
                    pe = p.S[:, -1]
                    pg = delta / (1.0 + delta * p.S[-1, -1])
                    R[u] = 2.0 * st.b[k, u] + pg * p.mean[-1] ** 2
                    private[u] = _Private(p.S - pg * np.outer(pe, pe), p.mean - pg * p.mean[-1] * pe)
            base = ReadoutState(S, means, st.a[k], R, 0.0, st.n_trials, private)
            self._states[(k, j)] = base
        ev = float(self._evidence[k, j, l])
        return ReadoutState(base.S, base.means, a0 + base.a, b0 + 0.5 * base.b, ev, base.n_trials, base.private)

    def _pair_moments(self, features: np.ndarray,
                      live3: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
        """Per (weight scale k, offset spread j) marked in `live3` (K, J) (default all): the
        one-step-ahead loc (B, N), x' S x (B, N) and residual sum of squares R (N,) at `features`
        (B, d), everything but the noise prior; one d x d product per weight scale."""
        F = np.atleast_2d(features)
        st = self.stack
        s_bb, m_b = self._unit_offsets()
        for k in range(self.shape[0]):
            if live3 is not None and not live3[k].any():
                continue
            SF = F @ st.S[k]  # (B, d)
            q = np.repeat(((SF * F).sum(1))[:, None], self.n_units, axis=1)  # (B, N)
            loc = F @ st.means[k].T
            xse = np.repeat(SF[:, -1:], self.n_units, axis=1)  # x . S e
            for u, p in st.private.items():
                pSF = F @ p.S[k]
                q[:, u] = (pSF * F).sum(1)
                loc[:, u] = F @ p.mean[k]
                xse[:, u] = pSF[:, -1]
            for j in range(self.shape[1]):
                if live3 is not None and not live3[k, j]:
                    continue
                g = self.delta[j] / (1.0 + self.delta[j] * s_bb[k])  # (N,)
                yield (k, j, loc - g[None, :] * xse * m_b[k][None, :], q - g[None, :] * xse ** 2,
                       2.0 * st.b[k] + g * m_b[k] ** 2)

    def _predictive_blocks(self, features: np.ndarray,
                           live: np.ndarray) -> Iterator[tuple[int, int, np.ndarray, tuple[np.ndarray, ...]]]:
        """Per (k, j) with a live component: (k, j, its live noise priors ls (L,), Student-t df (L, N),
        loc (B, N), scale2 (L, B, N)) at `features` (B, d)."""
        live3 = np.asarray(live, dtype=bool).reshape(self.shape)
        n = 2.0 * self.stack.a[0]
        b0 = self.b0()
        for k, j, locj, qj, Rj in self._pair_moments(features, live3.any(axis=2)):
            ls = np.flatnonzero(live3[k, j])
            a = self._a0[ls, None] + 0.5 * n[None, :]  # (L, N)
            scale2 = ((b0[ls, None] + 0.5 * Rj[None, :]) / a)[:, None, :] * (1.0 + qj)[None, :, :]
            yield k, j, ls, (2.0 * a, locj, scale2)

    def held_out(self, x: np.ndarray, y: np.ndarray) -> "HeldOutTrial":
        """Trial (x, y)'s one-step-ahead predictive under every component, taken before `update`
        absorbs it, so that its normal scores can later be read under whichever component the
        posterior then favours (``HeldOutTrial.scores``)."""
        K, J, _ = self.shape
        loc, q, R = (np.empty((K, J, self.n_units)) for _ in range(3))
        for k, j, lk, qk, Rk in self._pair_moments(x[None]):
            loc[k, j], q[k, j], R[k, j] = lk[0], qk[0], Rk
        return HeldOutTrial(np.asarray(y, dtype=np.float64).copy(), loc, q, R, 2.0 * self.stack.a[0].copy(),
                            self._a0.copy(), self.b0().copy(), self.shape)

    def component_predictives(self, features: np.ndarray, live: np.ndarray) -> list[tuple[int, tuple[np.ndarray, ...]]]:
        """Student-t predictives (df (N,), loc (B, N), scale2 (B, N)) of the components marked in
        `live` (K,) at `features` (B, d), O(B N) per component beyond one product per weight scale."""
        return [(self.index(k, j, int(l)), (df[i], loc, scale2[i]))
                for k, j, ls, (df, loc, scale2) in self._predictive_blocks(features, live)
                for i, l in enumerate(ls)]

    def noise_variance(self) -> np.ndarray:
        """Posterior mean of each unit's noise variance under the most probable component."""
        st = self.state
        return np.where(st.a > 1, st.b / np.maximum(st.a - 1, 1e-12), st.b / (st.a + 1))
