"""PsychoPy drawing of the built-in visual stimulus types.

Imported only on rigs with a display: PsychoPy is imported inside :func:`build_drawable`, so
``import stimuli.draw`` stays cheap. A drawable is built once per trial from the resolved parameter
set (``StimulusType.resolve``) and ``draw(frame)`` is called once per video frame, ``frame``
counting from stimulus onset; motion (grating drift, dot steps) is a function of the frame index,
so a dropped frame does not slow the stimulus down.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Callable, Protocol

from stimuli.schema import StimulusParameterError, StimulusType

__all__ = ["Drawable", "build_drawable", "luminance_to_rgb", "IMAGE_EXTENSIONS", "PixelImage"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class Drawable(Protocol):
    def draw(self, frame: int) -> None: ...


def luminance_to_rgb(luminance: float) -> tuple[float, float, float]:
    """Fraction of the display range (0 black .. 1 white) -> PsychoPy rgb (-1 .. 1)."""
    v = 2.0 * luminance - 1.0
    return (v, v, v)


class _Blank:
    def __init__(self, win: Any, p: dict[str, Any]) -> None:
        from psychopy import visual

        self.rect = visual.Rect(win, units="norm", width=2.0, height=2.0, pos=(0, 0),
                                fillColor=luminance_to_rgb(p["luminance"]), lineColor=None, colorSpace="rgb")

    def draw(self, frame: int) -> None:
        self.rect.draw()


class _Fixation:
    def __init__(self, win: Any, p: dict[str, Any]) -> None:
        from psychopy import visual

        x, y, s = p["x"], p["y"], p["size"] / 2.0
        color = luminance_to_rgb(p["luminance"])
        self.lines = [
            visual.Line(win, units="deg", start=(x - s, y), end=(x + s, y), lineWidth=p["line_width"],
                        lineColor=color, colorSpace="rgb"),
            visual.Line(win, units="deg", start=(x, y - s), end=(x, y + s), lineWidth=p["line_width"],
                        lineColor=color, colorSpace="rgb"),
        ]

    def draw(self, frame: int) -> None:
        for line in self.lines:
            line.draw()


def _grating(win: Any, p: dict[str, Any], ori: float, mask: str | None, contrast: float,
             opacity: float = 1.0) -> Any:
    from psychopy import visual

    return visual.GratingStim(
        win, tex="sin", mask=mask, units="deg", sf=p["sf"], ori=ori, phase=p["phase"],
        contrast=contrast, size=p["size"], pos=(p["x"], p["y"]), color=(1.0, 1.0, 1.0),
        colorSpace="rgb", texRes=256, interpolate=True, opacity=opacity,
    )


def _mask(name: str) -> str | None:
    return None if name == "none" else name


class _Grating:
    """Grating or Gabor; drift advances the phase by drift/refresh cycles per frame."""

    def __init__(self, win: Any, p: dict[str, Any], refresh_hz: float) -> None:
        self.stim = _grating(win, p, p["orientation"], _mask(p["mask"]), p["contrast"])
        self.phase0 = p["phase"]
        self.step = p["drift"] / refresh_hz

    def draw(self, frame: int) -> None:
        if self.step:
            self.stim.phase = self.phase0 + self.step * frame
        self.stim.draw()


class _Plaid:
    """Two gratings averaged (the second at opacity 0.5): each component has half the contrast."""

    def __init__(self, win: Any, p: dict[str, Any], refresh_hz: float) -> None:
        mask = _mask(p["mask"])
        self.stims = [
            _grating(win, p, p["orientation"], mask, p["contrast"]),
            _grating(win, p, p["orientation"] + p["angle"], mask, p["contrast"], opacity=0.5),
        ]
        self.phase0 = p["phase"]
        self.step = p["drift"] / refresh_hz

    def draw(self, frame: int) -> None:
        for stim in self.stims:
            if self.step:
                stim.phase = self.phase0 + self.step * frame
            stim.draw()


class _Dots:
    """PsychoPy DotStim; speed is converted from deg/s to deg/frame with the refresh rate.

    DotStim.draw() moves the dots itself, once per call, and a second time on legacy-GL windows
    (``_drawLegacyGL`` updates again; seen with PsychoPy 2026.2 under Mesa/Xvfb). The step size and
    dot life are scaled by the number of updates per draw so the dots move at ``speed`` either way.
    """

    def __init__(self, win: Any, p: dict[str, Any], refresh_hz: float) -> None:
        from psychopy import visual

        self.updates_per_draw = 2 if getattr(win, "USE_LEGACY_GL", False) else 1
        k = self.updates_per_draw
        life = int(p["dot_life"])
        self.stim = visual.DotStim(
            win, units="deg", nDots=int(p["n_dots"]), coherence=p["coherence"],
            fieldPos=(p["x"], p["y"]), fieldSize=p["field_size"], fieldShape="circle",
            dotSize=p["dot_size"], dotLife=life * k if life > 0 else life, dir=p["direction"],
            speed=p["speed"] / refresh_hz / k, color=luminance_to_rgb(p["luminance"]), colorSpace="rgb",
            signalDots="same", noiseDots="direction",
        )
        self.drawn = 0

    def draw(self, frame: int) -> None:
        # catch up if frames were skipped, so position is a function of the frame index
        while self.drawn < frame:
            for _ in range(self.updates_per_draw):
                self.stim._update_dotsXY()
            self.drawn += 1
        self.stim.draw()
        self.drawn += 1


def find_image(image_dir: Path | None, name: str) -> Path:
    """The file for image `name` inside `image_dir` (extension optional); never outside it."""
    if image_dir is None:
        raise StimulusParameterError("image", "name", "the rig config has no display.image_dir")
    root = Path(image_dir).resolve()
    candidates = [root / name] + [root / (name + ext) for ext in IMAGE_EXTENSIONS]
    for path in candidates:
        path = path.resolve()
        if path.parent == root and path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            return path
    raise StimulusParameterError("image", "name", f"no image {name!r} in {root}")


class _Image:
    def __init__(self, win: Any, p: dict[str, Any], image_dir: Path | None) -> None:
        from PIL import Image
        from psychopy import visual

        path = find_image(image_dir, p["name"])
        with Image.open(path) as img:
            w, h = img.size
        self.stim = visual.ImageStim(
            win, image=str(path), units="deg", size=(p["size"], p["size"] * h / w),
            pos=(p["x"], p["y"]), ori=p["orientation"], contrast=p["contrast"], interpolate=True,
        )

    def draw(self, frame: int) -> None:
        self.stim.draw()


class PixelImage:
    """A uint8 image shown pixel for pixel: one image pixel per screen pixel, centred, no filtering.

    Value ``v`` appears as ``v / 255`` of the display range (PsychoPy colour ``2 v / 255 - 1``).
    Greyscale (H x W or H x W x 1) is drawn as equal R, G, B. The pixels go to PsychoPy as an 8-bit
    PIL image: its own float path misreads RGB arrays (no -1..1 rescaling) and greyscale rows whose
    width is not a multiple of 4. An odd-sized image is shifted half a pixel so that its edges fall
    on pixel boundaries.
    """

    def __init__(self, win: Any, pixels: Any) -> None:
        import numpy as np
        from PIL import Image
        from psychopy import visual

        array = np.asarray(pixels)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise StimulusParameterError("image", "image", f"expected H x W (x C) uint8 pixels, got "
                                         f"{array.dtype} {array.shape}")
        if array.ndim == 2 or array.shape[2] == 1:
            array = np.repeat(array.reshape(array.shape[0], array.shape[1], 1), 3, axis=2)
        elif array.shape[2] != 3:
            raise StimulusParameterError("image", "image", f"{array.shape[2]} channels: the display shows "
                                         "greyscale or RGB")
        h, w = array.shape[:2]
        win_w, win_h = (int(s) for s in win.size)
        if w > win_w or h > win_h:
            raise StimulusParameterError("image", "image", f"{w} x {h} pixels do not fit the {win_w} x {win_h} window")
        pos = (((win_w - w) % 2) / 2.0, -((win_h - h) % 2) / 2.0)
        self.size_px = (w, h)
        self.stim = visual.ImageStim(win, image=Image.fromarray(np.ascontiguousarray(array)), units="pix",
                                     size=(w, h), pos=pos, interpolate=False, colorSpace="rgb",
                                     color=(1.0, 1.0, 1.0))

    def draw(self, frame: int) -> None:
        self.stim.draw()


def build_drawable(win: Any, stype: StimulusType, params: dict[str, Any], *, refresh_hz: float,
                   image_dir: Path | None = None) -> Drawable:
    """A drawable for one trial. ``params`` must come from ``stype.resolve`` (complete, checked)."""
    if stype.modality != "visual":
        raise StimulusParameterError(stype.name, "type", f"{stype.name} is not a visual stimulus type")
    if refresh_hz <= 0 or not math.isfinite(refresh_hz):
        raise ValueError(f"refresh_hz must be a positive number, got {refresh_hz!r}")
    builders: dict[str, Callable[[], Drawable]] = {
        "blank": lambda: _Blank(win, params),
        "fixation": lambda: _Fixation(win, params),
        "grating": lambda: _Grating(win, params, refresh_hz),
        "gabor": lambda: _Grating(win, params, refresh_hz),
        "plaid": lambda: _Plaid(win, params, refresh_hz),
        "rdk": lambda: _Dots(win, params, refresh_hz),
        "image": lambda: _Image(win, params, image_dir),
    }
    if stype.name in builders:
        return builders[stype.name]()
    if stype.drawer:
        module_name, _, attr = stype.drawer.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        return factory(win, params, refresh_hz=refresh_hz, image_dir=image_dir)
    raise StimulusParameterError(stype.name, "type", f"no drawer for visual stimulus type {stype.name!r}")
