"""Population protocols: the response vector, feature-model entries, image pools, each bad input named."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.protocol import InvalidResponse, ProtocolError, SafetyViolation
from orchestrator.protocol_checks import load_checked
from test_neural_helpers import population_protocol


def _problems(path: Path) -> list[str]:
    with pytest.raises(ProtocolError) as err:
        load_checked(path)
    return [f"{p.path}: {p.message}" for p in err.value.problems]


def test_population_protocol_and_example_load(tmp_path: Path) -> None:
    p = load_checked(population_protocol(tmp_path)).protocol
    assert p.is_population and p.response.n_units == 8 and p.stimulus.shape == (16, 16)
    example = load_checked(Path(__file__).parent.parent / "protocols" / "v1_population.yaml").protocol
    assert [m.name for m in example.models] == ["gabor", "cnn_a", "cnn_b"]


def test_response_vector_validation_names_the_unit(tmp_path: Path) -> None:
    spec = load_checked(population_protocol(tmp_path, units=3)).protocol.response
    out = spec.validate({"value": [1, None, 4]})
    assert out.dtype == np.float64 and out.shape == (3,) and np.isnan(out[1]) and out[2] == 4
    assert np.isnan(spec.validate({"value": [1, float("nan"), 2]})[1])
    with pytest.raises(InvalidResponse, match="2 entries, the protocol has 3 units"):
        spec.validate({"value": [1, 2]})
    with pytest.raises(InvalidResponse, match=r"value\[1\] \(unit 1\) must be a number"):
        spec.validate({"value": [1, "x", 2]})
    with pytest.raises(InvalidResponse, match=r"unit 2\) must be a count"):
        spec.validate({"value": [1, 2, -1]})
    ids = load_checked(population_protocol(tmp_path, units=3)).protocol.model_copy(
        update={"response": spec.model_copy(update={"units": ["a", "b", "c"]})}).response
    with pytest.raises(InvalidResponse, match=r"unit b\)"):
        ids.validate({"value": [0, 1.5, 0]})


def test_module_that_does_not_import_is_named(tmp_path: Path) -> None:
    path = population_protocol(tmp_path, models=[
        {"name": "gabor", "builtin": "gabor_energy", "settings": {"orientations": 2, "frequencies": [0.2], "grid": 1}},
        {"name": "lab", "module": "no_such_package.nets:Net"}])
    assert any(line.startswith("models.1.module: cannot import 'no_such_package.nets'") for line in _problems(path))


def test_weights_that_do_not_load_and_changed_weights_are_refused(tmp_path: Path) -> None:
    from orchestrator.neural.zoo import tiny_cnn

    good = tmp_path / "cnn.pt"
    torch.save(tiny_cnn(seed=5, width=4, grid=2).state_dict(), good)
    wrong = tmp_path / "wrong.pt"
    torch.save(tiny_cnn(seed=5, width=8, grid=2).state_dict(), wrong)
    base = {"name": "gabor", "builtin": "gabor_energy", "settings": {"orientations": 2, "frequencies": [0.2], "grid": 1}}
    entry = {"name": "lab", "module": "orchestrator.neural.zoo:TinyCNN", "settings": {"width": 4, "grid": 2}}
    ok = load_checked(population_protocol(tmp_path, models=[base, {**entry, "weights": str(good)}])).protocol
    lines = _problems(population_protocol(tmp_path, models=[base, {**entry, "weights": str(wrong)}]))
    assert any(line.startswith(f"models.1.weights: {wrong} does not load") for line in lines), lines

    from orchestrator.neural.comparison import PopulationComparison
    from orchestrator.neural.session import WeightsChanged, check_weights

    comparison = PopulationComparison.from_protocol(ok, 0)
    recorded = {c.name: c.features.weights_sha256 for c in comparison.candidates}
    check_weights(ok, comparison, recorded)
    torch.save(tiny_cnn(seed=6, width=4, grid=2).state_dict(), good)  # the lab overwrote the file
    changed = PopulationComparison.from_protocol(ok, 0)
    with pytest.raises(WeightsChanged, match="models.1.weights: .* the session started with"):
        check_weights(ok, changed, recorded)


def test_network_whose_output_is_not_batch_by_features_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "lab_nets.py"
    module.write_text("import torch\nclass Scalar(torch.nn.Module):\n"
                      "    def forward(self, x):\n        return x.mean()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = population_protocol(tmp_path, models=[
        {"name": "gabor", "builtin": "gabor_energy", "settings": {"orientations": 2, "frequencies": [0.2], "grid": 1}},
        {"name": "lab", "module": "lab_nets:Scalar"}])
    assert any(line.startswith("models.1.module: output [] is not (batch, features)") for line in _problems(path))


def test_pool_of_mixed_sizes_and_pool_outside_limits_are_named(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    np.save(pool / "a.npy", np.full((16, 16), 128, np.uint8))
    np.save(pool / "b.npy", np.full((16, 12), 128, np.uint8))
    lines = _problems(population_protocol(tmp_path, stimulus={"pool": str(pool)}))
    assert any(line.startswith("stimulus.pool: ") and "b.npy: image of shape [16, 12]" in line for line in lines), lines
    bright = tmp_path / "bright.npz"
    np.savez(bright, images=np.full((3, 16, 16), 250, np.uint8))
    lines = _problems(population_protocol(tmp_path, stimulus={"pool": str(bright)}))
    assert any("image 0: mean_luminance 0.9804 is outside the safety limits" in line for line in lines), lines


def test_image_safety_limits(tmp_path: Path) -> None:
    p = load_checked(population_protocol(tmp_path)).protocol
    p.check_image(np.full((16, 16), 0.5))
    with pytest.raises(SafetyViolation, match="rms_contrast"):
        p.check_image(np.where(np.arange(256).reshape(16, 16) % 2, 0.0, 1.0))
    with pytest.raises(SafetyViolation, match="shape"):
        p.check_image(np.full((8, 8), 0.5))
    with pytest.raises(SafetyViolation, match="sha256"):
        p.check_safe({"image": "not-a-hash"})
    p.check_safe({"image": "ab" * 32})


def test_cli_validate_exits_2_with_one_line_naming_the_field(tmp_path: Path) -> None:
    bad = population_protocol(tmp_path, models=[
        {"name": "gabor", "builtin": "gabor_energy", "settings": {"orientations": 2, "frequencies": [0.2], "grid": 1}},
        {"name": "lab", "module": "no_such_package.nets:Net"}])
    run = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(bad)], capture_output=True, text=True)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "models.1.module: cannot import" in lines[0], run.stderr
    good = subprocess.run([sys.executable, "-m", "orchestrator", "validate",
                           str(Path(__file__).parent.parent / "protocols" / "v1_population.yaml")],
                          capture_output=True, text=True)
    assert good.returncode == 0 and "32x32 image stimuli, 50 units" in good.stdout, good.stderr


def test_scalar_design_on_a_population_protocol_is_one_line(tmp_path: Path) -> None:
    lines = _problems(population_protocol(tmp_path, strategy="mutual_information", settings={}))
    assert lines == ["design.strategy: 'mutual_information' is for scalar stimuli (population protocols use "
                     "population_synthesis, population_pool, population_random_pool or population_random_noise)"]


def test_readout_noise_prior_defaults_to_learned_levels_and_old_protocols_keep_theirs(tmp_path: Path) -> None:
    """The default learns a population noise level; a protocol that sets noise_shape / noise_scale
    without noise_levels keeps the fixed per-unit prior, and a dumped protocol reloads the same."""
    from orchestrator.neural.comparison import readout_grid
    from orchestrator.protocol import ReadoutPrior, ReadoutSpec

    default = ReadoutPrior()
    assert default.noise_levels is not None and min(default.noise_levels) < 1e-2 < 10 < max(default.noise_levels)
    legacy = ReadoutPrior.model_validate({"weight_sd": 1.0, "noise_shape": 2.0, "noise_scale": 1.0})
    assert legacy.noise_levels is None
    for prior in (default, legacy):
        assert ReadoutPrior.model_validate(prior.model_dump(mode="json")) == prior
    spec = type("Spec", (), {"readout": ReadoutSpec(prior=legacy)})()
    grid = readout_grid(spec, 4, 8)
    assert grid.shape == (1, len(legacy.bias_sd), 1) and not grid.noise.relative and grid.prior(0).a0 == 2.0
    learned = readout_grid(type("Spec", (), {"readout": None})(), 4, 8)
    assert learned.shape == (4, len(default.bias_sd), len(default.noise_levels)) and learned.noise.relative


@pytest.mark.parametrize("levels", [[], [0.5, -1.0]])
def test_bad_noise_levels_are_one_line_naming_the_field(tmp_path: Path, levels: list[float]) -> None:
    bad = population_protocol(tmp_path, models=[
        {"name": "gabor", "builtin": "gabor_energy", "settings": {"orientations": 2, "frequencies": [0.2], "grid": 1},
         "readout": {"prior": {"noise_levels": levels}}},
        {"name": "cnn_a", "module": "orchestrator.neural.zoo:tiny_cnn", "settings": {"seed": 1, "width": 4, "grid": 2}}])
    run = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(bad)], capture_output=True, text=True)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "models.0.readout.prior.noise_levels" in lines[0], run.stderr
