"""Population designs: the acquisition, synthesis inside the trust region, determinism and resume."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from botorch.acquisition import AcquisitionFunction

from orchestrator.design import make_design
from orchestrator.neural.acquisition import (PopulationDiscrimination, ReadoutSnapshot, bhattacharyya_bound,
                                             discrimination_from_features)
from orchestrator.neural.comparison import PopulationComparison
from orchestrator.neural.truth import build_population_truth

from orchestrator.protocol_checks import load_checked
from test_neural_helpers import population_protocol


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    protocol = load_checked(population_protocol(tmp_path_factory.mktemp("p"))).protocol
    comparison = PopulationComparison.from_protocol(protocol, 0)
    truth = build_population_truth(protocol, "cnn_a:ev=0.4,seed=2", comparison)
    return protocol, comparison, truth


def _run(protocol, pool, truth, strategy: str, trials: int, seed: int = 0, settings=None):
    comparison = PopulationComparison.from_protocol(protocol, seed, pool=pool)
    design = make_design(protocol, seed, strategy)
    if settings:
        design.__init__(protocol, seed, {**design.settings, **settings})
    decisions = []
    for i in range(trials):
        d = design.propose(comparison, i)
        y = protocol.response.validate({"value": truth.sample(d.stimulus, np.random.default_rng([seed, i]),
                                                              pixels=d.pixels)})
        comparison.update(d.stimulus, y, pixels=d.pixels / 255.0)
        decisions.append(d)
    return comparison, design, decisions


def test_bound_is_zero_for_identical_models_and_grows_with_separation() -> None:
    mean = torch.zeros(3, 5, dtype=torch.float64)
    var = torch.ones(3, 5, dtype=torch.float64)
    lp = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    same = bhattacharyya_bound([(mean, var), (mean, var)], lp)
    assert torch.allclose(same, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    apart = bhattacharyya_bound([(mean, var), (mean + 30.0, var)], lp)
    assert torch.allclose(apart, torch.full((3,), np.log(2.0), dtype=torch.float64), atol=1e-6)
    near = bhattacharyya_bound([(mean, var), (mean + 0.5, var)], lp)
    assert (0 < near).all() and (near < apart).all()


def test_acquisition_is_a_botorch_acquisition_function(setup) -> None:
    protocol, comparison, _ = setup
    snaps = [ReadoutSnapshot.of(c.readout.state, c.log_prior) for c in comparison.candidates]
    acq = PopulationDiscrimination([c.features for c in comparison.candidates], snaps, (1, 16, 16))
    assert isinstance(acq, AcquisitionFunction)
    X = torch.from_numpy(comparison.pool[:4].reshape(4, 1, -1)).float().requires_grad_(True)
    value = acq(X)
    value.sum().backward()
    assert value.shape == (4,) and (value > 0).all() and X.grad is not None and X.grad.abs().sum() > 0


def test_synthesized_images_stay_inside_the_trust_region_and_safety(setup) -> None:
    protocol, comparison, truth = setup
    _, _, decisions = _run(protocol, comparison.pool, truth, "population_synthesis", 6)
    for d in decisions:
        protocol.check_image(d.pixels)
        assert d.info["energy_ratio"] <= 1.0 + 1e-9
        assert d.info["pool_distance"] >= 0.0 and d.score >= d.info["best_pool_score"] - 1e-9
    assert any(d.info["source"] == "synthesized" and d.info["pool_distance"] > 0 for d in decisions)


def test_unconstrained_synthesis_leaves_the_pool_range(setup) -> None:
    """Without the trust region (a huge margin), the optimiser inflates features past the pool."""
    protocol, comparison, truth = setup
    _, _, free = _run(protocol, comparison.pool, truth, "population_synthesis", 4,
                      settings={"margin": 1e6, "steps": 25})
    assert max(d.info["energy_ratio"] for d in free) > 1.0


def test_designs_are_deterministic_and_resume_replays_to_the_same_next_image(setup) -> None:
    protocol, comparison, truth = setup
    first, design, a = _run(protocol, comparison.pool, truth, "population_synthesis", 5)
    _, _, b = _run(protocol, comparison.pool, truth, "population_synthesis", 5)
    assert [d.stimulus for d in a] == [d.stimulus for d in b]
    next_uninterrupted = design.propose(first, 5).stimulus
    # a resumed orchestrator: fresh comparison and design, the 5 trials replayed, then propose trial 5
    resumed = PopulationComparison.from_protocol(protocol, 0, pool=comparison.pool)
    for i, d in enumerate(a):
        y = protocol.response.validate({"value": truth.sample(d.stimulus, np.random.default_rng([0, i]), pixels=d.pixels)})
        resumed.update(d.stimulus, y, pixels=d.pixels / 255.0)
    assert make_design(protocol, 0, "population_synthesis").propose(resumed, 5).stimulus == next_uninterrupted
    assert any(d.info["pipelined"] for d in a[1:])


def test_the_pending_images_features_are_computed_once_by_the_planner(setup) -> None:
    """The background planner runs the networks on the image being shown; the trial's update then
    reads those features (identical to a fresh pass) instead of computing them again."""
    protocol, comparison, truth = setup
    fresh = PopulationComparison.from_protocol(protocol, 0, pool=comparison.pool)
    design = make_design(protocol, 0, "population_synthesis")
    first = design.propose(fresh, 0)
    fresh.update(first.stimulus, truth.sample(first.stimulus, np.random.default_rng(0), pixels=first.pixels),
                 pixels=first.pixels / 255.0)
    second = design.propose(fresh, 1)  # starts planning trial 2 with this image pending
    design.close()
    cached = fresh._cache[second.stimulus["image"]]
    for planned, recomputed in zip(cached, fresh.features_of(second.pixels / 255.0)):
        np.testing.assert_array_equal(planned, recomputed)
    before = dict(fresh._cache)
    fresh.update(second.stimulus, truth.sample(second.stimulus, np.random.default_rng(1), pixels=second.pixels),
                 pixels=second.pixels / 255.0)
    assert fresh.latest_features is before[second.stimulus["image"]]


def test_pool_and_noise_baselines(setup) -> None:
    protocol, comparison, truth = setup
    _, design, pool = _run(protocol, comparison.pool, truth, "population_pool", 3)
    snaps = design.snapshots(PopulationComparison.from_protocol(protocol, 0, pool=comparison.pool))
    scores = design.scores(comparison, snaps)
    assert pool[0].info["pool_index"] == int(torch.argmax(scores))
    _, _, rand = _run(protocol, comparison.pool, truth, "population_random_pool", 3)
    _, _, noise = _run(protocol, comparison.pool, truth, "population_random_noise", 3)
    for d in rand + noise:
        protocol.check_image(d.pixels)
    assert rand[0].stimulus != rand[1].stimulus and noise[0].info["pool_distance"] > 0


def test_bound_over_all_pairs_matches_the_pairwise_formula() -> None:
    """Three models with different moments: the batched pairs give the documented D_ij and bound."""
    gen = torch.Generator().manual_seed(0)
    moments = [(torch.randn(4, 6, generator=gen, dtype=torch.float64),
                torch.rand(4, 6, generator=gen, dtype=torch.float64) + 0.5) for _ in range(3)]
    lp = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    D = torch.zeros(4, 3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            (mi, vi), (mj, vj) = moments[i], moments[j]
            s = vi + vj
            D[:, i, j] = ((mi - mj) ** 2 / (4 * s) + 0.5 * torch.log(s / 2) - 0.25 * torch.log(vi * vj)).sum(-1)
    expected = -(lp.exp() * torch.logsumexp(lp - D, dim=-1)).sum(-1)
    assert torch.allclose(bhattacharyya_bound(moments, lp), expected, rtol=1e-12)


def test_pending_trial_uncorrelated_with_the_new_one_adds_its_own_distance() -> None:
    """Bivariate distances with zero covariance are the sum of the two univariate ones (independent
    responses), and the bound on both responses is at least the bound on the new one alone."""
    from orchestrator.neural.acquisition import _pairwise_distances

    gen = torch.Generator().manual_seed(1)
    new = [(torch.randn(4, 6, generator=gen, dtype=torch.float64),
            torch.rand(4, 6, generator=gen, dtype=torch.float64) + 0.5) for _ in range(3)]
    pend = [(torch.randn(1, 6, generator=gen, dtype=torch.float64),
             torch.rand(1, 6, generator=gen, dtype=torch.float64) + 0.5) for _ in range(3)]
    joint = [(m, v, torch.zeros_like(m), pm[0], pv[0]) for (m, v), (pm, pv) in zip(new, pend)]
    expected = _pairwise_distances(new) + _pairwise_distances(pend)
    assert torch.allclose(_pairwise_distances(joint), expected, rtol=1e-12)
    lp = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    assert (bhattacharyya_bound(joint, lp) >= bhattacharyya_bound(new, lp) - 1e-12).all()


def test_a_pending_image_makes_repeating_it_worth_less(setup) -> None:
    """With the lagged readouts, an image whose response is pending gains less by being shown again
    than it scored alone: the joint bound credits what the pending trial will already tell."""
    protocol, comparison, truth = setup
    comp, design, _ = _run(protocol, comparison.pool, truth, "population_pool", 4)
    snaps = design.snapshots(comp)
    feats = [f[:50].to(torch.float64) for f in design.pool_features(comp)]
    alone = discrimination_from_features(feats, snaps)
    i = int(torch.argmax(alone))
    pending = [s.with_pending(f[i].numpy()) for s, f in zip(snaps, feats)]
    both = discrimination_from_features(feats, pending)
    pending_alone = discrimination_from_features([f[i:i + 1] for f in feats], snaps)[0]
    gain = both - pending_alone  # what each image adds to the pending one
    assert gain[i] < alone[i] - 1e-6


def test_gabor_fft_at_a_fast_length_gives_the_same_features() -> None:
    """Zero-padding the transform to a fast length (62 -> 64) leaves the cropped responses unchanged."""
    from orchestrator.neural.gabor import GaborEnergy

    net = GaborEnergy(orientations=4, frequencies=(0.1, 0.2), grid=4)
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    grey = images.mean(dim=1) - 0.5
    padded = torch.nn.functional.pad(grey[:, None], (net.half,) * 4, mode="reflect")[:, 0]
    h, w = padded.shape[-2:]
    assert (h, w) == (62, 62)
    resp = torch.fft.irfft2(torch.fft.rfft2(padded)[:, None] * net._spectrum(h, w)[None], s=(h, w))
    resp = resp[..., net.half:net.half + 32, net.half:net.half + 32]
    direct = torch.nn.functional.adaptive_avg_pool2d(resp[:, 0::2] ** 2 + resp[:, 1::2] ** 2, 4).flatten(1)
    fast = net(images)
    assert torch.allclose(fast, direct, rtol=1e-4, atol=1e-6 * float(direct.abs().max()))


def test_synthesis_adam_takes_torch_adams_steps() -> None:
    from orchestrator.neural.synthesis import _Adam

    start = torch.randn(2, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours, theirs = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    mine, ref = _Adam(ours, 0.08), torch.optim.Adam([theirs], lr=0.08)
    for _ in range(6):
        for p in (ours, theirs):
            p.grad = None
            (p ** 4 - 3 * p).sum().backward()
        mine.step()
        ref.step()
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-14) and not torch.allclose(ours, start)
