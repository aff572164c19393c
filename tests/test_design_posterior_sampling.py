"""The orientation benchmark's experimental designs (benchmarks/orientation.py): posterior sampling
over the truth, the joint objective, the decision utilities, the rollout planner and the MI design
told the preferred orientation. Their values are checked against the quantities they are defined
from (the oracle's gain, the mutual information), and their decisions for determinism and the
safety limits."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import orientation as bench  # noqa: E402

from orchestrator.design.acquisition import ModelDiscriminationMI  # noqa: E402
from orchestrator.inference import ModelComparison, generator  # noqa: E402
from orchestrator.models import build_truth  # noqa: E402
from orchestrator.models.views import ParticleView  # noqa: E402
from orchestrator.protocol import parse_protocol_text  # noqa: E402

SMALL = """
name: orientation-small
version: "1"
stimulus:
  parameters:
    orientation: {kind: continuous, low: 0, high: 180}
    contrast: {kind: continuous, low: 0.02, high: 1.0, log: true}
response: {kind: poisson}
models:
  - name: von_mises
    builtin: orientation_contrast
    inputs: {theta: orientation, c: contrast}
    priors:
      baseline: {dist: gamma, shape: 2, rate: 1}
      rmax: {dist: gamma, shape: 4, rate: 0.2}
      kappa: {dist: lognormal, mu: 0.5, sigma: 0.5}
      pref: {dist: uniform, low: 0, high: 180}
      c50: {dist: lognormal, mu: -1.6, sigma: 0.5}
      n: {dist: lognormal, mu: 0.7, sigma: 0.3}
    settings: {particles: 400}
  - name: gaussian
    formula: "b + g * max(c - c0, 0) * exp(-0.5 * (min(abs(theta - pref), 180 - abs(theta - pref)) / w)**2)"
    inputs: {theta: orientation, c: contrast}
    priors:
      b: {dist: gamma, shape: 2, rate: 1}
      g: {dist: gamma, shape: 4, rate: 0.2}
      w: {dist: lognormal, mu: 3.0, sigma: 0.4}
      pref: {dist: uniform, low: 0, high: 180}
      c0: {dist: uniform, low: 0.0, high: 0.3}
    settings: {particles: 400}
design:
  strategy: mutual_information
  characterize_threshold: 0.99
  settings: {raw_samples: 32, max_components: 64}
safety:
  contrast: {min: 0.05, max: 0.8}
  orientation: {min: 10, max: 170}
"""
TRUTH = "von_mises:baseline=1,rmax=20,kappa=2,pref=60,c50=0.2,n=2.5"


@pytest.fixture(scope="module")
def protocol():
    return parse_protocol_text(SMALL, "<small>").protocol


def _state(protocol, seed: int, trials: int) -> tuple[ModelComparison, object]:
    """A comparison after `trials` random-design trials against TRUTH."""
    truth = build_truth(protocol, TRUTH)
    comparison = ModelComparison.from_protocol(protocol, seed)
    rng = np.random.default_rng(seed)
    for i in range(trials):
        stim = {"orientation": float(rng.uniform(10, 170)), "contrast": float(rng.uniform(0.05, 0.8))}
        comparison.update(stim, truth.sample(stim, np.random.default_rng([seed, i])))
    return comparison, truth


def _points(n: int = 24) -> torch.Tensor:
    return torch.quasirandom.SobolEngine(2, scramble=True, seed=3).draw(n, dtype=torch.float64).unsqueeze(1)


def test_sampled_gain_with_the_true_neuron_is_the_oracles_gain(protocol) -> None:
    comparison, truth = _state(protocol, 5, 3)
    views = [p.predictive(64, generator(5, 1)) for p in comparison.posteriors]
    theta = {k: torch.tensor([v], dtype=torch.float64) for k, v in truth.params.items()}
    truth_view = ParticleView(truth.candidate, theta, torch.zeros(1, dtype=torch.float64))
    lik = comparison.candidates[0].likelihood
    X = _points()
    oracle = bench.OracleGain(views, comparison.log_probabilities(), 0, truth_view, comparison.space, lik)
    sampled = bench.SampledTruthGain(views, comparison.log_probabilities(), [(0, truth_view)], comparison.space, lik)
    with torch.no_grad():
        a, b = oracle(X), sampled(X)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    assert float(a.max()) > 0.01  # an informative state: the comparison is not trivial


def test_many_posterior_draws_give_the_mutual_information(protocol) -> None:
    comparison, _ = _state(protocol, 6, 2)
    views = [p.predictive(64, generator(6, 1)) for p in comparison.posteriors]
    logp = comparison.log_probabilities()
    lik = comparison.candidates[0].likelihood
    X = _points()
    mi = ModelDiscriminationMI(views, logp, comparison.space, lik)
    draws = bench.draw_hypotheses(views, logp, 4000, generator(6, 2))
    gain = bench.SampledTruthGain(views, logp, draws, comparison.space, lik)
    one = bench.SampledTruthGain(views, logp, draws[:1], comparison.space, lik)
    with torch.no_grad():
        a, b, c = mi(X), gain(X), one(X)
    # the Monte-Carlo average over the posterior converges to I(M; y); a single draw does not
    assert float((a - b).abs().max()) < 0.1 * float(a.max())
    assert float((a - c).abs().max()) > float((a - b).abs().max())


def test_draws_follow_the_model_probabilities(protocol) -> None:
    comparison, _ = _state(protocol, 7, 4)
    views = [p.predictive(64, generator(7, 1)) for p in comparison.posteriors]
    logp = comparison.log_probabilities()
    draws = bench.draw_hypotheses(views, logp, 3000, generator(7, 3))
    share = sum(j == 0 for j, _ in draws) / len(draws)
    assert abs(share - float(logp.exp()[0] / logp.exp().sum())) < 0.04
    assert all(isinstance(v, ParticleView) and v.logw.numel() == 1 for _, v in draws)


@pytest.mark.parametrize("label", ["posterior_sampling", "posterior_sampling/draws=3/until=0.9",
                                   "joint/lam=0.3", "utility/kind=3", "utility/kind=1",
                                   "rollout/S=16/L=4/R=2/G=16/N=32/reward=2/D=3", "pref_oracle",
                                   "locate/lam=0.5/bins=6"])
def test_benchmark_designs_are_deterministic_and_within_the_limits(protocol, label: str) -> None:
    truth = build_truth(protocol, TRUTH)

    def session(seed: int) -> list[dict]:
        comparison = ModelComparison.from_protocol(protocol, 11)
        design = bench.design_for(protocol, seed, truth, label)
        out = []
        for i in range(4):
            d = design.propose(comparison, i)
            protocol.check_safe(d.stimulus)
            assert 10 <= d.stimulus["orientation"] <= 170 and 0.05 <= d.stimulus["contrast"] <= 0.8
            out.append(d.stimulus)
            comparison.update(d.stimulus, truth.sample(d.stimulus, np.random.default_rng([11, i])))
        return out

    first = session(1)
    assert session(1) == first
    if label.startswith("posterior_sampling"):
        assert session(2) != first  # the draws depend on the seed


def test_decision_utilities_are_zero_where_the_models_agree(protocol) -> None:
    comparison, _ = _state(protocol, 8, 0)
    view = comparison.posteriors[0].predictive(64, generator(8, 1))
    logp = torch.log(torch.tensor([0.3, 0.7], dtype=torch.float64))
    lik = comparison.candidates[0].likelihood
    X = _points(8)
    for kind in ("maxp", "brier", "logodds", "doubt"):
        u = bench.DecisionUtility([view, view], logp, comparison.space, lik, kind)
        with torch.no_grad():
            assert float(u(X).abs().max()) < 1e-9, kind


def test_rollout_belief_tables_give_the_mutual_information(protocol) -> None:
    """The planner's batched I(M; y) over belief states equals the product's acquisition."""
    comparison, _ = _state(protocol, 9, 3)
    views = [p.predictive(64, generator(9, 1)) for p in comparison.posteriors]
    logp = comparison.log_probabilities()
    lik = comparison.candidates[0].likelihood
    X = _points(16)
    raw = comparison.space.design_to_raw(X[:, 0, :])
    comps = [v(raw) for v in views]
    log_w = [w - torch.logsumexp(w, 0) + logp[j] for j, (w, _, _) in enumerate(comps)]
    grid = lik.outcome_grid(torch.cat([m.reshape(-1) for _, m, _ in comps]),
                            torch.cat([lw.exp().unsqueeze(-1).expand_as(m).reshape(-1) for lw, (_, m, _) in zip(log_w, comps)]))
    probs = torch.cat([lik.outcome_probs(m, grid) for _, m, _ in comps])
    n = comps[0][1].shape[0]
    blocks = [(0, n), (n, probs.shape[0])]
    # the same state twice in the batch, once with a constant added to every log weight
    belief = torch.stack([torch.cat(log_w), torch.cat(log_w) + 3.0])
    ours = bench._discrimination_mi(belief, blocks, probs.reshape(probs.shape[0], -1), probs.shape[-1])
    with torch.no_grad():
        reference = ModelDiscriminationMI(views, logp, comparison.space, lik)(X)
    assert torch.allclose(ours[0], reference, rtol=1e-6, atol=1e-9)
    assert torch.allclose(ours[1], reference, rtol=1e-6, atol=1e-9)
    assert float(reference.max()) > 0.01


def test_one_trial_rollout_values_the_greedy_stimulus_at_its_information(protocol) -> None:
    """Over one trial, E[log P(model) after y] = I(M; y) + sum_m P(m) log P(m): the rollout's
    Monte-Carlo value of the greedy stimulus matches it."""
    comparison, _ = _state(protocol, 10, 2)
    design = bench.RolloutDesign(protocol, 3, {"H": 1, "S": 6000, "L": 1, "G": 8, "N": 64, "reward": 0})
    decision = design.propose(comparison, 0)
    x = comparison.space.raw_to_unit(comparison.space.stimulus_to_raw(decision.stimulus).reshape(1, -1))
    gen = generator(design.seed, 0, 0x7A1)  # the planner's own draw of each model's components
    views = [p.predictive(64, gen) for p in comparison.posteriors]
    logp = comparison.log_probabilities()
    with torch.no_grad():
        mi = float(ModelDiscriminationMI(views, logp, comparison.space, comparison.candidates[0].likelihood)(
            x.unsqueeze(1))[0])
    expected = mi + float((logp.exp() * logp).sum())
    assert mi > 0.01
    assert abs(decision.score - expected) < 0.02  # Monte-Carlo error of 6000 futures: ~0.006


def test_told_the_preferred_orientation_the_design_presents_near_it(protocol) -> None:
    truth = build_truth(protocol, TRUTH)
    for pref in (40.0, 130.0):
        told = build_truth(protocol, TRUTH.replace("pref=60", f"pref={pref:g}"))
        comparison = ModelComparison.from_protocol(protocol, 12)
        design = bench.PrefOracleDesign(protocol, 4, told)
        shown = design.propose(comparison, 0).stimulus["orientation"]
        assert abs((shown - pref + 90) % 180 - 90) < 25, (pref, shown)
    plain = bench.design_for(protocol, 4, truth, "mutual_information").propose(
        ModelComparison.from_protocol(protocol, 12), 0).stimulus["orientation"]
    assert plain != shown


def test_locate_information_is_the_chain_rule_over_preferred_orientation_bins(protocol) -> None:
    """lam = 0 gives I(M; y); lam = 1 gives I(M; y) + sum_m P(m) I(pref bin; y | m), each model's
    term computed on its own bins."""
    comparison, _ = _state(protocol, 13, 2)
    logp = comparison.log_probabilities()
    lik = comparison.candidates[0].likelihood
    X = _points(16)
    with torch.no_grad():
        for lam in (0.0, 1.0):
            acq, _, _ = bench.LocateDesign(protocol, 5, {"lam": lam, "bins": 6})._acquisition(comparison, 0)
            value = acq(X)
            if lam == 0.0:
                gen = generator(5, 0, 0xACE)  # the design's own draw of each model's components
                views = [p.predictive(128, gen) for p in comparison.posteriors]
                mi = ModelDiscriminationMI(views, logp, comparison.space, lik)(X)
                assert torch.allclose(value, mi, rtol=1e-5, atol=1e-8)
                continue
            within = torch.zeros_like(mi)
            for m in range(2):
                idx = [i for i, g in enumerate(acq.groups) if g == m]
                bins = [acq.views[i] for i in idx]
                masses = torch.stack([acq.log_probs[i] for i in idx])
                within += logp.exp()[m] * ModelDiscriminationMI(bins, masses, comparison.space, lik)(X)
            # (each MI bins the Poisson tail for its own components: agreement to ~1e-5 nats)
            assert torch.allclose(value, mi + within, rtol=0, atol=1e-4)
            assert float((value - mi).min()) >= 0 and float(within.max()) > 0.01
