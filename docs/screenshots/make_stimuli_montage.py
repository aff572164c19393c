"""Regenerate docs/screenshots/stimuli.png: one frame of each visual stimulus type, read back from
a real PsychoPy window (run under Xvfb: `xvfb-run -s "-screen 0 1024x768x24" python ...`)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rig_adapters.psychopy_display import open_window  # noqa: E402
from rig_adapters.rig_config import RigConfig  # noqa: E402
from stimuli import get_stimulus_type  # noqa: E402
from stimuli.draw import build_drawable  # noqa: E402

TILE = 256
PANELS = [
    ("blank", {"luminance": 0.5}),
    ("fixation", {"size": 1.5, "line_width": 4}),
    ("grating", {"orientation": 30, "sf": 1.0, "size": 8, "contrast": 1.0}),
    ("gabor", {"orientation": -45, "sf": 1.5, "size": 8}),
    ("plaid", {"orientation": 20, "angle": 90, "sf": 1.0, "size": 8}),
    ("rdk", {"coherence": 0.5, "direction": 0, "n_dots": 120, "field_size": 8, "dot_size": 5}),
    ("image", {"name": "checker", "size": 7}),
]


def main() -> None:
    rig = RigConfig.model_validate({"monitor": {"distance_cm": 57, "width_cm": 40, "resolution": [1024, 768],
                                                "refresh_hz": 60}, "display": {"size": [TILE, TILE]}})
    win = open_window(rig)
    images = Path(tempfile.mkdtemp())
    checker = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)
    Image.fromarray(checker).resize((128, 128), Image.NEAREST).save(images / "checker.png")
    tiles = []
    for name, values in PANELS:
        stype = get_stimulus_type(name)
        drawable = build_drawable(win, stype, stype.resolve(values), refresh_hz=60, image_dir=images)
        win.clearBuffer()
        drawable.draw(0)
        tile = win.getMovieFrame(buffer="back").convert("RGB")
        win.movieFrames.clear()
        ImageDraw.Draw(tile).text((6, 4), name, fill=(255, 255, 0))
        tiles.append(tile)
    win.close()
    sheet = Image.new("RGB", (TILE * len(tiles), TILE))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * TILE, 0))
    out = Path(__file__).with_name("stimuli.png")
    sheet.save(out)
    print(out)


if __name__ == "__main__":
    main()
