"""Builtin models, priors, likelihood outcome tables, truths, protocol checks and plug-in models."""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from builders import retention_minimal_text
from orchestrator.models import (
    available_models, build_candidates, build_truth, check_protocol, get_model_class, make_likelihood, make_prior,
)
from orchestrator.models.likelihoods import Likelihood
from orchestrator.protocol import ProtocolError, parse_protocol_text
from orchestrator.protocol_checks import parse_checked

D = torch.float64

RETENTION = retention_minimal_text()


def retention():
    return parse_checked(RETENTION).protocol


BUILTIN_ARGS = {
    "retention_power": ({"t": [0.0, 5.0]}, {"a": 0.9, "b": 0.5}),
    "retention_exponential": ({"t": [0.0, 5.0]}, {"a": 0.9, "b": 0.1}),
    "orientation_von_mises": ({"theta": [0.0, 90.0]}, {"baseline": 1, "amplitude": 10, "kappa": 2, "pref": 0}),
    "orientation_gaussian": ({"theta": [0.0, 90.0]}, {"baseline": 1, "amplitude": 10, "width": 20, "pref": 0}),
    "contrast_naka_rushton": ({"c": [0.0, 0.2]}, {"baseline": 1, "rmax": 10, "c50": 0.2, "n": 2}),
    "contrast_linear_threshold": ({"c": [0.0, 0.5]}, {"baseline": 1, "slope": 10, "threshold": 0.1}),
    "orientation_contrast": ({"theta": [0.0, 90.0], "c": [1.0, 1.0]},
                             {"baseline": 1, "rmax": 10, "kappa": 2, "pref": 0, "c50": 0.2, "n": 2}),
    "divisive_normalization": ({"theta": [0.0, 90.0], "c": [1.0, 1.0]},
                               {"baseline": 1, "rmax": 10, "kappa": 2, "pref": 0, "sigma": 0.2, "n": 2}),
    "psychometric_logistic": ({"x": [20.0, 1000.0]}, {"threshold": 20, "slope": 1.5, "guess": 0.5, "lapse": 0.04}),
    "psychometric_weibull": ({"x": [20.0, 1000.0]}, {"threshold": 20, "slope": 1.5, "guess": 0.5, "lapse": 0.04}),
    "psychometric_cumulative_normal": ({"x": [20.0, 1000.0]}, {"threshold": 20, "slope": 1.5, "guess": 0.5, "lapse": 0.04}),
    "discounting_exponential": ({"r_ss": [10.0, 10.0], "t_ss": [0.0, 0.0], "r_ll": [20.0, 20.0], "t_ll": [1.0, 100.0]},
                                {"k": 0.05, "tau": 1.0}),
    "discounting_hyperbolic": ({"r_ss": [10.0, 10.0], "t_ss": [0.0, 0.0], "r_ll": [20.0, 20.0], "t_ll": [1.0, 100.0]},
                               {"k": 0.05, "tau": 1.0}),
}

EXPECTED = {  # value at the first stimulus, from the closed forms
    "retention_power": 0.9,
    "retention_exponential": 0.9,
    "orientation_von_mises": 11.0,
    "orientation_gaussian": 11.0,
    "contrast_naka_rushton": 1.0,
    "contrast_linear_threshold": 1.0,
    "orientation_contrast": 1 + 10 * 1 / (1 + 0.04),
    "divisive_normalization": 1 + 10 * 1 / (0.04 + 1),
    "psychometric_logistic": 0.5 + 0.46 * 0.5,
    "psychometric_weibull": 0.5 + 0.46 * (1 - math.exp(-1)),
    "psychometric_cumulative_normal": 0.5 + 0.46 * 0.5,
    "discounting_exponential": 1 / (1 + math.exp(-(20 * math.exp(-0.05) - 10))),
    "discounting_hyperbolic": 1 / (1 + math.exp(-(20 / 1.05 - 10))),
}


@pytest.mark.parametrize("model_id", sorted(BUILTIN_ARGS))
def test_builtin_closed_forms_and_broadcasting(model_id: str) -> None:
    cls = get_model_class(model_id)
    x, th = BUILTIN_ARGS[model_id]
    assert set(x) == set(cls.variables) and set(th) == set(cls.parameters)
    xs = {k: torch.tensor(v, dtype=D) for k, v in x.items()}
    # 3 parameter vectors x 2 stimuli by broadcasting
    ths = {k: torch.tensor([v, v, v], dtype=D).unsqueeze(-1) for k, v in th.items()}
    out = cls().mean(xs, ths)
    assert out.shape == (3, 2)
    assert out[0, 0].item() == pytest.approx(EXPECTED[model_id], rel=1e-9)
    assert torch.isfinite(out).all()


def test_registry_lists_builtins_and_gp() -> None:
    ids = available_models()
    assert {"retention_power", "orientation_contrast", "psychometric_weibull", "gaussian_process"} <= set(ids)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        get_model_class("nope")


@pytest.mark.parametrize("spec, ref", [
    ({"dist": "beta", "alpha": 2, "beta": 1}, stats.beta(2, 1)),
    ({"dist": "gamma", "shape": 4, "rate": 0.2}, stats.gamma(4, scale=5)),
    ({"dist": "lognormal", "mu": 0.5, "sigma": 0.5}, stats.lognorm(0.5, scale=math.exp(0.5))),
    ({"dist": "normal", "mean": 1, "sd": 2}, stats.norm(1, 2)),
    ({"dist": "uniform", "low": 0, "high": 180}, stats.uniform(0, 180)),
    ({"dist": "halfnormal", "scale": 2}, stats.halfnorm(scale=2)),
    ({"dist": "truncnormal", "mean": 0, "sd": 1, "low": 0, "high": 2}, stats.truncnorm(0, 2)),
])
def test_prior_median_density_and_sampling(spec: dict, ref) -> None:
    prior = make_prior(spec, "models.0.priors.x")
    assert prior.median() == pytest.approx(ref.median(), rel=1e-6)
    x = torch.tensor([ref.ppf(0.3), ref.ppf(0.7)], dtype=D)
    assert prior.log_prob(x).numpy() == pytest.approx(ref.logpdf(x.numpy()), rel=1e-6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1, s2 = prior.sample(4000, g1), prior.sample(4000, g2)
    assert torch.equal(s1, s2)  # deterministic given the generator
    assert stats.kstest(s1.numpy(), ref.cdf).pvalue > 1e-3
    # the unconstraining bijection round-trips
    tr = prior.to_unconstrained()
    assert torch.allclose(tr(tr.inv(x)), x)


def test_bad_prior_names_field() -> None:
    with pytest.raises(ValueError, match=r"models.0.priors.a.dist: unknown prior distribution 'cauchy'"):
        make_prior({"dist": "cauchy"}, "models.0.priors.a")
    with pytest.raises(ValueError, match=r"models.0.priors.a.beta: required"):
        make_prior({"dist": "beta", "alpha": 1}, "models.0.priors.a")


@pytest.mark.parametrize("kind, mean, n", [("bernoulli", 0.3, 1), ("binomial", 0.7, 10), ("poisson", 3.0, 1),
                                           ("poisson", 200.0, 1)])
def test_outcome_tables_are_distributions_and_match_scipy(kind: str, mean: float, n: int) -> None:
    lik = Likelihood(kind, n)
    means = torch.tensor([[mean, mean / 2]], dtype=D)
    grid = lik.outcome_grid(means)
    lp = lik.outcome_log_probs(means, grid)
    p = lp.exp()
    assert p.sum(-1).reshape(-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-9)
    ref = stats.binom(n, mean) if kind != "poisson" else stats.poisson(mean)
    k = int(grid.values[min(2, grid.values.shape[0] - 1)])
    assert p[0, 0, min(2, grid.values.shape[0] - 1)].item() == pytest.approx(ref.pmf(k), rel=1e-9, abs=1e-300)
    if grid.tail_edges is not None:  # large rates: binned tail approximates the exact bin masses
        edges = grid.tail_edges.numpy()
        head = grid.values.shape[0]
        upper = np.append(edges[1:], np.inf)
        exact = ref.cdf(upper - 1) - ref.cdf(edges - 1)
        assert np.abs(p[0, 0, head:].numpy() - exact).max() < 0.01


def test_gaussian_outcomes_discretise_density() -> None:
    lik = Likelihood("gaussian", 1)
    means = torch.tensor([[0.0, 3.0]], dtype=D)
    noise = torch.tensor([[1.0, 1.0]], dtype=D)
    grid = lik.outcome_grid(means, noise=noise)
    p = lik.outcome_log_probs(means, grid, noise).exp()
    assert p.sum(-1).reshape(-1).tolist() == pytest.approx([1.0, 1.0])
    centre = float((p[0, 1] * grid.values).sum())
    assert centre == pytest.approx(3.0, abs=1e-3)


def test_make_likelihood_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="response.kind"):
        make_likelihood({"kind": "multinomial"})


def test_truth_medians_and_sampling() -> None:
    p = retention()
    t = build_truth(p, "power:a=0.9")
    assert t.params["a"] == 0.9
    assert t.params["b"] == pytest.approx(1 - 0.5 ** 0.25)  # Beta(1,4) median
    assert t.mean({"lag": 0}) == pytest.approx(0.9)
    ys = [t.sample({"lag": 3}, np.random.default_rng([1, i])) for i in range(200)]
    assert ys == [t.sample({"lag": 3}, np.random.default_rng([1, i])) for i in range(200)]
    assert np.mean(ys) == pytest.approx(10 * 0.9 * 4 ** -t.params["b"], abs=0.4)


@pytest.mark.parametrize("spec, message", [
    ("nope:a=1", "unknown model 'nope'"),
    ("power:c=1", "no parameter(s) ['c']"),
    ("power:a=1.5", "outside the support"),
    ("power:a=x", "not a number"),
    ("power:a", "expected param=value"),
    ("", "MODEL:param=value"),
])
def test_truth_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        build_truth(retention(), spec)
    assert message in str(err.value)


def test_protocol_model_problems_are_reported_with_paths() -> None:
    bad = RETENTION.replace("builtin: retention_exponential", "builtin: retention_exp") \
        .replace("      b: {dist: beta, alpha: 1, beta: 4}\n", "      c: {dist: beta, alpha: 1, beta: 4}\n")
    with pytest.raises(ProtocolError) as err:
        parse_checked(bad)
    paths = {p.path for p in err.value.problems}
    assert "models.1.builtin" in paths
    assert "models.0.priors" in paths  # missing prior for b
    assert "models.0.priors.c" in paths  # not a parameter
    assert all(p.line is not None for p in err.value.problems)


def test_fixed_parameters_and_gaussian_noise_prior() -> None:
    text = """
name: psy
version: "1"
stimulus:
  parameters:
    x: {kind: continuous, low: 1, high: 100, log: true}
response: {kind: gaussian}
models:
  - name: logistic
    builtin: psychometric_logistic
    settings: {fixed: {guess: 0.5, lapse: 0.04}}
    priors:
      threshold: {dist: uniform, low: 1, high: 100}
      slope: {dist: lognormal, mu: 0, sigma: 1}
  - name: weibull
    builtin: psychometric_weibull
    settings: {fixed: {guess: 0.5, lapse: 0.04}}
    priors:
      threshold: {dist: uniform, low: 1, high: 100}
      slope: {dist: lognormal, mu: 0, sigma: 1}
      noise_sd: {dist: halfnormal, scale: 0.1}
"""
    with pytest.raises(ProtocolError) as err:
        parse_checked(text)
    assert "models.0.priors: missing prior for parameter 'noise_sd'" in str(err.value)
    ok = parse_checked(text.replace("      slope: {dist: lognormal, mu: 0, sigma: 1}\n  - name: weibull",
                                          "      slope: {dist: lognormal, mu: 0, sigma: 1}\n      noise_sd: {dist: halfnormal, scale: 0.1}\n  - name: weibull"))
    cands = build_candidates(ok.protocol)
    assert cands[0].fixed == {"guess": 0.5, "lapse": 0.04}
    assert set(cands[0].free_params) == {"threshold", "slope", "noise_sd"}


def test_third_party_model_via_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model installed by another distribution is found through the `cloop.models` entry point."""
    (tmp_path / "cloop_plugin_demo.py").write_text(textwrap.dedent("""
        import torch
        from orchestrator.models import EncodingModel

        class Hill(EncodingModel):
            id = "hill"
            parameters = ("top", "k")
            variables = ("t",)

            def mean(self, x, th):
                return th["top"] / (1 + x["t"] / th["k"])
    """))
    dist = tmp_path / "cloop_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cloop-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cloop.models]\nhill = cloop_plugin_demo:Hill\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "hill" in available_models()
    p = parse_checked(RETENTION.replace("builtin: retention_exponential", "builtin: hill").replace(
        "      a: {dist: beta, alpha: 2, beta: 1}\n      b: {dist: beta, alpha: 1, beta: 80}",
        "      top: {dist: beta, alpha: 2, beta: 1}\n      k: {dist: gamma, shape: 2, rate: 0.2}")).protocol
    assert check_protocol(p) == []
    t = build_truth(p, "exponential:top=0.8,k=5")
    assert t.mean({"lag": 5}) == pytest.approx(0.4)
    sys.modules.pop("cloop_plugin_demo", None)


def test_builtin_catalogue_describes_every_parameter_and_input_from_the_code() -> None:
    from orchestrator.models import builtin_catalogue, get_model_class

    entries = {m.id: m for m in builtin_catalogue(include_entry_points=False)}
    assert "retention_power" in entries and "orientation_contrast" in entries
    for mid, info in entries.items():
        cls = get_model_class(mid)
        assert tuple(p.name for p in info.parameters) == cls.parameters
        assert tuple(v.name for v in info.variables) == cls.variables
        assert all(p.meaning and p.axis in ("linear", "log") for p in info.parameters), mid
        assert all(v.meaning for v in info.variables), mid
    theta = {v.name: v for v in entries["orientation_contrast"].variables}["theta"]
    assert theta.unit == "deg"


def test_importing_the_builtin_library_registers_nothing_and_ids_are_unique() -> None:
    import orchestrator.models.builtin as builtin

    assert len(builtin.BUILTIN_MODELS) == 13
    assert all(cls.id == key for key, cls in builtin.BUILTIN_MODELS.items())


def test_design_catalogue_lists_every_strategy_make_design_accepts() -> None:
    from orchestrator.design import STRATEGIES, catalogue

    names = {n for d in catalogue() for n in (d.name, *d.aliases)}
    assert names == set(STRATEGIES)
    exact = next(d for d in catalogue() if d.name == "exact_grid")
    assert {s.name for s in exact.settings} >= {"mode", "points"}


@pytest.mark.parametrize("kind, mean, n", [("bernoulli", 0.3, 1), ("binomial", 0.7, 10), ("poisson", 3.0, 1),
                                           ("poisson", 25.0, 1), ("poisson", 200.0, 1)])
def test_outcome_probabilities_are_distributions_close_to_the_exact_ones(kind: str, mean: float, n: int) -> None:
    lik = Likelihood(kind, n)
    means = torch.tensor([[mean, mean / 2]], dtype=D)
    grid = lik.outcome_grid(means)
    for dtype in (torch.float64, torch.float32):
        p = lik.outcome_probs(means, grid, compute_dtype=dtype)
        assert p.dtype == dtype and bool((p >= 0).all())
        assert p.sum(-1).reshape(-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    p = lik.outcome_probs(means, grid)
    head = grid.values.shape[0]
    # exact outcomes: the same numbers as outcome_log_probs
    assert p[..., : head - 1].numpy() == pytest.approx(lik.outcome_log_probs(means, grid)[..., : head - 1].exp().numpy(),
                                                       abs=1e-12)
    if grid.tail_edges is not None:  # the binned tail approximates the exact bin masses
        ref = stats.poisson(mean)
        edges = grid.tail_edges.numpy()
        exact = ref.cdf(np.append(edges[1:], np.inf) - 1) - ref.cdf(edges - 1)
        assert np.abs(p[0, 0, head:].numpy() - exact).sum() < 0.1  # midpoint rule in bins ~1 SD wide
        assert float(p[0, 0, head:].sum()) == pytest.approx(float(exact.sum()), abs=1e-9)


def test_outcome_probabilities_of_a_gaussian_match_the_log_table() -> None:
    lik = Likelihood("gaussian", 1)
    means = torch.tensor([[0.0, 3.0]], dtype=D)
    noise = torch.tensor([[1.0, 0.5]], dtype=D)
    grid = lik.outcome_grid(means, noise=noise)
    p = lik.outcome_probs(means, grid, noise)
    assert p.numpy() == pytest.approx(lik.outcome_log_probs(means, grid, noise).exp().numpy(), abs=1e-12)


def test_outcome_probabilities_have_finite_gradients_where_the_poisson_tail_is_empty() -> None:
    lik = Likelihood("poisson", 1)
    rates = torch.tensor([[0.5, 60.0]], dtype=D, requires_grad=True)
    grid = lik.outcome_grid(rates)  # binned tail: the 0.5 rate has no mass there
    assert grid.tail_edges is not None
    p = lik.outcome_probs(rates, grid, compute_dtype=torch.float32)
    (p * torch.arange(p.shape[-1], dtype=torch.float32)).sum().backward()
    assert bool(torch.isfinite(rates.grad).all())


GP_1D = """
name: g
version: "1"
stimulus:
  parameters:
    x: {kind: continuous, low: 0, high: 1}
response: {kind: poisson}
models:
  - name: flat
    formula: "b"
    priors:
      b: {dist: gamma, shape: 2, rate: 0.2}
  - name: gp
    builtin: gaussian_process
    settings: SETTINGS
"""


def _gp_after(settings: str, rate: Any, n: int = 60) -> Any:
    from orchestrator.inference import ModelComparison
    from orchestrator.protocol_checks import parse_checked

    comparison = ModelComparison.from_protocol(parse_checked(GP_1D.replace("SETTINGS", settings)).protocol, 0)
    rng = np.random.default_rng(3)
    for i in range(n):
        x = float(rng.random())
        comparison.update({"x": x}, float(rng.poisson(rate(x))))
    return comparison.posterior("gp")


def test_the_gp_hyperparameter_posterior_recovers_the_lengthscale() -> None:
    wiggly = _gp_after("{}", lambda x: math.exp(1.5 + 1.2 * math.sin(2 * math.pi * x / 0.35)))
    smooth = _gp_after("{}", lambda x: math.exp(1.5 + 1.2 * math.sin(2 * math.pi * x / 3.0)))
    short = wiggly.hyper_moments()["lengthscale"]["mean"]
    long = smooth.hyper_moments()["lengthscale"]["mean"]
    assert short < 0.15 < 0.3 < long  # a 0.35 period vs a slow trend (grid 0.1 / 0.2 / 0.4 / 0.8)
    best = max(wiggly.hyper_log_weights(), key=lambda t: t[1])[0]
    assert best.lengthscale == 0.1


def test_gp_evidence_marginalises_the_grid_and_is_deterministic() -> None:
    rate = lambda x: 2.0 + 10.0 * math.exp(-0.5 * ((x - 0.3) / 0.1) ** 2)  # noqa: E731
    marginal, again = _gp_after("{}", rate, 30), _gp_after("{}", rate, 30)
    type2 = _gp_after("{hyper: type2}", rate, 30)
    fixed = _gp_after("{hyper: fixed}", rate, 30)
    assert marginal.log_evidence == again.log_evidence and math.isfinite(marginal.log_evidence)
    live = [f for f in marginal.fits if f.alive]
    assert len(marginal.fits) == 12 and 1 <= len(live) <= 12
    logs = torch.tensor([f.log_prior + f.log_evidence for f in live], dtype=D)
    assert marginal.log_evidence == pytest.approx(float(torch.logsumexp(logs, 0)))
    # the type-II maximum is the best point's evidence: above the average by at most log(points)
    best = max(f.log_evidence for f in live)
    assert type2.log_evidence == pytest.approx(best)
    assert best - math.log(12) <= marginal.log_evidence <= best
    assert len(fixed.fits) == 1 and (fixed.fits[0].lengthscale, fixed.fits[0].outputscale) == (0.25, 2.0)
    assert _gp_after("{lengthscale: 0.2}", rate, 5).fits[0].lengthscale == 0.2
    assert len(_gp_after("{lengthscale: 0.2}", rate, 5).fits) == 3  # outputscale still on its grid


def _poisson_grad_hess(f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return y - f.exp(), f.exp()


def _bernoulli_grad_hess(f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.sigmoid(f)
    return y - p, (p * (1 - p)).clamp_min(1e-10)


_REFERENCE_LIKELIHOODS = {  # d/df and -d2/df2 of log p(y|f), the GP's mean rule, log p(y|f)
    "poisson": (_poisson_grad_hess, lambda y: math.log((float(y.sum()) + 1.0) / (y.shape[0] + 1.0)),
                lambda yt, f: yt * f - f.exp() - math.lgamma(yt + 1.0)),
    "bernoulli": (_bernoulli_grad_hess,
                  lambda y: math.log((float(y.sum()) + 0.5) / (y.shape[0] + 0.5 - float(y.sum()))),
                  lambda yt, f: yt * torch.nn.functional.logsigmoid(f) + (1 - yt) * torch.nn.functional.logsigmoid(-f)),
}


def _reference_laplace(U: torch.Tensor, y: torch.Tensor, lengthscale: float, outputscale: float, m: float,
                       grad_hess: Any) -> Any:
    """A cold-started dense Laplace fit (R&W alg. 3.1, a fresh Cholesky per Newton step, converged
    to 1e-12): the predictive mean and variance of f at new unit inputs."""
    T = y.shape[0]
    K = outputscale * torch.exp(-0.5 * torch.cdist(U, U) ** 2 / lengthscale ** 2) + 1e-8 * torch.eye(T, dtype=D)
    f = torch.full((T,), m, dtype=D)
    for _ in range(100):
        g, W = grad_hess(f, y)
        sw = W.sqrt()
        L = torch.linalg.cholesky(torch.eye(T, dtype=D) + sw[:, None] * K * sw[None, :])
        b = W * (f - m) + g
        f_new = K @ (b - sw * torch.cholesky_solve((sw * (K @ b))[:, None], L)[:, 0]) + m
        done = float((f_new - f).abs().max()) < 1e-12
        f = f_new
        if done:
            break
    g, W = grad_hess(f, y)
    sw = W.sqrt()
    L = torch.linalg.cholesky(torch.eye(T, dtype=D) + sw[:, None] * K * sw[None, :])

    def predictive(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = outputscale * torch.exp(-0.5 * torch.cdist(u, U) ** 2 / lengthscale ** 2)
        v = torch.linalg.solve_triangular(L, (sw[:, None] * k.T), upper=False)
        return m + k @ g, outputscale - (v * v).sum(0)
    return predictive


def _reference_evidence(U: torch.Tensor, y: torch.Tensor, lengthscale: float, outputscale: float, kind: str) -> float:
    """Prequential log evidence sum_t log p(y_t | y_<t), every term from a from-scratch Laplace fit to
    y_<t (the mean is the link of the smoothed running mean of y_<t), 32-node Gauss-Hermite."""
    t_gh, w_gh = np.polynomial.hermite.hermgauss(32)
    nodes = torch.tensor(t_gh * math.sqrt(2.0), dtype=D)
    logw = torch.tensor(np.log(w_gh / math.sqrt(math.pi)), dtype=D)
    grad_hess, mean, loglik = _REFERENCE_LIKELIHOODS[kind]
    total = 0.0
    for t in range(y.shape[0]):
        m = mean(y[:t])
        if t == 0:
            mu, var = torch.tensor([m], dtype=D), torch.tensor([outputscale], dtype=D)
        else:
            mu, var = _reference_laplace(U[:t], y[:t], lengthscale, outputscale, m, grad_hess)(U[t:t + 1])
        total += float(torch.logsumexp(logw + loglik(float(y[t]), mu + var.clamp_min(1e-10).sqrt() * nodes), 0))
    return total


@pytest.mark.parametrize("kind,dense_below", [("poisson", None), ("poisson", 1), ("bernoulli", 1)])
def test_the_incremental_gp_evidence_equals_from_scratch_laplace_fits(kind: str, dense_below: int | None,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The online update (a bordered factor, preconditioned CG steps, one Cholesky at the mode) gives
    every hyperparameter point the evidence and predictive of cold-started dense fits; with
    dense_below=1 the CG path runs from the second trial on."""
    import orchestrator.models.gp as gp_module
    from orchestrator.inference import ModelComparison

    if dense_below is not None:
        monkeypatch.setattr(gp_module, "DENSE_BELOW", dense_below)
    text = GP_1D.replace("SETTINGS", "{}")
    if kind == "bernoulli":
        text = text.replace("response: {kind: poisson}", "response: {kind: bernoulli}").replace(
            "b: {dist: gamma, shape: 2, rate: 0.2}", "b: {dist: uniform, low: 0, high: 1}")
    comparison = ModelComparison.from_protocol(parse_checked(text).protocol, 0)
    rng = np.random.default_rng(11)
    for _ in range(50):
        x = float(rng.random())
        rate = math.exp(1.0 + 1.5 * math.sin(2 * math.pi * x / 0.6))
        y = float(rng.poisson(rate)) if kind == "poisson" else float(rng.random() < rate / (1 + rate))
        comparison.update({"x": x}, y)
    gp = comparison.posterior("gp")
    live = [f for f in gp.fits if f.alive]
    assert live and gp.U.shape[0] == 50
    u = torch.linspace(0, 1, 7, dtype=D).unsqueeze(-1)
    grad_hess = _REFERENCE_LIKELIHOODS[kind][0]
    for fit in live:
        ref = _reference_evidence(gp.U, gp.y, fit.lengthscale, fit.outputscale, kind)
        assert fit.log_evidence == pytest.approx(ref, abs=1e-8)
        mu, var = gp.fit_predictive(fit, u)
        ref_mu, ref_var = _reference_laplace(gp.U, gp.y, fit.lengthscale, fit.outputscale, gp.m, grad_hess)(u)
        assert torch.allclose(mu, ref_mu, atol=1e-8) and torch.allclose(var, ref_var, atol=1e-8)


def test_gp_hyper_setting_is_checked() -> None:
    from orchestrator.inference import ModelComparison
    from orchestrator.protocol_checks import parse_checked

    protocol = parse_checked(GP_1D.replace("SETTINGS", "{hyper: typo}")).protocol
    with pytest.raises(ValueError, match=r"models.1.settings.hyper: must be one of marginal, type2, fixed"):
        ModelComparison.from_protocol(protocol, 0)
