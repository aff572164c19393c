"""Held-out predictive check that gates declaring a population model.

P(model) compares the candidates with each other; it cannot say that the leader describes the
responses, and a misspecified truth (saturating units, a wrong link) can make a wrong model win
confidently. So before a model is declared its own one-step-ahead predictions are checked on the
responses they had not seen: each trial, before the readout absorbs it, every unit's response is
mapped through the model's Student-t predictive CDF and then the normal quantile function,

    z = Phi^-1(F_t(y)),

which for a well-specified model are independent standard normal draws (prequential PIT, exact
under the model whatever the design). Objective: over the latest ``WINDOW`` trials (at least
``MIN_TRIALS``), the leader's z must have mean square within ``TOLERANCE`` standard errors of 1
(its predictive spread is right) and mean fourth power within ``TOLERANCE`` standard errors of 3
(no heavy tails: the images where a linear readout fails show up as outliers), and the mean of z
per trial across units (a shared miss) must have mean square within ``TOLERANCE`` standard
errors of 1, and so must the per-trial sum of z^2 across units, standardised ((sum z^2 - n) /
sqrt(2 n)): trials on which every unit scatters more than the model's noise (outlying trials,
noise that changes over the session) show there, even when the learned noise level has absorbed
them into the overall spread so that z^2 and z^4 pool to 1 and 3. Failing any of them blocks the
declaration; the session goes on and the check is re-evaluated each trial.
benchmarks/population_calibration.py measures what it blocks and costs.
"""
from __future__ import annotations

from collections import deque

import numpy as np
from scipy.special import ndtri
from scipy.stats import t as student_t

WINDOW = 20
MIN_TRIALS = 8
TOLERANCE = 4.0


def pit(y: np.ndarray, df: np.ndarray, loc: np.ndarray, scale2: np.ndarray) -> np.ndarray:
    """Probability integral transform of responses under Student-t predictives (NaN where y is NaN)."""
    return student_t.cdf((y - loc) / np.sqrt(scale2), df)


def normal_scores(u: np.ndarray) -> np.ndarray:
    """Phi^-1 of PIT values, clipped so a response far outside the predictive scores about +-7."""
    return ndtri(np.clip(u, 1e-12, 1 - 1e-12))


class PredictiveCheck:
    """The latest WINDOW trials' normal scores of one model's predictions; `blocker` judges them."""

    def __init__(self) -> None:
        self.scores: deque[np.ndarray] = deque(maxlen=WINDOW)

    def add(self, z: np.ndarray) -> None:
        self.scores.append(np.asarray(z, dtype=np.float64))

    def blocker(self) -> str | None:
        """Why the model's predictions are not yet shown adequate (None = they are)."""
        if len(self.scores) < MIN_TRIALS:
            return f"predictive check needs {MIN_TRIALS} held-out trials, has {len(self.scores)}"
        Z = np.stack(self.scores)
        z = Z[np.isfinite(Z)]
        n = z.size
        m2, m4 = float(np.mean(z ** 2)), float(np.mean(z ** 4))
        if abs(m2 - 1.0) > TOLERANCE * np.sqrt(2.0 / n):
            return f"predictive check: mean squared normal score {m2:.2f} over {len(self.scores)} trials (expected 1)"
        if abs(m4 - 3.0) > TOLERANCE * np.sqrt(96.0 / n):
            return f"predictive check: mean fourth-power normal score {m4:.2f} (expected 3): outlying responses"
        shared = np.array([np.nanmean(row) * np.sqrt(np.isfinite(row).sum()) for row in Z if np.isfinite(row).any()])
        s2 = float(np.mean(shared ** 2))
        if abs(s2 - 1.0) > TOLERANCE * np.sqrt(2.0 / shared.size):
            return f"predictive check: units miss together (per-trial mean score variance {s2:.2f}, expected 1)"
        spread = np.array([(np.nansum(row ** 2) - k) / np.sqrt(2.0 * k)
                           for row in Z for k in [int(np.isfinite(row).sum())] if k > 0])
        c2 = float(np.mean(spread ** 2))
        if abs(c2 - 1.0) > TOLERANCE * np.sqrt(2.0 / spread.size):
            return (f"predictive check: the units' scatter changes from trial to trial together (per-trial "
                    f"sum of squared scores varies {c2:.2f} times its expected variance)")
        return None
