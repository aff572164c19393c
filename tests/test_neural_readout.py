"""The population readout is exact: incremental evidence equals the closed-form marginal likelihood."""
from __future__ import annotations

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


def test_snr_grid_evidence_is_the_exact_mixture_of_batch_evidences() -> None:
    from scipy.special import logsumexp

    from orchestrator.neural.hyper import ReadoutGrid

    X, Y, _ = _data(T=30, N=5)
    priors = [NIGPrior(np.r_[np.full(8, 8.0 / g ** 2), 0.01], 2.0, 1.5) for g in (0.5, 1.0, 2.0)]
    grid = ReadoutGrid(5, priors)
    for x, y in zip(X, Y):
        grid.update(x, y)
    exact = logsumexp([batch_log_evidence(X, Y, p).sum() for p in priors]) - np.log(3)
    assert grid.log_evidence == pytest.approx(float(exact), rel=1e-9)
    assert grid.weights().sum() == pytest.approx(1.0) and grid.state is grid.best.state


def test_snr_grid_with_masked_units_matches_each_prior_fitted_alone() -> None:
    """The stacked grid keeps masking exact: every component equals its prior's own readout."""
    from orchestrator.neural.hyper import ReadoutGrid

    X, Y, _ = _data(T=40, N=5, seed=4)
    Y[[2, 9, 10], 1] = np.nan
    Y[[5, 30], 4] = np.nan
    priors = [NIGPrior(np.r_[np.full(8, 8.0 / g ** 2), 0.01], 2.0, 1.5) for g in (0.5, 1.0, 2.0)]
    grid = ReadoutGrid(5, priors)
    alone = [PopulationReadout(5, p) for p in priors]
    for x, y in zip(X, Y):
        grid.update(x, y)
        for r in alone:
            r.update(x, y)
    for k, (p, r) in enumerate(zip(priors, alone)):
        keep1, keep4 = ~np.isnan(Y[:, 1]), ~np.isnan(Y[:, 4])
        exact = (batch_log_evidence(X, Y[:, [0, 2, 3]], p).sum() + batch_log_evidence(X[keep1], Y[keep1][:, [1]], p)[0]
                 + batch_log_evidence(X[keep4], Y[keep4][:, [4]], p)[0])
        assert grid.component_evidence[k] == pytest.approx(float(exact), rel=1e-9)
        assert grid.components[k].state.log_evidence == pytest.approx(r.state.log_evidence, rel=1e-12)
        np.testing.assert_allclose(grid.components[k].state.private[1].mean, r.state.private[1].mean, rtol=1e-10)
        _, loc_g, s2_g = grid.components[k].predictive(X[:3])
        _, loc_r, s2_r = r.predictive(X[:3])
        np.testing.assert_allclose(loc_g, loc_r, rtol=1e-10)
        np.testing.assert_allclose(s2_g, s2_r, rtol=1e-10)
    assert set(grid.state.private) == {1, 4}
    with pytest.raises(RuntimeError):
        grid.components[0].update(X[0], Y[0])
