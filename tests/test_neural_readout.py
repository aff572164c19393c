"""The population readout is exact: incremental evidence equals the closed-form marginal likelihood."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from orchestrator.neural.readout import NIGPrior, PopulationReadout, batch_log_evidence


def _data(T: int = 60, d: int = 9, N: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray, NIGPrior]:
    rng = np.random.default_rng(seed)
    X = np.c_[rng.standard_normal((T, d - 1)), np.ones(T)]
    W = rng.standard_normal((N, d)) * 0.5
    Y = X @ W.T + rng.standard_normal((T, N)) * rng.uniform(0.3, 2.0, N)
    prior = NIGPrior(np.r_[np.full(d - 1, 2.0), 0.01], a0=2.0, b0=1.5)
    return X, Y, prior


def test_incremental_evidence_equals_batch_marginal_likelihood() -> None:
    X, Y, prior = _data()
    readout = PopulationReadout(Y.shape[1], prior)
    per_trial = [readout.update(x, y) for x, y in zip(X, Y)]
    batch = batch_log_evidence(X, Y, prior)
    assert readout.state.log_evidence == pytest.approx(float(batch.sum()), rel=1e-9, abs=1e-8)
    assert sum(per_trial) == pytest.approx(float(batch.sum()), rel=1e-9)


def test_posterior_mean_equals_ridge_solution() -> None:
    X, Y, prior = _data(T=40)
    readout = PopulationReadout(Y.shape[1], prior)
    for x, y in zip(X, Y):
        readout.update(x, y)
    ridge = np.linalg.solve(np.diag(prior.precision) + X.T @ X, X.T @ Y).T
    np.testing.assert_allclose(readout.state.means, ridge, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(readout.state.S, np.linalg.inv(np.diag(prior.precision) + X.T @ X), rtol=1e-7, atol=1e-12)


def test_masked_unit_equals_fit_without_its_missing_trials() -> None:
    X, Y, prior = _data(T=50, N=4)
    Ym = Y.copy()
    Ym[[3, 10, 11, 30], 2] = np.nan
    readout = PopulationReadout(4, prior)
    for x, y in zip(X, Ym):
        readout.update(x, y)
    keep = ~np.isnan(Ym[:, 2])
    alone = batch_log_evidence(X[keep], Y[keep][:, [2]], prior)[0]
    others = batch_log_evidence(X, Y[:, [0, 1, 3]], prior).sum()
    assert readout.state.log_evidence == pytest.approx(alone + others, rel=1e-9)
    assert set(readout.state.private) == {2}


def test_predictive_is_calibrated_on_data_from_the_prior() -> None:
    """Student-t predictive intervals cover at their nominal rate when the data follow the model."""
    from scipy import stats

    rng = np.random.default_rng(3)
    d, N, T = 6, 200, 30
    prior = NIGPrior(np.full(d, 1.0), a0=3.0, b0=2.0)
    sigma2 = stats.invgamma(prior.a0, scale=prior.b0).rvs(N, random_state=rng)
    W = rng.standard_normal((N, d)) * np.sqrt(sigma2[:, None] / prior.precision[None, :])
    readout = PopulationReadout(N, prior)
    hits = []
    for _ in range(T):
        x = rng.standard_normal(d)
        y = W @ x + rng.standard_normal(N) * np.sqrt(sigma2)
        df, loc, scale2 = readout.predictive(x[None])
        z = (y - loc[0]) / np.sqrt(scale2[0])
        hits.append(np.abs(z) <= stats.t.ppf(0.9, df))
        readout.update(x, y)
    coverage = float(np.mean(hits))
    assert 0.77 <= coverage <= 0.83  # nominal 0.80, 6,000 draws


def test_anscombe_transform_stabilises_poisson_variance_near_one() -> None:
    """The documented count transform: variance within 10% of 1 from 4 counts per window up."""
    from orchestrator.neural.comparison import TRANSFORMS

    rng = np.random.default_rng(5)
    for rate in (4.0, 10.0, 40.0):
        var = TRANSFORMS["anscombe"](rng.poisson(rate, 200_000).astype(float)).var()
        assert abs(var - 1.0) < 0.1, (rate, var)
    low = TRANSFORMS["anscombe"](rng.poisson(0.5, 200_000).astype(float)).var()
    assert low < 0.8  # below ~2 counts the transform under-states the noise: the readout's noise prior adapts


def _grid(d: int, noise: Any = None) -> Any:
    from orchestrator.neural.hyper import NoiseGrid, ReadoutGrid

    noise = noise or NoiseGrid.learned([0.25, 1.0, 4.0], 10.0)
    weights = [np.r_[np.full(d - 1, (d - 1) / g ** 2), 1.0] for g in (0.5, 1.0, 2.0)]
    return ReadoutGrid(5, weights, [1.0, 0.25, 1.0 / 16], noise)


def _masked_batch_evidence(X: np.ndarray, Y: np.ndarray, prior: NIGPrior) -> float:
    """Closed-form log evidence of every unit fitted on the trials it saw."""
    total = 0.0
    for u in range(Y.shape[1]):
        keep = ~np.isnan(Y[:, u])
        total += float(batch_log_evidence(X[keep], Y[keep][:, [u]], prior)[0])
    return total


def test_grid_evidence_of_every_component_equals_the_closed_form_masks_included() -> None:
    """Offset spreads and noise levels are closed-form corrections of the weight-scale readouts: every
    one of the 27 components equals its own NIG prior's batch marginal likelihood, and its posterior
    and predictive equal a readout fitted alone with that prior."""
    X, Y, _ = _data(T=40, N=5, seed=4)
    Y = 3.0 * Y
    Y[[2, 9, 10], 1] = np.nan
    Y[[0, 5, 30], 4] = np.nan
    grid = _grid(9)
    grid.set_scale(9.0)
    for x, y in zip(X, Y):
        grid.update(x, y)
    assert grid.K == 27 and set(grid.state.private) == {1, 4}
    shared = [0, 2, 3]
    for index in range(grid.K):
        prior = grid.prior(index)
        exact = _masked_batch_evidence(X, Y, prior)
        assert grid.component_evidence[index] == pytest.approx(exact, rel=1e-10), index
        alone = PopulationReadout(5, prior)
        for x, y in zip(X, Y):
            alone.update(x, y)
        state = grid.component_state(index)
        assert state.log_evidence == pytest.approx(alone.state.log_evidence, rel=1e-10)
        np.testing.assert_allclose(state.S, alone.state.S, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(state.means[shared], alone.state.means[shared], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(state.a, alone.state.a, rtol=1e-12)
        np.testing.assert_allclose(state.b, alone.state.b, rtol=1e-9)
        for u in (1, 4):
            np.testing.assert_allclose(state.private[u].mean, alone.state.private[u].mean, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(state.private[u].S, alone.state.private[u].S, rtol=1e-8, atol=1e-12)
        live = np.zeros(grid.K, dtype=bool)
        live[index] = True
        [(got, (df, loc, scale2))] = grid.component_predictives(X[:3], live)
        df_a, loc_a, scale2_a = alone.predictive(X[:3])
        assert got == index
        np.testing.assert_allclose(df, df_a)
        np.testing.assert_allclose(loc, loc_a, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(scale2, scale2_a, rtol=1e-8)


def test_grid_evidence_is_the_uniform_mixture_and_a_fixed_noise_prior_is_exact_too() -> None:
    from scipy.special import logsumexp

    from orchestrator.neural.hyper import NoiseGrid

    X, Y, _ = _data(T=30, N=5)
    for noise in (None, NoiseGrid.fixed(2.0, 1.5)):
        grid = _grid(9, noise)
        for x, y in zip(X, Y):
            grid.update(x, y)
        exact = [float(batch_log_evidence(X, Y, grid.prior(i)).sum()) for i in range(grid.K)]
        np.testing.assert_allclose(grid.component_evidence, exact, rtol=1e-10)
        assert grid.log_evidence == pytest.approx(float(logsumexp(exact) - np.log(grid.K)), rel=1e-10)
        assert grid.weights().sum() == pytest.approx(1.0)
        assert grid.marginal(0).shape == (3,) and grid.marginal(2).sum() == pytest.approx(1.0)
        assert grid.state.log_evidence == pytest.approx(max(exact), rel=1e-12)
    assert grid.prior(0).b0 == 1.5  # absolute: the session's scale does not enter a fixed prior


def test_learned_noise_level_makes_the_evidence_scale_free() -> None:
    """Responses in other units (times f, the scale times f^2) shift every component's log evidence
    by the same -(responses seen) log f, so the posterior over the grid, and between models, is unchanged."""
    X, Y, _ = _data(T=30, N=5, seed=2)
    Y[[3, 4], 2] = np.nan
    seen = int(np.isfinite(Y).sum())
    grids = []
    for f in (1.0, 1e-3):
        grid = _grid(9)
        grid.set_scale(2.0 * f ** 2)
        for x, y in zip(X, f * Y):
            grid.update(x, y)
        grids.append(grid)
    np.testing.assert_allclose(grids[1].component_evidence - grids[0].component_evidence,
                               -seen * np.log(1e-3), rtol=1e-9)
    np.testing.assert_allclose(grids[1].weights(), grids[0].weights(), rtol=1e-7, atol=1e-12)


def test_grid_refuses_a_scale_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="scale"):
        _grid(9).set_scale(0.0)


def test_held_out_scores_are_the_components_one_step_ahead_predictive() -> None:
    """A held-out trial read under any component gives that component's Student-t PIT, taken
    before the trial was absorbed; the check's trial count shrinks only for large populations."""
    from orchestrator.neural.check import normal_scores, pit, required_trials

    X, Y, _ = _data(T=10, N=5, seed=3)
    Y[4, 1] = np.nan  # a masked unit has its own posterior
    grid = _grid(9)
    grid.set_scale(2.0)
    for x, y in zip(X[:-1], Y[:-1]):
        grid.update(x, y)
    held = grid.held_out(X[-1], Y[-1])
    live = np.ones(grid.K, dtype=bool)
    for index, (df, loc, scale2) in grid.component_predictives(X[-1:], live)[::7]:
        expected = normal_scores(pit(Y[-1], df, loc[0], scale2[0]))
        np.testing.assert_allclose(held.scores(index), expected, rtol=1e-10, atol=1e-12)
    assert [required_trials(n) for n in (1, 20, 30, 40, 100, 1000)] == [8, 8, 6, 4, 4, 4]
