"""The PsychoPy display adapter in a real window under Xvfb: timing, photodiode, keyboard, abort.

Key presses are real X events injected through the XTEST extension (xdotool), read back by
PsychoPy's keyboard (psychtoolbox backend), exactly as a physical key would be.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import yaml

from orchestrator.messages import Trial
from rig_adapters.base import AdapterError, SessionInfo
from rig_adapters.responses import (
    KeyboardResponse,
    ResponseSource,
    ResponseTimeout,
    SimulatedResponse,
    TrialAborted,
)
from rig_adapters.rig_config import RigConfig
from xvfb import press_key, xvfb_display

pytestmark = pytest.mark.display

ROOT = Path(__file__).resolve().parent.parent
# An 8 deg patch, so the 400x300 test window keeps a background corner and room for the photodiode.
ORIENTATION = (ROOT / "protocols" / "orientation_tuning.yaml").read_text().replace("    size: 40\n", "    size: 8\n")


def rig_config(tmp_path: Path, refresh: float = 60.0, **display: Any) -> RigConfig:
    return RigConfig.model_validate({
        "monitor": {"distance_cm": 57, "width_cm": 40, "resolution": [1024, 768], "refresh_hz": refresh},
        "display": {"size": [400, 300], "software_vsync": True,
                    "photodiode": {"enabled": True, "corner": "bottom-right", "size_px": 30},
                    "screenshot_dir": str(tmp_path / "shots"), **display},
        "keyboard": {"keys": {"left": 0, "right": 1}},
    })


def assert_duration(r: dict, nominal_s: float, refresh: float = 60.0) -> None:
    """Time-locked offset: on time within a refresh, unless a late flip (reported) pushed it."""
    excess = r["stimulus_duration_s"] - nominal_s
    assert excess >= -1 / refresh - 0.002, r
    if r["dropped_frames"] == 0:
        assert excess <= 1 / refresh + 0.002, r
    else:  # only as late as the longest (reported) frame interval explains
        assert excess <= r["frame_interval_max_ms"] / 1000 + 0.002, r


def trial(index: int, timeout_s: float = 5.0, **stimulus: Any) -> Trial:
    stimulus = stimulus or {"orientation": 45.0, "contrast": 0.8}
    return Trial(trial_id=f"s1:{index}", attempt=1, index=index, session_id="s1", stimulus=stimulus,
                 stimulus_type="grating", response_kind="poisson", timeout_s=timeout_s)


SESSION = SessionInfo(session_id="s1", protocol_text=ORIENTATION, rig_id="test-rig")


@pytest.fixture
def make_adapter() -> Iterator[Any]:
    xvfb_display()
    from rig_adapters.psychopy_display import PsychoPyDisplayAdapter

    made: list[PsychoPyDisplayAdapter] = []

    def make(rig: RigConfig, source: Any) -> PsychoPyDisplayAdapter:
        adapter = PsychoPyDisplayAdapter(rig, source)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        adapter.close()


def test_orientation_trial_with_simulated_subject(make_adapter: Any, tmp_path: Path) -> None:
    adapter = make_adapter(rig_config(tmp_path), SimulatedResponse("von_mises", seed=3))
    assert "grating" in adapter.capabilities()["stimulus_types"]
    adapter.start(SESSION)
    res = adapter.present(trial(0))
    t, r = res.timing, res.response
    # 0.5 s at 60 Hz = 30 frames, onset and offset are flip times on the epoch clock
    assert set(t) == {"presented_at", "responded_at", "onset_flip", "offset_flip"}
    assert r["frames_requested"] == 30 == r["frames_shown"] + r["frames_skipped"]
    assert t["offset_flip"] - t["onset_flip"] == r["stimulus_duration_s"]
    assert_duration(r, 0.5)
    assert t["presented_at"] == t["onset_flip"] <= t["responded_at"]
    assert abs(t["presented_at"] - time.time()) < 5
    assert r["dropped_frames"] == r["dropped_frames_psychopy"]
    if r["dropped_frames"] == 0:  # under heavy load some frames are late: then they are reported
        assert r["frame_interval_mean_ms"] == pytest.approx(1000 / 60, abs=1.5)
    # a Poisson spike count from the ground-truth model, reproducible from (seed, index)
    value = res.response["value"]
    assert isinstance(value, int) and value >= 0
    again = make_adapter(rig_config(tmp_path / "b"), SimulatedResponse("von_mises", seed=3))
    again.start(SESSION)
    assert again.present(trial(0)).response["value"] == value
    # the protocol's fixed parameters were applied
    fixed = yaml.safe_load(ORIENTATION)["stimulus"]["fixed"]
    assert fixed and all(res.meta["resolved_stimulus"][k] == v for k, v in fixed.items())


def test_screenshot_and_photodiode(make_adapter: Any, tmp_path: Path) -> None:
    from PIL import Image

    adapter = make_adapter(rig_config(tmp_path), SimulatedResponse("von_mises", seed=1))
    adapter.start(SESSION)
    res = adapter.present(trial(7, orientation=30.0, contrast=1.0))
    shot = np.asarray(Image.open(res.meta["screenshot"]).convert("L")).astype(float)
    assert shot.shape == (300, 400)
    assert shot[-10:, -10:].min() == 255  # photodiode patch white while the stimulus is on
    assert shot[:10, :10].max() == pytest.approx(127, abs=1)  # background corner is mean grey
    assert shot[150 - 60:150 + 60, 200 - 60:200 + 60].std() > 5  # the grating is there
    after = np.asarray(adapter.win.getMovieFrame(buffer="front").convert("L")).astype(float)
    adapter.win.movieFrames.clear()
    assert after[-10:, -10:].max() == 0  # and black once it is off
    assert after[150 - 60:150 + 60, 200 - 60:200 + 60].std() == 0  # the screen is blank again


def _press_later(source: KeyboardResponse, key: str, delay_s: float) -> threading.Thread:
    """Press `key` `delay_s` after the next stimulus onset (the adapter calls source.begin at onset)."""
    source._onset = None

    def run() -> None:
        deadline = time.monotonic() + 10
        while source._onset is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay_s)
        press_key(key)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_keyboard_response_with_real_key_events(make_adapter: Any, tmp_path: Path) -> None:
    source = KeyboardResponse(rig_config(tmp_path).keyboard)
    adapter = make_adapter(rig_config(tmp_path), source)
    adapter.start(SESSION)
    presser = _press_later(source, "Right", 0.25)
    res = adapter.present(trial(0))
    presser.join()
    assert res.response["value"] == 1 and res.response["key"] == "right"
    assert 0.25 <= res.response["rt_s"] < 2.0  # pressed 0.25 s after onset (+ xdotool start-up under load)
    assert res.timing["responded_at"] - res.timing["presented_at"] == pytest.approx(res.response["rt_s"], abs=1e-6)
    # a response after the stimulus went off is collected too
    presser = _press_later(source, "Left", 0.8)
    res = adapter.present(trial(1))
    presser.join()
    assert res.response["value"] == 0 and 0.8 <= res.response["rt_s"] < 3.0


def test_escape_aborts_then_session_continues(make_adapter: Any, tmp_path: Path) -> None:
    source = KeyboardResponse(rig_config(tmp_path).keyboard)
    adapter = make_adapter(rig_config(tmp_path), source)
    adapter.start(SESSION)
    presser = _press_later(source, "Escape", 0.2)
    t0 = time.time()
    with pytest.raises(TrialAborted) as info:
        adapter.present(trial(0))
    presser.join()
    assert info.value.code == "aborted"
    assert time.time() - t0 < 4.0  # aborted at once, not after the 5 s response timeout
    after = np.asarray(adapter.win.getMovieFrame(buffer="front").convert("L")).astype(float)
    adapter.win.movieFrames.clear()
    assert after[100:200, 150:250].std() == 0  # stimulus taken off the screen
    presser = _press_later(source, "Left", 0.2)
    res = adapter.present(trial(1))
    presser.join()
    assert res.response["value"] == 0


def test_escape_between_trials_aborts_the_next_one(make_adapter: Any, tmp_path: Path) -> None:
    adapter = make_adapter(rig_config(tmp_path), SimulatedResponse("von_mises"))
    adapter.start(SESSION)
    press_key("Escape")
    time.sleep(0.1)
    shots_before = adapter._screenshots_left
    with pytest.raises(TrialAborted, match="pressed before onset"):
        adapter.present(trial(0))
    assert adapter._screenshots_left == shots_before  # nothing was drawn
    assert adapter.present(trial(1)).response["frames_requested"] == 30  # and the rig carries on


def test_no_response_times_out(make_adapter: Any, tmp_path: Path) -> None:
    source = KeyboardResponse(rig_config(tmp_path).keyboard)
    adapter = make_adapter(rig_config(tmp_path), source)
    adapter.start(SESSION)
    with pytest.raises(ResponseTimeout, match="no response within 0.8 s"):
        adapter.present(trial(0, timeout_s=0.8))


def test_bad_trials_are_clear_errors(make_adapter: Any, tmp_path: Path) -> None:
    adapter = make_adapter(rig_config(tmp_path), SimulatedResponse("von_mises"))
    adapter.start(SESSION)
    with pytest.raises(AdapterError, match="grating.contrast: 3 is above the maximum 1"):
        adapter.present(trial(0, orientation=10.0, contrast=3.0))
    bad_type = trial(1).model_copy(update={"stimulus_type": "pulse_train"})
    with pytest.raises(AdapterError, match="cannot present 'pulse_train'"):
        adapter.present(bad_type)
    abstract = ORIENTATION.replace("type: grating", "type: abstract").replace("  fixed:\n    sf: 0.04\n    size: 8\n", "")
    with pytest.raises(AdapterError, match="draws visual stimuli; 'abstract'"):
        adapter.start(SessionInfo(session_id="s2", protocol_text=abstract, rig_id="r"))


class _Instant(ResponseSource):
    """Answers at once, so the timing test measures the display loop only."""

    name = "instant"

    def begin(self, cmd: Trial, onset: float) -> None:
        pass

    def poll(self, now: float) -> dict[str, Any] | None:
        return {"value": 1}


class _Stall(_Instant):
    """Blocks the frame loop once, 60 ms after onset: a stand-in for any hiccup (GC, disk, OS)."""

    name = "stall"
    watch_keys = ()

    def __init__(self) -> None:
        self.calls = 0

    def offer_keys(self, keys: list) -> None:
        self.calls += 1
        if self.calls == 4:
            time.sleep(0.06)


def test_late_frames_are_skipped_not_stretched(make_adapter: Any, tmp_path: Path) -> None:
    adapter = make_adapter(rig_config(tmp_path, screenshots=0), _Stall())
    adapter.configure(stimulus_type="grating", fixed={"sf": 2.0, "size": 6, "drift": 4.0}, duration_s=0.25)
    res = adapter.present(trial(0))
    r = res.response
    assert r["frames_requested"] == 15
    assert r["frames_skipped"] >= 3  # ~60 ms = 3-4 refreshes never shown
    assert r["frames_shown"] + r["frames_skipped"] == 15
    assert r["dropped_frames"] >= 1 and r["frame_interval_max_ms"] > 55
    # offset still on the grid: one late refresh at most beyond the stall itself
    assert r["stimulus_duration_s"] == pytest.approx(0.25, abs=2 / 60)


def test_frame_timing_300_presentations(make_adapter: Any, tmp_path: Path) -> None:
    """300 presentations of 2 frames: every flip timestamped, dropped frames counted (ours == PsychoPy's).

    Xvfb has no vblank, so flips are paced in software on a 60 Hz grid; on a loaded machine some
    frames are late, and the point is that each one is seen and counted.
    """
    refresh = 60.0
    period = 1 / refresh
    rig = rig_config(tmp_path, refresh=refresh, screenshots=0)
    adapter = make_adapter(rig, _Instant())
    adapter.configure(stimulus_type="grating", fixed={"sf": 2.0, "size": 6}, duration_s=2 * period)
    rows = []
    t0 = time.monotonic()
    for i in range(300):
        res = adapter.present(trial(i, orientation=float(i % 180), contrast=0.5))
        rows.append({**res.timing, **res.response})
    elapsed = time.monotonic() - t0
    durations = [r["offset_flip"] - r["onset_flip"] for r in rows]
    dropped = sum(r["dropped_frames"] for r in rows)
    assert all(r["frames_requested"] == 2 for r in rows)
    assert all(r["dropped_frames"] == r["dropped_frames_psychopy"] for r in rows)
    for r in rows:  # a trial has dropped frames exactly when its longest interval is over 1.2 periods
        assert (r["dropped_frames"] > 0) == (r["frame_interval_max_ms"] > 1.2 * period * 1000)
    onsets = [r["onset_flip"] for r in rows]
    assert all(b - a >= 3 * period * 0.8 for a, b in zip(onsets, onsets[1:]))  # align + 2 frames + offset
    assert all(r["frames_shown"] + r["frames_skipped"] == 2 for r in rows)
    exact = sum(1 for r in rows if r["frames_measured"] == 2)
    # within half a refresh: an off-by-one-frame error would be a whole refresh out
    assert statistics.median(durations) == pytest.approx(2 * period, abs=period / 2)
    assert exact >= 0.5 * len(rows), f"only {exact}/300 presentations lasted exactly 2 frames"
    print(f"\nframe timing: 300 presentations in {elapsed:.1f} s; duration median "
          f"{statistics.median(durations) * 1000:.3f} ms (nominal {2000 * period:.3f}), "
          f"sd {statistics.pstdev(durations) * 1000:.3f} ms, max {max(durations) * 1000:.3f} ms; "
          f"exact {exact}/300; dropped frames {dropped:g} of {2 * len(rows)}; "
          f"skipped {sum(r['frames_skipped'] for r in rows)}")


def test_from_options_errors_are_clear(tmp_path: Path) -> None:
    from rig_adapters.base import build_adapter

    with pytest.raises(AdapterError, match="has no option\\(s\\) \\['colour'\\]"):
        build_adapter("psychopy", {"colour": "red"})
    with pytest.raises(AdapterError, match="needs --truth"):
        build_adapter("psychopy", {"response": "simulated"})
    bad = tmp_path / "rig.yaml"
    bad.write_text("display: {size: [800]}\n")
    with pytest.raises(AdapterError, match="display.size"):
        build_adapter("psychopy", {"rig_config": str(bad)})
    adapter = build_adapter("psychopy", {"response": "keyboard", "rig_config": str(_write(tmp_path))})
    assert adapter.name == "psychopy" and adapter.response.name == "keyboard" and adapter.software_vsync
    assert adapter.win is None  # no window until a session starts


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "ok.yaml"
    path.write_text("display: {software_vsync: true}\n")
    return path


def test_refresh_rate_is_measured_when_not_configured(make_adapter: Any, tmp_path: Path) -> None:
    rig = RigConfig.model_validate({"display": {"size": [200, 150]}})  # no monitor.refresh_hz
    assert rig.monitor.refresh_hz is None
    adapter = make_adapter(rig, _Instant())
    adapter.configure(stimulus_type="blank", duration_s=0.05)
    assert adapter.refresh_hz is not None and adapter.refresh_hz > 20  # Xvfb free-runs at hundreds of Hz
    res = adapter.present(trial(0).model_copy(update={"stimulus_type": "blank", "stimulus": {}}))
    assert res.response["refresh_hz"] == adapter.refresh_hz
    assert res.response["frames_requested"] == max(1, round(0.05 * adapter.refresh_hz))


class _Constant(ResponseSource):
    """Answers 1 at once: image trials need no model of the subject here."""

    name = "constant"

    def begin(self, cmd: Trial, onset: float) -> None:
        self._onset = onset

    def poll(self, now: float) -> dict | None:
        return {"value": 1, "responded_at": time.time()}


def image_trial(index: int, pixels: np.ndarray) -> Trial:
    from orchestrator.wire_images import image_payload

    return Trial(trial_id=f"s1:{index}", attempt=1, index=index, session_id="s1",
                 stimulus={"image": image_payload(pixels)}, stimulus_type="image", response_kind="poisson",
                 timeout_s=5.0)


def _find(shot: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The h x w block of the screenshot where the centred image is (an odd margin puts the extra pixel
    before it: the adapter shifts such an image half a pixel right and down onto pixel boundaries)."""
    h, w = shape
    y0, x0 = (shot.shape[0] - h + 1) // 2, (shot.shape[1] - w + 1) // 2
    return shot[y0:y0 + h, x0:x0 + w].astype(int)


def test_an_image_on_the_wire_is_shown_pixel_for_pixel(make_adapter: Any, tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, size=(45, 61, 3), dtype=np.uint8)  # odd sizes, width not a multiple of 4
    grey = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)
    adapter = make_adapter(rig_config(tmp_path, screenshots=2), _Constant())
    assert "image" in adapter.capabilities()["stimulus_types"]
    adapter.start(SESSION)
    for index, pixels in enumerate((rgb, grey)):
        res = adapter.present(image_trial(index, pixels))
        shot = np.asarray(Image.open(res.meta["screenshot"]).convert("RGB"))
        block = _find(shot, pixels.shape[:2])
        expected = pixels.reshape(*pixels.shape[:2], -1).astype(int)
        assert np.abs(block - expected).max() <= 1, f"pixels differ by {np.abs(block - expected).max()} / 255"
        # exactly that size: the rows and columns around it are background grey
        h, w = pixels.shape[:2]
        y0, x0 = (shot.shape[0] - h + 1) // 2, (shot.shape[1] - w + 1) // 2
        ring = np.concatenate([shot[y0 - 1, x0:x0 + w], shot[y0 + h, x0:x0 + w],
                               shot[y0:y0 + h, x0 - 1], shot[y0:y0 + h, x0 + w]]).astype(int)
        assert np.abs(ring - 127).max() <= 1
        t = res.timing
        assert set(t) == {"presented_at", "responded_at", "onset_flip", "offset_flip"}
        assert t["presented_at"] == t["onset_flip"] < t["offset_flip"] and abs(t["onset_flip"] - time.time()) < 5
        assert_duration(res.response, 0.5)
        assert res.meta["resolved_stimulus"]["image"]["shape"] == list(pixels.shape)
        assert "data" not in res.meta["resolved_stimulus"]["image"]


def test_images_outside_the_rig_limits_are_refused_before_display(make_adapter: Any, tmp_path: Path) -> None:
    from orchestrator.wire_images import ImagePayloadError, image_payload
    from rig_adapters.base import StimulusRefused

    rig = rig_config(tmp_path)
    rig = rig.model_copy(update={"image_limits": rig.image_limits.model_validate(
        {"pixel": {"min": 10, "max": 245}, "mean_luminance": {"min": 0.3, "max": 0.7}, "rms_contrast_max": 0.2})})
    adapter = make_adapter(rig, _Constant())
    adapter.start(SESSION)
    mid = np.full((16, 16), 128, dtype=np.uint8)
    assert adapter.present(image_trial(0, mid)).response["value"] == 1
    checker = np.where(np.indices((16, 16)).sum(axis=0) % 2 == 0, 20, 236).astype(np.uint8)
    dark = np.full((16, 16), 40, dtype=np.uint8)
    clipped = mid.copy()
    clipped[0, 0] = 255
    for pixels, words in ((checker, "RMS contrast 0.4235 exceeds rig limit 0.2"),
                          (dark, "mean luminance 0.1569 outside rig limit [0.3, 0.7]"),
                          (clipped, "pixel values 128..255 outside rig limit [10, 245]")):
        with pytest.raises(StimulusRefused, match="refused by rig image limits") as err:
            adapter.present(image_trial(1, pixels))
        assert words in str(err.value) and err.value.code == "refused"
    big = np.full((301, 10), 128, dtype=np.uint8)  # taller than the 400 x 300 window
    with pytest.raises(StimulusRefused, match="do not fit the 400 x 300 window"):
        adapter.present(image_trial(2, big))
    tampered = image_trial(3, mid)
    tampered.stimulus["image"]["data"] = b"\x00" * 256
    with pytest.raises(ImagePayloadError, match="hash to"):
        adapter.present(tampered)
    assert image_payload(mid)["sha256"] == image_trial(0, mid).stimulus["image"]["sha256"]
