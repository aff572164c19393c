"""Design strategies: safety limits, determinism, exact MI, and the discriminating design beating random."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from builders import retention_minimal_text
from orchestrator.design import Decision, make_design
from orchestrator.design.acquisition import ModelDiscriminationMI, ParameterInformation
from orchestrator.design.base import BaseStrategy
from orchestrator.inference import ModelComparison, generator
from orchestrator.models import build_truth
from orchestrator.protocol import ProtocolError, SafetyViolation, parse_protocol_text
from orchestrator.protocol_checks import parse_checked

RETENTION = retention_minimal_text({"design": {"strategy": "STRATEGY", "settings": "SETTINGS"}}) + "BATCH\nSAFETY\n"


def retention(strategy: str = "mutual_information", settings: str = "{}", safety: str = "", batch: int = 1):
    text = (RETENTION.replace("STRATEGY", strategy).replace("SETTINGS", settings)
            .replace("BATCH", f"  batch_size: {batch}" if batch > 1 else "").replace("SAFETY", safety))
    return parse_checked(text).protocol


MIXED = """
name: m
version: "1"
stimulus:
  parameters:
    orientation: {kind: continuous, low: 0, high: 180}
    contrast: {kind: continuous, low: 0.01, high: 1.0, log: true}
    shape: {kind: categorical, choices: [circle, square, star]}
    reps: {kind: integer, low: 1, high: 3}
response: {kind: poisson}
models:
  - name: vm
    builtin: orientation_contrast
    inputs: {theta: orientation, c: contrast}
    priors:
      baseline: {dist: gamma, shape: 2, rate: 1}
      rmax: {dist: gamma, shape: 4, rate: 0.2}
      kappa: {dist: lognormal, mu: 0.5, sigma: 0.5}
      pref: {dist: uniform, low: 0, high: 180}
      c50: {dist: lognormal, mu: -1.6, sigma: 0.5}
      n: {dist: lognormal, mu: 0.7, sigma: 0.3}
    settings: {particles: 500}
  - name: flat
    formula: "b + g*contrast"
    priors:
      b: {dist: gamma, shape: 2, rate: 1}
      g: {dist: gamma, shape: 4, rate: 0.2}
    settings: {particles: 500}
design:
  strategy: STRATEGY
  settings: {raw_samples: 16, maxiter: 4, max_components: 64}
  batch_size: BATCH
safety:
  contrast: {max: 0.5}
  orientation: {min: 10, max: 170}
  shape: {allowed: [circle, square]}
"""


def mixed(strategy: str, batch: int = 1):
    return parse_checked(MIXED.replace("STRATEGY", strategy).replace("BATCH", str(batch))).protocol


def _assert_within_limits(protocol, stim: dict) -> None:
    protocol.check_safe(stim)
    lim = protocol.safety_limits()
    for k, (lo, hi) in lim.items():
        assert lo <= stim[k] <= hi


@pytest.mark.parametrize("strategy", ["random", "sweep", "mutual_information", "parameter_estimation"])
def test_every_strategy_respects_safety_limits_in_a_mixed_space(strategy: str) -> None:
    protocol = mixed(strategy)
    comparison = ModelComparison.from_protocol(protocol, 1)
    design = make_design(protocol, 1)
    truth = build_truth(protocol, "vm:pref=90")
    for i in range(4):
        d = design.propose(comparison, i)
        assert isinstance(d, Decision)
        _assert_within_limits(protocol, d.stimulus)
        assert d.stimulus["shape"] in ("circle", "square")
        assert isinstance(d.stimulus["reps"], int)
        assert d.compute_ms >= 0
        comparison.update(d.stimulus, truth.sample(d.stimulus, np.random.default_rng([1, i])))


def test_batch_proposals_are_distinct_and_safe() -> None:
    protocol = mixed("mutual_information", batch=2)
    comparison = ModelComparison.from_protocol(protocol, 4)
    d = make_design(protocol, 4).propose(comparison, 0)
    assert len(d.batch) == 2 and d.batch[0] == d.stimulus
    assert d.batch[0] != d.batch[1]
    for s in d.batch:
        _assert_within_limits(protocol, s)
    p = retention(batch=3)
    d = make_design(p, 0).propose(ModelComparison.from_protocol(p, 0), 0)
    assert len({s["lag"] for s in d.batch}) == 3  # greedy joint MI with X_pending: no repeats


def test_proposals_are_deterministic_given_seed_and_history() -> None:
    protocol = mixed("mutual_information")
    runs = []
    for _ in range(2):
        comparison = ModelComparison.from_protocol(protocol, 9)
        design = make_design(protocol, 9)
        seq = []
        for i, y in enumerate([3.0, 12.0, 0.0]):
            d = design.propose(comparison, i)
            seq.append(d.stimulus)
            comparison.update(d.stimulus, y)
        runs.append(seq)
    assert runs[0] == runs[1]


def test_random_design_covers_integer_range_and_respects_safety() -> None:
    p = retention("random", safety="safety:\n  lag: {min: 5, max: 40}")
    design = make_design(p, 0)
    lags = [design.propose(None, i).stimulus["lag"] for i in range(400)]
    assert min(lags) == 5 and max(lags) == 40
    assert all(isinstance(v, int) for v in lags)


def test_mi_design_never_leaves_narrowed_safety_limits() -> None:
    p = retention("mutual_information", safety="safety:\n  lag: {min: 3, max: 30}")
    comparison = ModelComparison.from_protocol(p, 0)
    design = make_design(p, 0)
    truth = build_truth(p, "power")
    for i in range(5):
        d = design.propose(comparison, i)
        assert 3 <= d.stimulus["lag"] <= 30
        comparison.update(d.stimulus, truth.sample(d.stimulus, np.random.default_rng([0, i])))


def test_a_proposal_outside_the_limits_is_a_bug_that_raises() -> None:
    p = retention("random")

    class Broken(BaseStrategy):
        name = "broken"

        def propose(self, comparison, trial_index):
            self.space.design_to_stimulus = lambda z: {"lag": 500}  # bypasses clipping
            return self.finish(torch.zeros(1, 1), "bug", None, 0.0)

    with pytest.raises(SafetyViolation):
        Broken(p, 0).propose(None, 0)


def test_sweep_cycles_fixed_values() -> None:
    p = retention("sweep", settings="{values: [0, 1, 2, 4, 7]}")
    design = make_design(p, 0)
    assert [design.propose(None, i).stimulus["lag"] for i in range(7)] == [0, 1, 2, 4, 7, 0, 1]
    with pytest.raises(Exception) as err:
        parse_checked(RETENTION.replace("STRATEGY", "sweep").replace("SETTINGS", "{values: [0, 500]}")
                            .replace("BATCH", "").replace("SAFETY", ""))
    assert "design.settings" in str(err.value)


def test_unknown_strategy_is_a_protocol_error_and_override_is_checked() -> None:
    with pytest.raises(Exception) as err:
        retention("simulated_annealing")
    assert "design.strategy" in str(err.value) and "simulated_annealing" in str(err.value)
    with pytest.raises(ValueError, match="unknown strategy"):
        make_design(retention(), 0, "nope")


def test_staircase_steps_down_after_two_correct_and_up_after_an_error() -> None:
    text = """
name: s
version: "1"
stimulus:
  parameters:
    x: {kind: continuous, low: 0, high: 100}
response: {kind: bernoulli}
models:
  - name: logistic
    builtin: psychometric_logistic
    inputs: {x: x}
    settings: {fixed: {guess: 0.5, lapse: 0.04}}
    priors:
      threshold: {dist: uniform, low: 0, high: 100}
      slope: {dist: lognormal, mu: -1, sigma: 1}
  - name: weibull
    builtin: psychometric_weibull
    settings: {fixed: {guess: 0.5, lapse: 0.04}}
    priors:
      threshold: {dist: uniform, low: 1, high: 100}
      slope: {dist: lognormal, mu: 0.5, sigma: 0.5}
design:
  strategy: staircase
  settings: {start: 50, step: 10}
"""
    p = parse_checked(text).protocol
    comparison = ModelComparison.from_protocol(p, 0)
    design = make_design(p, 0)
    levels = []
    for i, y in enumerate([1, 1, 1, 1, 0, 1, 1]):
        d = design.propose(comparison, i)
        levels.append(d.stimulus["x"])
        comparison.update(d.stimulus, y)
    # the error at 30 is a reversal: the step halves to 5; the next two correct reverse again (2.5)
    assert levels == [50, 50, 40, 40, 30, 35, 35]
    assert design.propose(comparison, 7).stimulus["x"] == pytest.approx(32.5)


def test_discrimination_mi_equals_brute_force_sum() -> None:
    p = retention()
    comparison = ModelComparison.from_protocol(p, 0)
    comparison.update({"lag": 5}, 4)
    views = [post.predictive(64, generator(0)) for post in comparison.posteriors]
    logp = comparison.log_probabilities()
    design = make_design(p, 0)
    acq = ModelDiscriminationMI(views, logp, design.space, comparison.candidates[0].likelihood)
    X = torch.tensor([[[0.0]], [[7.0]], [[60.0]]], dtype=torch.float64)
    got = acq(X).detach().numpy()
    from scipy import stats

    pi = logp.exp().numpy()
    for j, lag in enumerate([0, 7, 60]):
        pm = []
        for v in views:
            w = v.logw.exp().numpy()
            means = v(torch.tensor([[float(lag)]], dtype=torch.float64))[1][:, 0].numpy()
            pm.append((w[:, None] * stats.binom.pmf(np.arange(11)[None, :], 10, np.clip(means, 1e-9, 1 - 1e-9)[:, None])).sum(0))
        pm = np.array(pm)
        mix = (pi[:, None] * pm).sum(0)
        mi = sum(pi[m] * np.sum(pm[m] * np.log(pm[m] / mix)) for m in range(2))
        assert got[j] == pytest.approx(mi, rel=1e-6, abs=1e-9)
    # parameter information is an MI too: non-negative, zero where the model predicts no variation
    info = ParameterInformation(views[0], design.space, comparison.candidates[0].likelihood)
    vals = info(X).detach()
    assert bool((vals >= 0).all()) and float(vals[1]) > 0


def _trials_to(protocol, design_name: str, seed: int, crit: float, cap: int) -> int:
    truth = build_truth(protocol, "power:a=0.9025,b=0.4861")
    comparison = ModelComparison.from_protocol(protocol, seed)
    design = make_design(protocol, seed, design_name)
    for i in range(cap):
        d = design.propose(comparison, i)
        comparison.update(d.stimulus, truth.sample(d.stimulus, np.random.default_rng([seed, i])))
        if comparison.probabilities()["power"] >= crit:
            return i + 1
    return cap + 1


def test_discriminating_design_beats_random_on_retention() -> None:
    text = (RETENTION.replace("STRATEGY", "mutual_information")
            .replace("SETTINGS", "{mode: discriminate, max_components: 128}").replace("BATCH", "").replace("SAFETY", "")
            .replace("    inputs: {t: lag}\n", "    inputs: {t: lag}\n    settings: {particles: 500}\n"))
    p = parse_checked(text).protocol
    assert p.models[0].settings == {"particles": 500}
    mi = [_trials_to(p, "mutual_information", s, 0.95, 12) for s in range(6)]
    rnd = [_trials_to(p, "random", s, 0.95, 12) for s in range(6)]
    assert statistics.median(mi) <= 5
    assert statistics.median(mi) < statistics.median(rnd)
    assert sum(mi) < sum(rnd)


def test_small_discrete_problems_run_exact_grid_ado_and_others_do_not() -> None:
    from orchestrator.design import ExactGridDesign, InformationDesign

    assert isinstance(make_design(retention(), 0), ExactGridDesign)
    assert isinstance(make_design(retention(settings="{exact: false}"), 0), InformationDesign)
    assert isinstance(make_design(mixed("mutual_information"), 0), InformationDesign)


def test_exact_grid_mi_equals_brute_force_over_the_grid() -> None:
    from scipy import stats

    p = retention(strategy="exact_grid")
    comparison = ModelComparison.from_protocol(p, 0)
    design = make_design(p, 0)
    comparison.update({"lag": 5}, 4)
    mi, _, phase = design.scores(comparison)
    assert phase == "mutual_information" and mi.shape == (101,)
    pi = comparison.log_probabilities().exp().numpy()
    for lag in (0, 7, 60):
        pm = []
        for post in comparison.posteriors:
            w = post.weights().numpy()
            means = post.candidate.mean(torch.tensor([[float(lag)]], dtype=torch.float64), post.theta)[:, 0].numpy()
            pm.append((w[:, None] * stats.binom.pmf(np.arange(11)[None, :], 10,
                                                    np.clip(means, 1e-9, 1 - 1e-9)[:, None])).sum(0))
        pm = np.array(pm)
        mix = (pi[:, None] * pm).sum(0)
        exact = sum(pi[m] * np.sum(pm[m] * np.log(pm[m] / mix)) for m in range(2))
        assert float(mi[lag]) == pytest.approx(exact, rel=1e-4, abs=1e-7)


def test_exact_grid_discretises_continuous_spaces_deterministically() -> None:
    text = RETENTION.replace("{kind: integer, low: 0, high: 100}", "{kind: continuous, low: 0, high: 100}")
    text = text.replace("STRATEGY", "mutual_information").replace("SETTINGS", "{}").replace("BATCH", "")
    p = parse_checked(text.replace("SAFETY", "safety:\n  lag: {max: 50}")).protocol
    runs = []
    for _ in range(2):
        comparison = ModelComparison.from_protocol(p, 3, "smc")
        design = make_design(p, 3, "exact_grid")
        stims = []
        for i, y in enumerate([7, 3, 5, 1]):
            d = design.propose(comparison, i)
            _assert_within_limits(p, d.stimulus)
            stims.append(d.stimulus["lag"])
            comparison.update(d.stimulus, y)
        assert comparison.exact  # the exact design switched the session to grid posteriors
        runs.append((stims, comparison.probabilities()))
    assert runs[0] == runs[1]


def test_exact_grid_refuses_models_it_cannot_grid_with_the_limit() -> None:
    with pytest.raises(ValueError, match="at most 3"):
        make_design(mixed("mutual_information"), 0, "exact_grid")


CAPACITY = """
name: c
version: "1"
stimulus:
  parameters:
PARAMS
response: {kind: bernoulli}
models:
  - name: a
    formula: "p"
    priors: {p: {dist: beta, alpha: 1, beta: 1}}
  - name: b
    formula: "q*0.5"
    priors: {q: {dist: beta, alpha: 1, beta: 1}}
design:
  strategy: STRATEGY
  settings: SETTINGS
  batch_size: BATCH
"""


def _capacity(params: str, strategy: str = "mutual_information", batch: int = 1, settings: str = "{}"):
    from orchestrator.protocol import Protocol

    text = (CAPACITY.replace("PARAMS", params).replace("STRATEGY", strategy).replace("BATCH", str(batch))
            .replace("SETTINGS", settings))
    import yaml

    return Protocol.model_validate(yaml.safe_load(text))  # the schema only: check_protocol is under test


def _choices(n: int) -> str:
    return "    c: {kind: categorical, choices: [" + ", ".join(str(i) for i in range(n)) + "]}"


@pytest.mark.parametrize("params, strategy, batch, field, limit", [
    ("\n".join(f"    x{i}: {{kind: continuous, low: 0, high: 1}}" for i in range(6)), "sweep", 1,
     "design.settings.points", "100000"),
    ("    x: {kind: continuous, low: 0, high: 1}", "mutual_information", 1_000_000, "design.batch_size", "256"),
    (_choices(20_000), "mutual_information", 1, "stimulus.parameters.c.choices", "10000"),
    (_choices(1_000_000), "random", 1, "stimulus.parameters.c.choices", "10000"),
])
def test_check_protocol_refuses_what_the_design_cannot_run_quickly(params, strategy, batch, field, limit) -> None:
    import time

    from orchestrator.design import check_protocol

    protocol = _capacity(params, strategy, batch)
    t0 = time.perf_counter()
    problems = check_protocol(protocol)
    assert time.perf_counter() - t0 < 5.0  # no enumeration: microseconds unloaded
    assert problems and problems[0][0] == field and limit in problems[0][1], problems
    with pytest.raises(ValueError, match=limit):  # building the strategy directly refuses it too
        make_design(protocol, 0)


def test_a_discrete_space_larger_than_the_exhaustive_limit_is_sampled_not_differentiated() -> None:
    from orchestrator.design import check_protocol

    protocol = _capacity(_choices(5_001), settings="{exact: false}")
    assert check_protocol(protocol) == []
    comparison = ModelComparison.from_protocol(protocol, 0)
    design = make_design(protocol, 0)
    first = design.propose(comparison, 0)  # crashed: "element 0 of tensors does not require grad"
    assert first.stimulus["c"] in range(5_001) and first.score is not None
    assert design.propose(comparison, 0).stimulus == first.stimulus  # deterministic


def test_the_particle_mixture_model_returns_a_botorch_posterior_the_acquisition_reads() -> None:
    from botorch.posteriors import Posterior

    from orchestrator.design.acquisition import ParticleMixturePosterior

    p = retention(settings="{exact: false}")
    comparison = ModelComparison.from_protocol(p, 0, "smc")
    comparison.update({"lag": 5}, 4)
    views = [post.predictive(64, generator(0)) for post in comparison.posteriors]
    acq = ModelDiscriminationMI(views, comparison.log_probabilities(), make_design(p, 0).space,
                                comparison.candidates[0].likelihood)
    X = torch.tensor([[0.0], [7.0], [60.0]], dtype=torch.float64)
    post = acq.model.posterior(X)
    assert isinstance(post, Posterior) and isinstance(post, ParticleMixturePosterior)
    pi = comparison.log_probabilities().exp()
    expect = sum(float(pi[m]) * (v.logw.exp() @ v(X)[1]) for m, v in enumerate(views))
    assert torch.allclose(post.mean.reshape(-1), expect)
    draws = post.rsample(torch.Size([5]), generator=torch.Generator().manual_seed(0))
    assert draws.shape == (5, 3, 1) and bool(((draws >= 0) & (draws <= 1)).all())


def test_simulate_runs_the_exact_grid_design_by_name_and_replays_identically() -> None:
    from orchestrator.simulate import SimulationConfig, simulate

    p = retention()
    config = SimulationConfig(truth="exponential:a=0.8,b=0.02", design="exact_grid", seed=5, max_trials=6,
                              stop_at=0.999)
    first = [(r["stimulus"], r["response"], r["model_probabilities"]) for r in simulate(p, config)]
    again = [(r["stimulus"], r["response"], r["model_probabilities"]) for r in simulate(p, config)]
    assert len(first) == 6 and first == again
    assert first[-1][2]["exponential"] > first[0][2]["exponential"]


CONTINUOUS = MIXED.replace("    shape: {kind: categorical, choices: [circle, square, star]}\n", "").replace(
    "    reps: {kind: integer, low: 1, high: 3}\n", "").replace("  shape: {allowed: [circle, square]}\n", "").replace(
    "  settings: {raw_samples: 16, maxiter: 4, max_components: 64}\n", "  settings: SETTINGS\n")


def continuous(settings: str = "{}"):
    return parse_checked(CONTINUOUS.replace("STRATEGY", "discriminate").replace("BATCH", "1")
                         .replace("SETTINGS", settings)).protocol


def test_the_batched_search_finds_the_best_stimulus_of_a_dense_grid_deterministically() -> None:
    protocol = continuous()
    comparison = ModelComparison.from_protocol(protocol, 5)
    for stim, y in [({"orientation": 40.0, "contrast": 0.3}, 9.0), ({"orientation": 130.0, "contrast": 0.1}, 2.0)]:
        comparison.update(stim, y)
    design = make_design(protocol, 5)
    assert design.optimizer == "batched" and design.max_components == 128
    acq, _, _ = design._acquisition(comparison, 2)
    x, score = design._optimize(acq, 2)
    assert design._optimize(acq, 2)[0].tolist() == x.tolist()  # deterministic given seed and trial
    with torch.no_grad():
        assert float(acq(x.unsqueeze(0))[0]) == pytest.approx(score)
        u = torch.linspace(0, 1, 61, dtype=torch.float64)
        grid = torch.cartesian_prod(u, u)
        best = float(acq(grid.unsqueeze(1)).max())
    assert score >= best - 0.01 * best  # within 1% of the best of 3721 grid stimuli
    d1, d2 = make_design(protocol, 5).propose(comparison, 2), make_design(protocol, 5).propose(comparison, 2)
    assert d1.stimulus == d2.stimulus
    _assert_within_limits(protocol, d1.stimulus)


def test_the_optimizer_setting_is_checked() -> None:
    assert make_design(continuous("{optimizer: lbfgs}"), 0).max_components == 512
    with pytest.raises(ProtocolError, match=r":\d+: design.settings.optimizer: must be batched or lbfgs, not 'newton'"):
        continuous("{optimizer: newton}")
