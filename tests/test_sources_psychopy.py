"""PsychoPy's onset flip reaches the acquisition source: a real window under Xvfb, Open Ephys emulated.

The photodiode is wired in software: when the presenter reports the onset flip, the emulator records
a TTL edge 4 ms later on the acquisition clock (the screen's latency), as the photodiode would. The
population vector must be the exact spike counts in the window after that edge.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.messages import Trial
from rig_adapters.base import SessionInfo
from rig_adapters.rig_config import RigConfig
from rig_adapters.sources.emulate import OpenEphysEmulator, poisson_trains
from rig_adapters.sources.openephys import OpenEphysSource
from xvfb import xvfb_display

pytestmark = pytest.mark.display

FS = 30000.0
SCREEN_LATENCY_S = 0.004


class PhotodiodeWired(OpenEphysSource):
    """The source, plus the photodiode: each onset flip becomes a TTL edge on the acquisition clock."""

    emulator: OpenEphysEmulator

    def begin(self, cmd: Trial, onset: float) -> None:
        self.emulator.ttl_at(onset + SCREEN_LATENCY_S, line=2)
        super().begin(cmd, onset)


@pytest.fixture
def rig() -> Iterator[tuple[Any, OpenEphysEmulator]]:
    xvfb_display()
    from rig_adapters.psychopy_display import PsychoPyDisplayAdapter

    trains = poisson_trains(16, 60.0, 3600.0, FS, seed=21, electrodes=4)
    emu = OpenEphysEmulator(trains, sample_rate=FS, acq_start_epoch=time.time() - 55.5).start()
    keys = [f"{e}#{s}" for e, s in trains.keys]
    config = RigConfig.model_validate({
        "monitor": {"distance_cm": 57, "width_cm": 40, "resolution": [1024, 768], "refresh_hz": 60.0},
        "display": {"size": [400, 300], "software_vsync": True,
                    "photodiode": {"enabled": True, "corner": "bottom-right", "size_px": 30}},
        "sources": {"openephys": {"endpoints": [emu.endpoint], "sync": {"line": 2},
                                  "unit_map": {str(i): keys[i] for i in range(16)}}},
    })
    source = PhotodiodeWired(config)
    source.emulator = emu
    adapter = PsychoPyDisplayAdapter(config, source)
    yield adapter, emu
    adapter.close()
    emu.close()


@pytest.mark.parametrize("window_s", [0.1, 0.5])  # ends during the stimulus / well after it
def test_flip_to_population_vector_through_the_psychopy_adapter(rig: tuple[Any, OpenEphysEmulator],
                                                                 window_s: float) -> None:
    adapter, emu = rig
    text = f"name: pop\nresponse: {{kind: population, units: 16, window_s: {window_s}, latency_s: 0.03}}\n"
    adapter.response.start(SessionInfo("s1", text, "rig-1"))
    adapter.configure(stimulus_type="grating", fixed={"sf": 2.0, "size": 6}, duration_s=0.25)
    time.sleep(0.2)
    for i in range(3):
        cmd = Trial(trial_id=f"s1:{i}", attempt=1, index=i, session_id="s1", stimulus={"orientation": 30.0 * i},
                    stimulus_type="grating", response_kind="population", timeout_s=5.0)
        res = adapter.present(cmd)
        a = res.response["alignment"]
        onset = res.timing["presented_at"]
        assert a["method"] == "ttl" and a["onset_epoch"] == onset
        edge = emu.sample_at(onset + SCREEN_LATENCY_S)
        assert a["ttl_sample"] == edge
        start = edge / FS + 0.03
        assert res.response["value"] == emu.trains.counts(start, start + window_s, FS, range(16))
        r = res.response  # the frame statistics still travel with the response
        assert r["frames_requested"] == 15 and r["frames_shown"] + r["frames_skipped"] == 15
        # the vector is ready once the later of window end and stimulus offset has passed
        assert res.timing["responded_at"] >= onset + 0.03 + window_s
