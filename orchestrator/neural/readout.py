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

A NaN response masks the unit for that trial. Masked units no longer share L: the first mask gives
the unit a private copy of (S, its mean), updated the same way on the trials it does see. Memory is
d^2 per such unit, linear in their number; a rig that masks every unit often should drop them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import gammaln


@dataclass(frozen=True)
class NIGPrior:
    """Prior precision diagonal (d,) of the weights in noise units, and the inverse-gamma (a0, b0)."""

    precision: np.ndarray
    a0: float
    b0: float


def student_t_logpdf(y: np.ndarray, df: np.ndarray, loc: np.ndarray, scale2: np.ndarray) -> np.ndarray:
    """Log density of a Student-t with `df` degrees of freedom, location and squared scale."""
    z = (y - loc) ** 2 / scale2
    return (gammaln((df + 1) / 2) - gammaln(df / 2) - 0.5 * np.log(df * math.pi * scale2)
            - (df + 1) / 2 * np.log1p(z / df))


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


class PopulationReadout:
    """The NIG readout of N units on d features; `update` absorbs one trial and returns its log evidence."""

    def __init__(self, n_units: int, prior: NIGPrior) -> None:
        d = prior.precision.shape[0]
        self.n_units, self.d, self.prior = int(n_units), int(d), prior
        self.state = ReadoutState(S=np.diag(1.0 / prior.precision), means=np.zeros((n_units, d)),
                                  a=np.full(n_units, prior.a0), b=np.full(n_units, prior.b0))

    # -- prediction ------------------------------------------------------------------------------

    def predictive(self, features: np.ndarray, state: ReadoutState | None = None) -> tuple[np.ndarray, ...]:
        """Student-t predictive of every unit at images with `features` (B, d): df (N,), loc (B, N), scale2 (B, N)."""
        st = state or self.state
        F = np.atleast_2d(features)
        q = np.einsum("bi,ij,bj->b", F, st.S, F)
        loc = F @ st.means.T
        scale2 = (st.b / st.a)[None, :] * (1.0 + q)[:, None]
        for u, p in st.private.items():
            loc[:, u] = F @ p.mean
            scale2[:, u] = st.b[u] / st.a[u] * (1.0 + np.einsum("bi,ij,bj->b", F, p.S, F))
        return 2 * st.a, loc, scale2

    # -- update ----------------------------------------------------------------------------------

    def update(self, x: np.ndarray, y: np.ndarray) -> float:
        """Absorb one trial (features x (d,), responses y (N,), NaN = masked); return its log evidence."""
        st = self.state
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        seen = ~np.isnan(y)
        Sx = st.S @ x
        q = float(x @ Sx)
        gain = Sx / (1.0 + q)
        if not st.private and seen.all():  # the common case: one shared shape matrix, no fancy indexing
            resid = y - st.means @ x
            df = 2 * st.a
            logp = student_t_logpdf(resid, df, 0.0, st.b / st.a * (1.0 + q))
            st.means += np.outer(resid, gain)
            st.a += 0.5
            st.b += resid ** 2 / (2.0 * (1.0 + q))
        else:
            logp = self._update_masked(x, y, seen, Sx, q, gain)
        st.S -= np.outer(Sx, gain)
        if st.n_trials % 64 == 63:  # keep S symmetric to round-off over thousands of updates
            st.S = 0.5 * (st.S + st.S.T)
        total = float(logp.sum())
        st.log_evidence += total
        st.n_trials += 1
        return total

    def _update_masked(self, x: np.ndarray, y: np.ndarray, seen: np.ndarray, Sx: np.ndarray, q: float,
                       gain: np.ndarray) -> np.ndarray:
        """The update when some units are masked now or were before (they keep private S and mean)."""
        st = self.state
        for u in np.flatnonzero(~seen):
            if int(u) not in st.private:
                st.private[int(u)] = _Private(st.S.copy(), st.means[u].copy())
        shared = seen.copy()
        if st.private:
            shared[list(st.private)] = False
        resid = np.zeros(self.n_units)
        one_q = np.ones(self.n_units)
        resid[shared] = y[shared] - st.means[shared] @ x
        one_q[shared] = 1.0 + q
        for u, p in st.private.items():
            if seen[u]:
                pSx = p.S @ x
                pq = float(x @ pSx)
                r = y[u] - float(p.mean @ x)
                resid[u], one_q[u] = r, 1.0 + pq
                p.mean += pSx * (r / (1.0 + pq))
                p.S -= np.outer(pSx, pSx) / (1.0 + pq)
        logp = student_t_logpdf(resid[seen], 2 * st.a[seen], 0.0, st.b[seen] / st.a[seen] * one_q[seen])
        st.means[shared] += resid[shared, None] * gain[None, :]
        st.a[seen] += 0.5
        st.b[seen] += resid[seen] ** 2 / (2.0 * one_q[seen])
        return logp

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
    return (-T / 2 * math.log(2 * math.pi) + 0.5 * (logdet0 - logdetn) + prior.a0 * math.log(prior.b0)
            - an * np.log(bn) + gammaln(an) - gammaln(prior.a0))
