"""Per-unit Bayesian linear readout on a model's features, updated exactly one trial at a time.

Model, for every unit u with feature vector x (d,) of the shown image:

    y_u = x . w_u + e,   e ~ N(0, s_u^2),   w_u | s_u^2 ~ N(0, s_u^2 L0^-1),   s_u^2 ~ InvGamma(a0, b0)

(Normal-Inverse-Gamma, conjugate). After t trials the posterior is NIG(m_u, L, a_u, b_u) with the
precision ``L = L0 + sum x x^T``. L depends only on the features, so units that share features and
prior share it: N units cost one d x d matrix (kept as its inverse S = L^-1) plus an N x d matrix of
means. A trial updates S by Sherman-Morrison (rank 1), then every unit in O(d):

    q = x^T S x,  k = S x / (1 + q),  r_u = y_u - x . m_u
    m_u += k r_u,  a_u += 1/2,  b_u += r_u^2 / (2 (1 + q)),  S -= (S x)(S x)^T / (1 + q)

Before the update, y_u's predictive is Student-t(2 a_u, x . m_u, (b_u / a_u)(1 + q)); the sum of
its log density over trials is exactly the log marginal likelihood (chain rule), which
``batch_log_evidence`` computes in closed form for the tests.

``log_det_gain`` keeps sum log(1 + q) per unit (log |L| - log |L0|), so the same evidence is also
available in closed form at any time from (a, b, log_det_gain) alone: orchestrator.neural.hyper
uses that to marginalise the offset and noise hyperparameters without stacking a readout for each.

A NaN response masks the unit for that trial. Masked units no longer share L: the first mask gives
the unit a private copy of (S, its mean), updated the same way on the trials it does see. Memory is
d^2 per such unit, linear in their number; a rig that masks every unit often should drop them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import blas
from scipy.special import gammaln


@dataclass(frozen=True)
class NIGPrior:
    """Prior precision diagonal (d,) of the weights in noise units, and the inverse-gamma (a0, b0).

    a0 and b0 may also be per-unit arrays (N,)."""

    precision: np.ndarray
    a0: float | np.ndarray
    b0: float | np.ndarray


def student_t_logpdf(y: np.ndarray, df: np.ndarray, loc: np.ndarray, scale2: np.ndarray) -> np.ndarray:
    """Log density of a Student-t with `df` degrees of freedom, location and squared scale."""
    z = (y - loc) ** 2 / scale2
    return (gammaln((df + 1) / 2) - gammaln(df / 2) - 0.5 * np.log(df * math.pi * scale2)
            - (df + 1) / 2 * np.log1p(z / df))


def _add_outer(A: np.ndarray, alpha: float, u: np.ndarray, v: np.ndarray) -> None:
    """A += alpha u v^T in place (A C-contiguous float64): BLAS dger, no (rows x cols) temporary."""
    out = blas.dger(alpha, v, u, a=A.T, overwrite_a=1)
    if not np.shares_memory(out, A):  # pragma: no cover - BLAS copied (unexpected layout)
        A += alpha * np.outer(u, v)


@dataclass
class _Private:
    """Shape matrix and mean of one unit that has missed trials (its L differs from the shared one)."""

    S: np.ndarray
    mean: np.ndarray


@dataclass
class ReadoutState:
    """Everything the posterior is: shared S (d, d), means (N, d), a (N,), b (N,), log evidence."""

    S: np.ndarray
    means: np.ndarray
    a: np.ndarray
    b: np.ndarray
    log_evidence: float = 0.0
    n_trials: int = 0
    private: dict[int, _Private] = field(default_factory=dict)

    def copy(self) -> "ReadoutState":
        return ReadoutState(self.S.copy(), self.means.copy(), self.a.copy(), self.b.copy(), self.log_evidence,
                            self.n_trials, {u: _Private(p.S.copy(), p.mean.copy()) for u, p in self.private.items()})


class ReadoutStack:
    """K readouts of the same N units on the same d features that differ only in their prior.

    Their arrays are stacked on a leading axis (S (K, d, d), means (K, N, d), a and b (K, N)) so a
    trial is a handful of batched BLAS calls whatever K is. ``states[k]`` is component k's
    ReadoutState whose arrays are views into the stack: updated in place, never reallocated.
    A masked unit's private shape matrix and mean are stacked the same way ((K, d, d), (K, d)).
    """

    def __init__(self, n_units: int, priors: list[NIGPrior], track_evidence: bool = True) -> None:
        """`track_evidence` False skips the per-trial Student-t densities (a caller that computes the
        evidence in closed form from a, b and log_det_gain does not need them)."""
        if not priors:
            raise ValueError("a readout needs at least one prior")
        d = priors[0].precision.shape[0]
        if any(p.precision.shape != (d,) for p in priors):
            raise ValueError("every prior of a readout stack must have the same number of features")
        self.n_units, self.d, self.priors = int(n_units), int(d), list(priors)
        n = self.n_units
        self.S = np.stack([np.diag(1.0 / p.precision) for p in priors]).astype(np.float64)
        self.means = np.zeros((len(priors), n, d))
        self.a = np.stack([np.broadcast_to(np.asarray(p.a0, dtype=np.float64), (n,)) for p in priors]).copy()
        self.b = np.stack([np.broadcast_to(np.asarray(p.b0, dtype=np.float64), (n,)) for p in priors]).copy()
        self.log_evidence = np.zeros(len(priors))
        self.log_det_gain = np.zeros((len(priors), n))  # sum of log(1 + q) over each unit's trials
        self.track_evidence = bool(track_evidence)
        self.n_trials = 0
        self.private: dict[int, _Private] = {}
        self.states = [ReadoutState(self.S[k], self.means[k], self.a[k], self.b[k]) for k in range(len(priors))]

    @property
    def K(self) -> int:
        return len(self.priors)

    def update(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Absorb one trial (features x (d,), responses y (N,), NaN = masked); return its log evidence (K,)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        seen = ~np.isnan(y)
        Sx = self.S @ x  # (K, d)
        one_q = 1.0 + Sx @ x  # (K,)
        gain = Sx / one_q[:, None]
        if not self.private and seen.all():  # the common case: one shared shape matrix, no fancy indexing
            resid = y[None, :] - self.means @ x  # (K, N)
            logp = (student_t_logpdf(resid, 2 * self.a, 0.0, self.b / self.a * one_q[:, None])
                    if self.track_evidence else None)
            for k in range(self.K):
                _add_outer(self.means[k], 1.0, resid[k], gain[k])
            self.a += 0.5
            self.b += resid ** 2 / (2.0 * one_q[:, None])
            self.log_det_gain += np.log(one_q)[:, None]
        else:
            logp = self._update_masked(x, y, seen, one_q, gain)
        for k in range(self.K):
            _add_outer(self.S[k], -1.0, Sx[k], gain[k])
        if self.n_trials % 64 == 63:  # keep S symmetric to round-off over thousands of updates
            self.S[...] = 0.5 * (self.S + self.S.transpose(0, 2, 1))
        total = logp.sum(axis=1) if logp is not None else np.zeros(self.K)
        self.log_evidence += total
        self.n_trials += 1
        for k, st in enumerate(self.states):
            st.log_evidence, st.n_trials = float(self.log_evidence[k]), self.n_trials
        return total

    def _update_masked(self, x: np.ndarray, y: np.ndarray, seen: np.ndarray, one_q: np.ndarray,
                       gain: np.ndarray) -> np.ndarray | None:
        """The update when some units are masked now or were before (they keep private S and mean)."""
        for u in np.flatnonzero(~seen):
            u = int(u)
            if u not in self.private:
                p = _Private(self.S.copy(), self.means[:, u].copy())
                self.private[u] = p
                for k, st in enumerate(self.states):
                    st.private[u] = _Private(p.S[k], p.mean[k])
        shared = seen.copy()
        shared[list(self.private)] = False
        K = self.K
        resid = np.zeros((K, self.n_units))
        one_qu = np.ones((K, self.n_units))
        resid[:, shared] = y[shared][None, :] - self.means[:, shared] @ x
        one_qu[:, shared] = one_q[:, None]
        for u, p in self.private.items():
            if seen[u]:
                pSx = p.S @ x  # (K, d)
                pq1 = 1.0 + pSx @ x
                r = y[u] - p.mean @ x
                resid[:, u], one_qu[:, u] = r, pq1
                p.mean += pSx * (r / pq1)[:, None]
                for k in range(K):
                    _add_outer(p.S[k], -1.0 / pq1[k], pSx[k], pSx[k])
        a, b = self.a[:, seen], self.b[:, seen]
        logp = (student_t_logpdf(resid[:, seen], 2 * a, 0.0, b / a * one_qu[:, seen])
                if self.track_evidence else None)
        self.means[:, shared] += resid[:, shared, None] * gain[:, None, :]
        self.a[:, seen] += 0.5
        self.b[:, seen] += resid[:, seen] ** 2 / (2.0 * one_qu[:, seen])
        self.log_det_gain[:, seen] += np.log(one_qu[:, seen])
        return logp


class PopulationReadout:
    """The NIG readout of N units on d features; `update` absorbs one trial and returns its log evidence.

    A stack of one ReadoutStack component; orchestrator.neural.hyper stacks several weight scales.
    """

    def __init__(self, n_units: int, prior: NIGPrior) -> None:
        self.stack = ReadoutStack(n_units, [prior])
        self.n_units, self.d, self.prior = self.stack.n_units, self.stack.d, prior
        self.state = self.stack.states[0]

    # -- prediction ------------------------------------------------------------------------------

    def predictive(self, features: np.ndarray, state: ReadoutState | None = None) -> tuple[np.ndarray, ...]:
        """Student-t predictive of every unit at images with `features` (B, d): df (N,), loc (B, N), scale2 (B, N)."""
        st = state or self.state
        F = np.atleast_2d(features)
        q = ((F @ st.S) * F).sum(1)
        loc = F @ st.means.T
        scale2 = (st.b / st.a)[None, :] * (1.0 + q)[:, None]
        for u, p in st.private.items():
            loc[:, u] = F @ p.mean
            scale2[:, u] = st.b[u] / st.a[u] * (1.0 + ((F @ p.S) * F).sum(1))
        return 2 * st.a, loc, scale2

    # -- update ----------------------------------------------------------------------------------

    def update(self, x: np.ndarray, y: np.ndarray) -> float:
        """Absorb one trial (features x (d,), responses y (N,), NaN = masked); return its log evidence."""
        return float(self.stack.update(x, y)[0])

    def noise_variance(self) -> np.ndarray:
        """Posterior mean of each unit's noise variance, b / (a - 1) (the mode b / (a + 1) when a <= 1)."""
        st = self.state
        return np.where(st.a > 1, st.b / np.maximum(st.a - 1, 1e-12), st.b / (st.a + 1))


def batch_log_evidence(X: np.ndarray, Y: np.ndarray, prior: NIGPrior) -> np.ndarray:
    """Closed-form NIG log marginal likelihood of each unit's column of Y (T, N) given X (T, d); no masks."""
    T, _ = X.shape
    L0 = np.diag(prior.precision)
    Ln = L0 + X.T @ X
    eta = X.T @ Y
    mean = np.linalg.solve(Ln, eta)
    an = prior.a0 + T / 2
    bn = prior.b0 + 0.5 * ((Y ** 2).sum(0) - (mean * eta).sum(0))
    _, logdet0 = np.linalg.slogdet(L0)
    _, logdetn = np.linalg.slogdet(Ln)
    return (-T / 2 * math.log(2 * math.pi) + 0.5 * (logdet0 - logdetn) + prior.a0 * np.log(prior.b0)
            - an * np.log(bn) + gammaln(an) - gammaln(prior.a0))
