"""The trial-level rival test: a population model is declared only when it predicts better trial by trial."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.neural.check import RIVAL_ALPHA, RivalTest
from orchestrator.neural.comparison import PopulationComparison
from orchestrator.neural.truth import build_population_truth
from orchestrator.protocol import load_protocol
from tests.test_neural_helpers import population_protocol


def _test_with(diffs: list[float]) -> RivalTest:
    test = RivalTest(["a", "b"])
    for d in diffs:
        test.add([d, 0.0])
    return test


def test_a_consistent_lead_passes_and_a_lead_from_one_trial_does_not() -> None:
    rng = np.random.default_rng(0)
    steady = _test_with(list(1.0 + 0.5 * rng.standard_normal(12)))
    assert steady.blocker("a") is None
    assert "rival test" in steady.blocker("b")  # the rival trails: never declared
    # the same total lead (12 nats) from one trial while the other 11 go slightly the other way
    lumpy = _test_with([14.0] + [-2.0 / 11] * 11)
    assert sum(np.stack(lumpy.log_densities)[:, 0]) == pytest.approx(12.0)
    reason = lumpy.blocker("a")
    assert reason is not None and "'a' predicts better than 'b'" in reason and "12 trials" in reason


def test_the_lead_gate_refuses_a_lead_that_one_or_two_trials_carry() -> None:
    """The stopping.rival_lead gate at 1 standard error: one decisive trial among even ones scores
    exactly 1 and is held back, so is any lead an opposing trial offsets; a lead two trials share
    passes. At the default 1.5, two decisive trials of 10 (exactly 1.5) are held back, three pass."""
    for trials in (3, 8, 30):
        one = _test_with([9.0] + [0.0] * (trials - 1))
        assert one.advantage("a", "b") == pytest.approx(1.0)
        reason = one.blocker("a", min_lead=1.0)
        assert reason is not None and reason.startswith("rival lead: 'a' predicts better than 'b'")
        assert "needs more than 1.00" in reason
        two = _test_with([9.0, 9.0] + [0.0] * (trials - 2))
        assert two.blocker("a", min_lead=1.0) is None  # sqrt(2 (T - 1) / (T - 2)) > 1 standard errors
        assert "rival lead" in two.blocker("b", min_lead=1.0)
    assert _test_with([9.0, 9.0, -9.0, 0.0]).blocker("a", min_lead=1.0) is not None
    assert "rival lead needs 2 compared trials" in _test_with([5.0]).blocker("a", min_lead=1.0)
    two_of_ten = _test_with([9.0, 9.0] + [0.0] * 8)
    assert two_of_ten.advantage("a", "b") == pytest.approx(1.5)
    assert "needs more than 1.50" in two_of_ten.blocker("a", min_lead=1.5)
    assert _test_with([9.0, 9.0, 9.0] + [0.0] * 7).blocker("a", min_lead=1.5) is None


def _equal_prior_log_probs(total: float) -> list[float]:
    """Normalised log P of two models with equal priors whose evidence differs by `total` nats."""
    return [-float(np.logaddexp(0.0, -total)), -float(np.logaddexp(0.0, total))]


def test_the_evidence_margin_cuts_each_rivals_gap_by_its_standard_error() -> None:
    """stopping.evidence_margin: P(leader) recomputed with the log odds against the rival lowered by
    margin x sqrt(T) sd(D). Twelve steady trials keep their probability; the same 12 nats from one
    trial among even ones have a summed standard error of 12, so one standard error leaves P = .5."""
    rng = np.random.default_rng(0)
    steady = _test_with(list(1.0 + 0.1 * rng.standard_normal(12)))
    lumpy = _test_with([12.0] + [0.0] * 11)
    for test in (steady, lumpy):
        diffs = test.log_densities[:, 0]
        log_probs = _equal_prior_log_probs(float(diffs.sum()))
        assert test.discounted_probability("a", log_probs, 0.0) == pytest.approx(np.exp(log_probs[0]))
        se = float(diffs.std(ddof=1) * np.sqrt(diffs.size))
        assert test.summed_se("a", "b") == pytest.approx(se)
        assert test.discounted_probability("a", log_probs, 1.0) == pytest.approx(1.0 / (1.0 + np.exp(-(diffs.sum() - se))))
    assert lumpy.summed_se("a", "b") == pytest.approx(12.0)
    assert steady.margin_blocker("a", _equal_prior_log_probs(float(steady.log_densities[:, 0].sum())), 1.0, 0.99) is None
    reason = lumpy.margin_blocker("a", _equal_prior_log_probs(12.0), 1.0, 0.99)
    assert reason == ("evidence margin: P('a') is 0.5000 with each rival's evidence gap cut by 1 standard "
                      "error(s) over 12 trials (needs 0.99)")
    assert "needs 2 compared trials" in _test_with([5.0]).margin_blocker("a", _equal_prior_log_probs(5.0), 1.0, 0.99)


def test_the_evidence_margin_sums_over_every_rival() -> None:
    """With three models the discounted P(leader) is 1 / (1 + sum_r exp(-(log odds_r - margin se_r)))."""
    test = RivalTest(["a", "b", "c"])
    rng = np.random.default_rng(1)
    for _ in range(10):
        test.add([1.0 + rng.standard_normal(), 0.0, 0.5 * rng.standard_normal()])
    table = test.log_densities
    lp = table.sum(0) - np.logaddexp.reduce(table.sum(0))
    gaps = [lp[0] - lp[j] - 2.0 * np.std(table[:, 0] - table[:, j], ddof=1) * np.sqrt(10) for j in (1, 2)]
    assert test.discounted_probability("a", lp.tolist(), 2.0) == pytest.approx(1.0 / (1.0 + np.exp(-np.array(gaps)).sum()))
    assert test.discounted_probability("a", lp.tolist(), 2.0) < test.discounted_probability("a", lp.tolist(), 1.0) < np.exp(lp[0])


def test_the_threshold_is_the_student_t_quantile() -> None:
    from scipy.stats import t as student_t

    for trials in (3, 10, 40):
        needed = student_t.ppf(1 - RIVAL_ALPHA, trials - 1)
        base = np.array([1.0, -1.0] * (trials // 2) + [0.0] * (trials % 2))
        base = (base - base.mean()) / base.std(ddof=1)  # mean 0, sd 1: z = mean * sqrt(T)
        just_above = _test_with(list(base + (needed + 1e-6) / np.sqrt(trials)))
        just_below = _test_with(list(base + (needed - 1e-3) / np.sqrt(trials)))
        assert just_above.blocker("a") is None
        assert just_below.blocker("a") is not None
    assert "needs 2 compared trials" in _test_with([5.0]).blocker("a")


def test_the_comparison_feeds_the_rival_test_its_evidence_increments(tmp_path: Path) -> None:
    """Each compared trial adds every model's log evidence increment (they sum to the log evidence);
    a leader at P >= .99 whose lead is not yet consistent across trials is held back, later declared."""
    torch.set_num_threads(1)
    path = population_protocol(tmp_path, units=16, noise="gaussian", strategy="population_random_pool")
    path.write_text(path.read_text().replace("min_trials: 3", "min_trials: 3\n  rival_test: true"))
    protocol = load_protocol(path).protocol
    assert protocol.stopping.rival_test
    comparison = PopulationComparison.from_protocol(protocol, 0)
    pop = build_population_truth(protocol, "cnn_a:ev=0.3,seed=3", comparison)
    rng = np.random.default_rng(2)
    held_back = declared = 0
    for _ in range(25):
        image = int(rng.integers(len(comparison.pool)))
        ref = f"{image:064x}"
        comparison._cache.setdefault(ref, [c.features.pool_features[image].numpy() for c in comparison.candidates])
        comparison.update({"image": ref}, np.asarray(pop.sample({}, rng, features=pop.features.pool_features[image].numpy())))
        leader, p = comparison.leader()
        if p >= 0.99 and comparison.checks[comparison.model_names.index(leader)].blocker() is None:
            reason = comparison.declaration_blocker(leader)
            held_back += reason is not None and "rival test" in reason
            declared += reason is None and leader == "cnn_a"
    table = np.stack(comparison.rivals.log_densities)
    assert table.shape == (24, 3)  # the first trial sets the centre and is not compared
    for cand, column in zip(comparison.candidates, table.T):
        assert column.sum() == pytest.approx(cand.readout.log_evidence)
    summary = comparison.summary()
    lead = summary["cnn_a"]["trial_level_lead"]
    assert lead is not None and lead > 0  # the truth leads every rival trial by trial
    assert all(summary[n]["trial_level_lead"] < 0 for n in comparison.model_names if n != "cnn_a")
    assert held_back >= 1 and declared >= 1


def _four_random_pool_trials(protocol: object) -> PopulationComparison:
    """A comparison that has seen four random pool images answered by a cnn_a population."""
    comparison = PopulationComparison.from_protocol(protocol, 0)
    pop = build_population_truth(protocol, "cnn_a:ev=0.3,seed=4", comparison)
    rng = np.random.default_rng(3)
    for _ in range(4):
        image = int(rng.integers(len(comparison.pool)))
        ref = f"{image:064x}"
        comparison._cache.setdefault(ref, [c.features.pool_features[image].numpy() for c in comparison.candidates])
        comparison.update({"image": ref}, np.asarray(pop.sample({}, rng, features=pop.features.pool_features[image].numpy())))
    return comparison


def test_by_default_the_own_check_the_lead_gate_and_the_evidence_margin_decide(tmp_path: Path) -> None:
    """By default (stopping.rival_test false, rival_lead 1.5, evidence_margin 1) a model passing its
    own check is held back while its trial-by-trial lead is 1.5 standard errors or less, and then
    while its probability, each rival's gap cut by one standard error, is below model_probability."""
    torch.set_num_threads(1)
    path = population_protocol(tmp_path, units=8, noise="gaussian", strategy="population_random_pool")
    protocol = load_protocol(path).protocol
    stopping = protocol.stopping
    assert not stopping.rival_test and stopping.rival_lead == 1.5 and stopping.evidence_margin == 1.0
    comparison = _four_random_pool_trials(protocol)
    for name in comparison.model_names:
        own = comparison.checks[comparison.model_names.index(name)].blocker()
        lead = comparison.rivals.blocker(name, min_lead=1.5)
        margin = comparison.rivals.margin_blocker(name, comparison.log_probabilities().tolist(), 1.0,
                                                  stopping.model_probability)
        assert comparison.declaration_blocker(name) == (own if own is not None else lead if lead is not None else margin)
    trailing = [n for n in comparison.model_names if comparison._trial_level_lead(n) <= 1.5]
    assert trailing  # at most one model can lead every rival
    for check in comparison.checks:  # what the gate does once the own checks pass
        check.trials.clear()
        check.trials.extend(np.random.default_rng(0).standard_normal((8, 8)))
    for name in trailing:
        assert comparison.declaration_blocker(name).startswith("rival lead:")
    comparison.protocol = protocol.model_copy(update={"stopping": stopping.model_copy(update={"rival_lead": 0.0})})
    probs = comparison.probabilities()
    for name in comparison.model_names:  # rival_lead 0: the margin alone follows the own check
        expected = comparison.rivals.margin_blocker(name, comparison.log_probabilities().tolist(), 1.0, 0.99)
        assert comparison.declaration_blocker(name) == expected
        if probs[name] < 0.99:
            assert expected.startswith(f"evidence margin: P({name!r}) is ")


def test_without_the_lead_gate_the_own_check_alone_decides(tmp_path: Path) -> None:
    """stopping.rival_lead and evidence_margin 0, rival_test false: the rival statistics are computed for
    the summary, not a gate."""
    torch.set_num_threads(1)
    path = population_protocol(tmp_path, units=8, noise="gaussian", strategy="population_random_pool")
    path.write_text(path.read_text().replace("min_trials: 3", "min_trials: 3\n  rival_lead: 0\n  evidence_margin: 0"))
    protocol = load_protocol(path).protocol
    assert not protocol.stopping.rival_test and protocol.stopping.rival_lead == 0 == protocol.stopping.evidence_margin
    comparison = _four_random_pool_trials(protocol)
    for name in comparison.model_names:
        assert comparison.declaration_blocker(name) == comparison.checks[comparison.model_names.index(name)].blocker()
    assert len(comparison.rivals.log_densities) == 3
