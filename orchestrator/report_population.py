"""The two report figures that differ for a population session: the images shown and the responses.

A population session's stimulus is an image (a sha256 into the artifact store) and its response a
vector, so the scalar report's "stimuli in stimulus space" and "fitted curve" figures would say
nothing; :mod:`orchestrator.report` draws these instead, under the same keys, so the page layout is
the same for every session. Each function draws on a figure it is given and returns nothing.
"""
from __future__ import annotations

from typing import Any

import numpy as np

#: Most thumbnails drawn (evenly spaced over the session, first and last included).
MAX_THUMBNAILS = 24
_COLUMNS = 8


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.35", wrap=True)


def shown_images(data: Any) -> list[tuple[int, str]]:
    """(trial index, sha256) of every trial that showed an image, in trial order."""
    return [(int(r.index), r.stimulus["image"]) for r in data.rows
            if isinstance(r.stimulus, dict) and isinstance(r.stimulus.get("image"), str)]


def thumbnail_grid(data: Any) -> tuple[int, int]:
    """(rows, columns) of the image figure, so the caller can size it before drawing."""
    n = min(len(shown_images(data)), MAX_THUMBNAILS)
    columns = max(1, min(_COLUMNS, n))
    return max(1, -(-n // columns)), columns


def draw_images(fig: Any, data: Any, images: dict[str, np.ndarray]) -> None:
    """Thumbnails of the shown images, each titled with its trial (grey 0..255, exact pixels)."""
    shown = shown_images(data)
    if len(shown) > MAX_THUMBNAILS:
        picks = np.unique(np.linspace(0, len(shown) - 1, MAX_THUMBNAILS).round().astype(int))
        shown = [shown[i] for i in picks]
    rows, columns = thumbnail_grid(data)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not shown:
        _note(axes[0, 0], "no images recorded")
        return
    for ax, (index, sha) in zip(axes.flat, shown):
        pixels = images.get(sha)
        if pixels is None:
            _note(ax, f"trial {index}: image not in the artifact store")
            continue
        if pixels.ndim == 3:
            pixels = pixels[..., 0] if pixels.shape[2] == 1 else pixels[..., :3]
        ax.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"trial {index}", fontsize=7)


def draw_responses(fig: Any, data: Any) -> None:
    """The trials x units response matrix (masked units blank), one row per completed trial."""
    ax = fig.subplots()
    responses = data.population
    if responses is None or responses.size == 0:
        _note(ax, "no population responses recorded")
        return
    index_of = {r.id: int(r.index) for r in data.rows}
    trials = [index_of.get(i, n) for n, i in enumerate(data.population_ids)]
    shown = ax.imshow(np.ma.masked_invalid(responses), aspect="auto", interpolation="nearest", cmap="magma",
                      extent=(-0.5, responses.shape[1] - 0.5, len(trials) - 0.5, -0.5))
    fig.colorbar(shown, ax=ax, label="response")
    ax.set_xlabel("unit")
    ax.set_ylabel("trial")
    if len(trials) <= 12:
        ax.set_yticks(range(len(trials)), [str(t) for t in trials])
    masked = int(np.isnan(responses).sum())
    ax.set_title(f"{responses.shape[0]} trials x {responses.shape[1]} units"
                 + (f", {masked} masked unit response(s)" if masked else ""), fontsize=9)
