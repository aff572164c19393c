"""Held-out checks that gate declaring a population model: its own predictions, and its lead over each rival.

P(model) compares the candidates with each other; it cannot say that the leader describes the
responses, and a misspecified truth (saturating units, a wrong link) can make a wrong model win
confidently. So before a model is declared its own one-step-ahead predictions are checked on the
responses they had not seen: each trial, before the readout absorbs it, every unit's response is
mapped through the model's Student-t predictive CDF (under the readout hyperparameters the posterior
favours when the check is judged: given them the units are independent, under their mixture they are
not) and then the normal quantile function,

    z = Phi^-1(F_t(y)),

which for a well-specified model are independent standard normal draws (prequential PIT, exact
under the model whatever the design). Objective: over the latest ``WINDOW`` trials (at least
``required_trials``: 8, or down to 4 for populations large enough that they give 160 scores),
the leader's z must have mean square within ``TOLERANCE`` standard errors of 1 (its predictive
spread is right) and mean fourth power within ``TOLERANCE`` standard errors of 3
(no heavy tails: the images where a linear readout fails show up as outliers), and the mean of z
per trial across units (a shared miss) must have mean square within ``TOLERANCE`` standard
errors of 1, and so must the per-trial sum of z^2 across units, standardised ((sum z^2 - n) /
sqrt(2 n)): trials on which every unit scatters more than the model's noise (outlying trials,
noise that changes over the session) show there, even when the learned noise level has absorbed
them into the overall spread so that z^2 and z^4 pool to 1 and 3. Failing any of them blocks the
declaration; the session goes on and the check is re-evaluated each trial.
benchmarks/population_calibration.py measures what it blocks and costs.

The second gate is trial-level (``RivalTest``). P(model) sums log predictive densities over
units as if each unit's miss were independent of the others'. When every candidate misfits the
population in a way its units share (an image the readouts cannot explain moves many units at
once), one trial's evidence differences are correlated across units and their sum over-counts the
evidence. So the leader must also predict better trial by trial: with D_t = log p_leader(y_t) -
log p_rival(y_t), the whole population's one-step-ahead log density difference on trial t,
treated as independent across trials (a Diebold-Mariano statistic of equal predictive accuracy),
mean(D) / se(D) must exceed ``stopping.rival_lead`` (default 1.5) against every rival. A lead that
one trial carries while the others are even scores exactly 1, one that two trials carry
sqrt(2 (T - 1) / (T - 2)) (1.5 at T = 10), so by default a lead resting on one or two images does
not decide. ``stopping.rival_test: true`` asks instead for the Student-t quantile
(1 - RIVAL_ALPHA, T - 1), a test at that level; it is conservative: it ignores what the models
know about the noise, so it needs more trials than P(model) does when the readouts fit.

The third gate weighs the evidence itself by how much it rests on a few images. The leader's
log odds against a rival are the sum of D over the compared trials (plus the prior's), and
sqrt(T) sd(D) is how much that sum would vary with other images of the same design. With each
rival's log odds cut by ``stopping.evidence_margin`` (default 1) such standard errors, P(leader)
must still reach ``stopping.model_probability`` (``RivalTest.discounted_probability``). A lead of
z standard errors keeps the fraction 1 - margin / z of its log odds: a steady lead that P(model)
carries far past the threshold passes at once, a lead just past the threshold on a z of 1.5 to 2
(the wrong declarations of misspecified populations) does not.
benchmarks/README.md (Population) gives what each threshold blocks and costs.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Protocol, Sequence

import numpy as np
from scipy.special import ndtri
from scipy.stats import t as student_t

WINDOW = 20
#: held-out trials before the check can pass: MIN_TRIALS, or fewer for a large population, as long
#: as the trials give MIN_SCORES normal scores (what the pooled criteria need; 8 trials of 20 units)
#: and at least MIN_TRIALS_LARGE trials (what the trial-level criteria need)
MIN_TRIALS = 8
MIN_SCORES = 160
MIN_TRIALS_LARGE = 4
TOLERANCE = 4.0
#: one-sided level of the trial-level test that the leader predicts better than each rival
RIVAL_ALPHA = 0.025


def pit(y: np.ndarray, df: np.ndarray, loc: np.ndarray, scale2: np.ndarray) -> np.ndarray:
    """Probability integral transform of responses under Student-t predictives (NaN where y is NaN)."""
    return student_t.cdf((y - loc) / np.sqrt(scale2), df)


def normal_scores(u: np.ndarray) -> np.ndarray:
    """Phi^-1 of PIT values, clipped so a response far outside the predictive scores about +-7."""
    return ndtri(np.clip(u, 1e-12, 1 - 1e-12))


def required_trials(units: int) -> int:
    """Held-out trials the check needs before it can pass, for a population of `units`."""
    return max(MIN_TRIALS_LARGE, min(MIN_TRIALS, -(-MIN_SCORES // max(int(units), 1))))


class HeldOut(Protocol):
    """A held-out trial whose normal scores depend on the hyperparameter component they are read under."""

    y: np.ndarray

    def scores(self, index: int) -> np.ndarray: ...


class PredictiveCheck:
    """The latest WINDOW trials' held-out predictions of one model; `blocker` judges their normal scores.

    A trial is added either as its normal scores (N,) or as a ``HeldOut`` whose scores are read, when
    judged, under the component `component()` names (the readout's most probable hyperparameters
    then): scores read under the mixture over hyperparameters are correlated across units while the
    hyperparameters are uncertain (orchestrator.neural.hyper.HeldOutTrial)."""

    def __init__(self, component: Callable[[], int] | None = None) -> None:
        self.trials: deque[np.ndarray | HeldOut] = deque(maxlen=WINDOW)
        self.component = component

    def add(self, trial: "np.ndarray | HeldOut") -> None:
        self.trials.append(trial if hasattr(trial, "scores") else np.asarray(trial, dtype=np.float64))

    @property
    def scores(self) -> list[np.ndarray]:
        """The window's normal scores, held-out trials read under the current component."""
        index = self.component() if self.component is not None else 0
        return [t if isinstance(t, np.ndarray) else t.scores(index) for t in self.trials]

    def blocker(self) -> str | None:
        """Why the model's predictions are not yet shown adequate (None = they are)."""
        needed = MIN_TRIALS
        if self.trials:
            needed = required_trials(self.trials[-1].shape[0] if isinstance(self.trials[-1], np.ndarray)
                                     else self.trials[-1].y.shape[0])
        if len(self.trials) < needed:
            return f"predictive check needs {needed} held-out trials, has {len(self.trials)}"
        scores = self.scores
        Z = np.stack(scores)
        z = Z[np.isfinite(Z)]
        n = z.size
        m2, m4 = float(np.mean(z ** 2)), float(np.mean(z ** 4))
        if abs(m2 - 1.0) > TOLERANCE * np.sqrt(2.0 / n):
            return f"predictive check: mean squared normal score {m2:.2f} over {len(scores)} trials (expected 1)"
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


class RivalTest:
    """Every trial's one-step-ahead log density of the population under each model; `blocker` compares them."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._table = np.empty((16, len(self.names)))  # grows by doubling; rows [:trials] are filled
        self.trials = 0

    @property
    def log_densities(self) -> np.ndarray:
        """(trials, models): each compared trial's log density under each model (a view)."""
        return self._table[:self.trials]

    def add(self, log_densities: Sequence[float]) -> None:
        """One compared trial: each model's log predictive density of the whole response vector."""
        row = np.asarray(log_densities, dtype=np.float64)
        if row.shape != (len(self.names),):
            raise ValueError(f"expected {len(self.names)} log densities, got shape {row.shape}")
        if self.trials == self._table.shape[0]:
            self._table = np.concatenate([self._table, np.empty_like(self._table)])
        self._table[self.trials] = row
        self.trials += 1

    def _differences(self, leader: str, rival: str) -> np.ndarray:
        """D_t: the leader's log density minus the rival's on each compared trial."""
        table = self.log_densities
        return table[:, self.names.index(leader)] - table[:, self.names.index(rival)]

    def advantage(self, leader: str, rival: str) -> float:
        """mean / standard error of the leader's per-trial log density advantage over `rival` (NaN below 2 trials)."""
        if self.trials < 2:
            return float("nan")
        diff = self._differences(leader, rival)
        se = diff.std(ddof=1) / np.sqrt(diff.size)
        if se == 0.0:
            return float("inf") if diff.mean() > 0 else float("-inf") if diff.mean() < 0 else 0.0
        return float(diff.mean() / se)

    def summed_se(self, leader: str, rival: str) -> float:
        """Standard error of the leader's summed per-trial advantage over `rival`, sqrt(T) sd(D)
        (NaN below 2 trials): how much the evidence gap would vary with other images."""
        if self.trials < 2:
            return float("nan")
        diff = self._differences(leader, rival)
        return float(diff.std(ddof=1) * np.sqrt(diff.size))

    def discounted_probability(self, leader: str, log_probs: Sequence[float], margin: float) -> float:
        """P(leader) from normalised `log_probs` (one per name) after every rival's log odds against
        it are cut by `margin` standard errors of their summed trial-by-trial difference: the
        probability at the low end of what other images would have given (NaN below 2 trials)."""
        if self.trials < 2:
            return float("nan")
        i = self.names.index(leader)
        gaps = np.array([log_probs[i] - log_probs[j] - margin * self.summed_se(leader, rival)
                         for j, rival in enumerate(self.names) if j != i], dtype=np.float64)
        if gaps.size == 0:
            return 1.0
        return float(np.exp(-np.logaddexp(0.0, np.logaddexp.reduce(-gaps))))

    def margin_blocker(self, leader: str, log_probs: Sequence[float], margin: float,
                       threshold: float) -> str | None:
        """Why `leader`'s probability does not reach `threshold` once discounted by `margin`
        standard errors (None = it does; see :meth:`discounted_probability`)."""
        if self.trials < 2:
            return f"evidence margin needs 2 compared trials, has {self.trials}"
        p = self.discounted_probability(leader, log_probs, margin)
        if p >= threshold:
            return None
        return (f"evidence margin: P({leader!r}) is {p:.4f} with each rival's evidence gap cut by "
                f"{margin:g} standard error(s) over {self.trials} trials (needs {threshold:g})")

    def blocker(self, leader: str, min_lead: float | None = None) -> str | None:
        """Why `leader`'s lead is not yet shown trial by trial (None = it is, against every rival).

        Without `min_lead` the advantage must reach the Student-t quantile (the test); with it, it
        must exceed `min_lead` standard errors (the default gate: a lead that one trial carries
        while the others are even scores exactly 1)."""
        trials = self.trials
        strict = min_lead is None
        what = "rival test" if strict else "rival lead"
        if trials < 2:
            return f"{what} needs 2 compared trials, has {trials}"
        needed = float(student_t.ppf(1.0 - RIVAL_ALPHA, trials - 1)) if strict else float(min_lead)
        for rival in self.names:
            if rival == leader:
                continue
            z = self.advantage(leader, rival)
            if not (z >= needed if strict else z > needed + 1e-9):  # a tie must not pass by round-off
                return (f"{what}: {leader!r} predicts better than {rival!r} by {z:.2f} standard errors "
                        f"over {trials} trials (needs {'' if strict else 'more than '}{needed:.2f})")
        return None
