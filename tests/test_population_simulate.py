"""`cloop simulate` and the simulated rig answer population protocols from a seeded population."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.protocol import load_protocol
from orchestrator.protocol_checks import load_checked
from test_neural_helpers import population_protocol


def _simulate(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "simulate", str(path), *extra],
                          capture_output=True, text=True, timeout=600)


def test_cloop_simulate_population_json_and_text(tmp_path: Path) -> None:
    path = population_protocol(tmp_path, strategy="population_pool", settings={})
    run = _simulate(path, "--truth", "cnn_b:ev=0.5,seed=1", "--json", "--max-trials", "12")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert 3 <= len(records) <= 12 and all(len(r["response"]) == 8 for r in records)
    assert set(records[-1]["model_probabilities"]) == {"gabor", "cnn_a", "cnn_b"}
    assert all(len(r["stimulus"]["image"]) == 64 for r in records)
    assert records[-1]["leader"] == "cnn_b"
    again = _simulate(path, "--truth", "cnn_b:ev=0.5,seed=1", "--json", "--max-trials", "12")
    assert [json.loads(line)["stimulus"] for line in again.stdout.splitlines()] == [r["stimulus"] for r in records]
    text = _simulate(path, "--truth", "cnn_b:ev=0.5,seed=1", "--max-trials", "2")
    assert text.returncode == 0 and "[8 units]" in text.stdout


def test_cloop_simulate_bad_truth_exits_2(tmp_path: Path) -> None:
    run = _simulate(population_protocol(tmp_path), "--truth", "cnn_c:ev=0.3")
    assert run.returncode == 2 and "unknown model 'cnn_c'" in run.stderr


def test_population_truth_has_the_requested_explainable_variance(tmp_path: Path) -> None:
    from orchestrator.neural.comparison import PopulationComparison
    from orchestrator.neural.truth import build_population_truth

    protocol = load_checked(population_protocol(tmp_path, noise="gaussian", units=40)).protocol
    comparison = PopulationComparison.from_protocol(protocol, 0)
    truth = build_population_truth(protocol, "gabor:ev=0.25,seed=4", comparison)
    signal = np.stack([truth.signal(img) for img in comparison.pool])
    ev = signal.var(0) / (signal.var(0) + truth.params["noise_sd"] ** 2)
    assert np.allclose(ev, 0.25, atol=1e-6)
    saturated = build_population_truth(protocol, "gabor:ev=0.25,seed=4,saturation=0.5", comparison)
    assert np.abs(np.stack([saturated.signal(i) for i in comparison.pool[:8]]) - saturated.offset).max() <= 0.5 * saturated.gain.max() + 1e-9
    with pytest.raises(ValueError, match="unknown option"):
        build_population_truth(protocol, "gabor:evv=0.2", comparison)


def test_simulated_rig_adapter_answers_a_wire_image(tmp_path: Path) -> None:
    from orchestrator.artifacts import ArtifactStore
    from orchestrator.messages import Trial
    from rig_adapters.base import SessionInfo
    from rig_adapters.simulated import SimulatedAdapter

    path = population_protocol(tmp_path)
    protocol = load_checked(path).protocol
    adapter = SimulatedAdapter(truth="cnn_a:ev=0.3,seed=1", seed=3)
    adapter.start(SessionInfo(session_id="s", protocol_text=path.read_text(), rig_id="sim-1"))
    store = ArtifactStore(tmp_path / "art")
    sha = store.put(np.full((16, 16), 0.5))
    wire = store.wire({"image": sha})
    cmd = Trial.model_construct(trial_id="s:0", attempt=1, index=0, session_id="s", stimulus=wire,
                                stimulus_type="image", response_kind="population", timeout_s=5.0)
    result = adapter.present(cmd)
    value = protocol.response.validate(result.response)
    assert value.shape == (8,) and (value >= 0).all()
    assert adapter.present(cmd).response == result.response  # same trial index, same answer



def test_poisson_truth_explainable_variance_is_on_the_anscombe_scale(tmp_path: Path) -> None:
    from orchestrator.neural.comparison import PopulationComparison, TRANSFORMS
    from orchestrator.neural.truth import build_population_truth

    protocol = load_checked(population_protocol(tmp_path, units=30)).protocol
    comparison = PopulationComparison.from_protocol(protocol, 0)
    truth = build_population_truth(protocol, "cnn_a:ev=0.4,seed=2,rate=20", comparison)
    drive = np.stack([truth.signal(img) for img in comparison.pool])
    assert np.allclose((4 * drive.var(0)) / (4 * drive.var(0) + 1), 0.4, atol=1e-6)
    rng = np.random.default_rng(0)
    counts = np.stack([truth.sample({}, rng, pixels=comparison.pool[i % 4]) for i in range(4000)])
    y = TRANSFORMS["anscombe"](counts)
    noise_var = np.mean([y[i::4].var(0).mean() for i in range(4)])
    assert 0.85 < noise_var < 1.1  # counts around 20: the transform makes the noise variance ~1


def test_population_replicates_are_engine_sessions_seeded_seed_plus_r(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.simulate import SimulationConfig, simulate

    monkeypatch.setenv("CLOOP_ARTIFACTS", str(tmp_path / "user-artifacts"))  # a pilot's images stay out of it
    protocol = load_checked(population_protocol(tmp_path, strategy="population_random_pool", settings={})).protocol
    both = list(simulate(protocol, SimulationConfig(truth="gabor:ev=0.5", seed=4, replicates=2, max_trials=4)))
    alone = list(simulate(protocol, SimulationConfig(truth="gabor:ev=0.5", seed=5, max_trials=4)))
    timing = {"decision_ms", "update_ms", "replicate"}
    second = [{k: v for k, v in r.items() if k not in timing} for r in both if r["replicate"] == 1]
    assert second == [{k: v for k, v in r.items() if k not in timing} for r in alone]
    first = [r for r in both if r["replicate"] == 0]
    assert [r["stimulus"] for r in first] != [r["stimulus"] for r in second]
    assert all(r["image"]["source"] == "pool" and r["strategy"] == "population_random_pool" for r in both)
    assert not (tmp_path / "user-artifacts").exists()
