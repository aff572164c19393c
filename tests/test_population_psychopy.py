"""A population protocol through `cloop run` + `cloop rig --adapter psychopy` on a virtual screen.

The rig shows each synthesized image from the wire (answered by a simulated population); the
screenshots of the first trials equal, within 1/255, the pixels the database holds under the
trial's sha256, and every trial's vector is stored with its flip timestamps.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator import analysis
from test_neural_helpers import population_protocol
from test_psychopy_display import _find
from test_psychopy_e2e import _check_presentation, _rig_yaml, _run_session

pytestmark = pytest.mark.display

UNITS = 5
TRIALS = 3


def test_population_images_are_shown_pixel_for_pixel(tmp_path: Path) -> None:
    from PIL import Image

    protocol = population_protocol(tmp_path, units=UNITS, size=12, settings={"steps": 3, "starts": 1},
                                   stimulus={"duration_s": 0.2})
    protocol.write_text(protocol.read_text() + "rig:\n  capabilities: [psychopy]\n  wait_for_rig_s: 60\n")
    rig_yaml = _rig_yaml(tmp_path, shots=TRIALS)
    output, rows = _run_session(tmp_path, protocol,
                                ["--truth", "cnn_b:ev=0.5,seed=2", "--seed", "2", "-o", "response=simulated",
                                 "-o", f"rig_config={rig_yaml}"],
                                ["--max-trials", str(TRIALS)])
    assert "completed" in output
    assert len(rows) == TRIALS
    db = f"sqlite:///{tmp_path / 'cloop.db'}"
    meta, responses = analysis.population_responses(db, "latest")
    assert responses.shape == (TRIALS, UNITS) and np.isfinite(responses).all()
    images = analysis.stimulus_images(db, "latest")
    for row in rows:
        response = _check_presentation(row, frames=12)
        assert response["source"] == "simulated"  # the vector itself is in the population table
        sha = json.loads(row["stimulus"])["image"]
        shot = np.asarray(Image.open(tmp_path / "shots" / f"image_trial{row['index']:04d}.png").convert("RGB"))
        pixels = images[sha]
        block = _find(shot, pixels.shape[:2])
        expected = pixels.reshape(*pixels.shape[:2], -1).astype(int)
        assert np.abs(block - expected).max() <= 1, f"pixels differ by {np.abs(block - expected).max()} / 255"
