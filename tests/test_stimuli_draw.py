"""Each visual stimulus type drawn in a real PsychoPy window under Xvfb, its pixels read back.

The checks are what the parameters promise: orientation estimated from the image gradients
(structure tensor) within 2 deg, spatial frequency and Michelson contrast within 5 %, a blank
screen uniform at its luminance, dots moving in their direction at their speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from stimuli import get_stimulus_type
from xvfb import xvfb_display

pytestmark = pytest.mark.display

SIZE = 512
REFRESH = 60.0


@pytest.fixture(scope="module")
def win() -> Iterator[Any]:
    xvfb_display()
    from rig_adapters.psychopy_display import open_window
    from rig_adapters.rig_config import RigConfig

    rig = RigConfig.model_validate({
        "monitor": {"distance_cm": 57, "width_cm": 40, "resolution": [1024, 768], "refresh_hz": REFRESH},
        "display": {"size": [SIZE, SIZE]},
    })
    window = open_window(rig)
    yield window
    window.close()


@pytest.fixture(scope="module")
def pix_per_deg(win: Any) -> float:
    from psychopy.tools.monitorunittools import deg2pix

    return float(deg2pix(1.0, win.monitor))


def build(win: Any, type_name: str, image_dir: Path | None = None, **values: Any) -> Any:
    from stimuli.draw import build_drawable

    stype = get_stimulus_type(type_name)
    return build_drawable(win, stype, stype.resolve(values), refresh_hz=REFRESH, image_dir=image_dir)


def grab(win: Any, drawable: Any, frame: int = 0) -> np.ndarray:
    """Draw one frame into the back buffer and read it back (grey levels, row 0 = top)."""
    win.clearBuffer()
    drawable.draw(frame)
    image = np.asarray(win.getMovieFrame(buffer="back")).astype(float)
    win.movieFrames.clear()
    win.clearBuffer()
    assert image.shape == (SIZE, SIZE, 3)
    return image[..., 0]


def centre(img: np.ndarray, half: int = 100) -> np.ndarray:
    c = SIZE // 2
    return img[c - half:c + half, c - half:c + half]


def orientation_deg(patch: np.ndarray) -> float:
    """Grating orientation in PsychoPy's convention (0 = vertical bars, + clockwise), mod 180."""
    gy, gx = np.gradient(patch)
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    return float(0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))) % 180.0


def cycles_per_pixel(patch: np.ndarray) -> float:
    """For a sinusoid, RMS gradient / RMS deviation = 2 pi f."""
    gy, gx = np.gradient(patch)
    return float(np.sqrt((gx ** 2 + gy ** 2).mean() / ((patch - patch.mean()) ** 2).mean()) / (2 * np.pi))


def michelson(patch: np.ndarray) -> float:
    return float((patch.max() - patch.min()) / (patch.max() + patch.min()))


def angle_error(a: float, b: float) -> float:
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


def test_blank_is_uniform_at_its_luminance(win: Any) -> None:
    for lum in (0.0, 0.25, 0.5, 1.0):
        img = grab(win, build(win, "blank", luminance=lum))
        assert img.std() == 0.0, f"blank at {lum} not uniform"
        assert abs(img.mean() - lum * 255) <= 1.0


@pytest.mark.parametrize("ori", [0.0, 22.5, 45.0, 90.0, 117.0, 160.0])
def test_grating_orientation_sf_contrast(win: Any, pix_per_deg: float, ori: float) -> None:
    sf, contrast = 0.5, 0.6
    img = grab(win, build(win, "grating", orientation=ori, sf=sf, contrast=contrast, size=14, mask="none"))
    patch = centre(img)
    assert angle_error(orientation_deg(patch), ori) < 2.0
    assert cycles_per_pixel(patch) * pix_per_deg == pytest.approx(sf, rel=0.05)
    assert michelson(patch) == pytest.approx(contrast, rel=0.05)
    assert patch.mean() == pytest.approx(127.5, abs=4)  # mean grey, like the background


@pytest.mark.parametrize("contrast", [0.05, 0.2, 1.0])
def test_grating_contrast_levels(win: Any, contrast: float) -> None:
    img = grab(win, build(win, "grating", orientation=30, sf=1.0, contrast=contrast, size=14, mask="none"))
    assert michelson(centre(img)) == pytest.approx(contrast, rel=0.05, abs=0.004)


def test_grating_size_position_and_circular_mask(win: Any, pix_per_deg: float) -> None:
    img = grab(win, build(win, "grating", orientation=0, sf=1.0, size=4, x=3, y=2))
    bg = img[0, 0]
    changed = np.argwhere(np.abs(img - bg) > 2)
    rows, cols = changed[:, 0], changed[:, 1]
    cx, cy = cols.mean() - SIZE / 2, SIZE / 2 - rows.mean()  # +y up
    assert cx / pix_per_deg == pytest.approx(3, abs=0.2) and cy / pix_per_deg == pytest.approx(2, abs=0.2)
    width = (cols.max() - cols.min() + 1) / pix_per_deg
    assert width == pytest.approx(4, abs=0.25)
    radius = np.hypot(cols - cols.mean(), rows - rows.mean()).max() / pix_per_deg
    assert radius == pytest.approx(2, abs=0.15)  # circular aperture: corners of the square stay grey


def test_grating_drift_advances_phase(win: Any, pix_per_deg: float) -> None:
    """drift 6 Hz at 60 Hz = 0.1 cycle per frame; after 5 frames the bars moved half a period."""
    d = build(win, "grating", orientation=0, sf=0.5, size=14, mask="none", drift=6.0)
    a, b = centre(grab(win, d, 0)), centre(grab(win, d, 5))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < -0.95
    c = centre(grab(win, d, 10))
    assert np.corrcoef(a.ravel(), c.ravel())[0, 1] > 0.95


def test_gabor_envelope_and_orientation(win: Any, pix_per_deg: float) -> None:
    size, ori = 8.0, 60.0
    img = grab(win, build(win, "gabor", orientation=ori, sf=1.5, contrast=1.0, size=size))
    dev = np.abs(img - 127.5)
    assert angle_error(orientation_deg(centre(img, 40)), ori) < 2.0
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    r = np.hypot(xx - SIZE / 2 + 0.5, yy - SIZE / 2 + 0.5) / pix_per_deg
    sd = size / 6
    inner = dev[r < 0.5 * sd].max()
    ring = dev[(r > 2.5 * sd) & (r < 3 * sd)].max()
    assert inner > 100 and ring < 0.1 * inner
    assert dev[r > 3.2 * sd].max() <= 2.0  # exp(-3.2^2/2) of the amplitude, plus rounding


def test_plaid_is_average_of_its_components(win: Any) -> None:
    common = dict(sf=0.8, size=14, mask="none", contrast=0.8)
    plaid = centre(grab(win, build(win, "plaid", orientation=20, angle=90, **common)))
    g1 = centre(grab(win, build(win, "grating", orientation=20, **common)))
    g2 = centre(grab(win, build(win, "grating", orientation=110, **common)))
    assert np.abs(plaid - (g1 + g2) / 2).max() <= 2.0
    assert michelson(plaid) == pytest.approx(0.8, rel=0.05)


def test_fixation_cross_is_centred(win: Any, pix_per_deg: float) -> None:
    img = grab(win, build(win, "fixation", size=1.0, luminance=1.0))
    bright = np.argwhere(img > 200)
    assert len(bright) > 0
    assert bright[:, 0].mean() == pytest.approx(SIZE / 2, abs=2)
    assert bright[:, 1].mean() == pytest.approx(SIZE / 2, abs=2)
    extent = (bright[:, 1].max() - bright[:, 1].min() + 1) / pix_per_deg
    assert extent == pytest.approx(1.0, abs=0.15)
    assert img[0, 0] == pytest.approx(127.5, abs=1)


@pytest.mark.parametrize("direction", [0.0, 90.0, 225.0])
def test_rdk_dots_move_in_direction_at_speed(win: Any, pix_per_deg: float, direction: float) -> None:
    speed = 6.0  # deg/s -> 0.1 deg/frame at 60 Hz
    d = build(win, "rdk", coherence=1.0, direction=direction, speed=speed, n_dots=150, dot_size=4,
              field_size=12, dot_life=-1)
    a = grab(win, d, 0) > 200
    frames = 6
    b = grab(win, d, frames) > 200
    assert 50 < a.sum() / 16 < 250  # about n_dots dots of ~16 pixels each
    # shift that best maps frame 0 onto frame 6 (cross-correlation peak)
    fa, fb = np.fft.fft2(a.astype(float)), np.fft.fft2(b.astype(float))
    corr = np.fft.ifft2(fb * np.conj(fa)).real
    dy, dx = np.unravel_index(np.argmax(corr), corr.shape)
    dy = dy - SIZE if dy > SIZE // 2 else dy
    dx = dx - SIZE if dx > SIZE // 2 else dx
    expected = speed / REFRESH * frames * pix_per_deg
    moved = np.hypot(dx, dy)
    assert moved == pytest.approx(expected, abs=1.5)
    measured_dir = np.degrees(np.arctan2(-dy, dx)) % 360  # rows grow downwards
    assert angle_error(measured_dir / 2, direction / 2) * 2 < 10  # full-circle error < 10 deg


def test_rdk_zero_coherence_has_no_common_motion(win: Any) -> None:
    d = build(win, "rdk", coherence=0.0, direction=0, speed=6, n_dots=150, dot_size=4, field_size=12)
    a = grab(win, d, 0) > 200
    b = grab(win, d, 6) > 200
    fa, fb = np.fft.fft2(a.astype(float)), np.fft.fft2(b.astype(float))
    corr = np.fft.ifft2(fb * np.conj(fa)).real
    signal = corr.max() / a.sum()
    assert signal < 0.5  # coherent motion would map most dots onto each other (~1.0)


def test_image_from_folder(win: Any, tmp_path: Path, pix_per_deg: float) -> None:
    from PIL import Image

    data = np.zeros((64, 128), dtype=np.uint8)
    data[:, :64] = 255  # left half white, right half black
    Image.fromarray(data).save(tmp_path / "halves.png")
    img = grab(win, build(win, "image", image_dir=tmp_path, name="halves", size=8))
    row = img[SIZE // 2]
    left = row[int(SIZE / 2 - 3 * pix_per_deg)]
    right = row[int(SIZE / 2 + 3 * pix_per_deg)]
    assert left > 240 and right < 15
    tall = np.argwhere(np.abs(img[:, SIZE // 2 - 40] - 127.5) > 20)[:, 0]
    assert (tall.max() - tall.min() + 1) / pix_per_deg == pytest.approx(4.0, abs=0.2)  # aspect kept


def test_image_outside_folder_is_refused(win: Any, tmp_path: Path) -> None:
    from stimuli import StimulusParameterError
    from stimuli.draw import find_image

    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(StimulusParameterError, match="no image"):
        find_image(tmp_path, "missing")
    with pytest.raises(StimulusParameterError, match="image_dir"):
        find_image(None, "a")
