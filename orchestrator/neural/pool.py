"""The image pool: candidate images for pool-based designs and the reference of what "natural" is.

A pool is a .npz file (its first array, (n, H, W) or (n, H, W, C), uint8 0..255 or floats 0..1)
or a directory of .npy / .png files, loaded in name order. Without a pool the designs use a seeded
set of 1/f ("pink") noise images, whose amplitude spectrum falls like natural images', scaled into
the protocol's luminance and contrast limits. Every pool image must pass the protocol's safety
limits: a pool that does not is refused when the protocol is validated, naming the file and image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class PoolError(ValueError):
    """The pool cannot be used; the message names the file or image at fault."""


def _as_unit(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise PoolError(f"{where}: pixels must be numbers, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if out.size and (out.min() < 0 or out.max() > 1):
        raise PoolError(f"{where}: float pixels must be in 0..1 (uint8 images are 0..255)")
    return out


def load_pool_file(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """Images of `path` as floats 0..1, shape (n, *shape); PoolError on a missing file or mixed sizes."""
    path = Path(path)
    if not path.exists():
        raise PoolError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".npy", ".png"))
        if not files:
            raise PoolError(f"{path}: no .npy or .png images in the directory")
        images = []
        for f in files:
            if f.suffix.lower() == ".npy":
                arr = np.load(f, allow_pickle=False)
            else:
                from PIL import Image

                arr = np.asarray(Image.open(f).convert("L" if len(shape) == 2 else "RGB"))
            if arr.shape != shape:
                raise PoolError(f"{f}: image of shape {list(arr.shape)}, the protocol's images are {list(shape)}")
            images.append(_as_unit(arr, str(f)))
        return np.stack(images)
    try:
        with np.load(path, allow_pickle=False) as data:
            if not data.files:
                raise PoolError(f"{path}: the .npz file holds no array")
            arr = data[data.files[0]]
    except (OSError, ValueError) as exc:
        raise PoolError(f"{path}: cannot read as .npz: {exc}") from None
    if arr.shape[1:] != shape:
        raise PoolError(f"{path}: images of shape {list(arr.shape[1:])}, the protocol's images are {list(shape)}")
    return _as_unit(arr, str(path))


def pink_noise_pool(n: int, shape: tuple[int, ...], seed: int, mean: float, contrast: float) -> np.ndarray:
    """n seeded 1/f-noise images with the given mean luminance and RMS contrast, clipped to 0..1."""
    rng = np.random.default_rng([int(seed), 0x9001])
    h, w = shape[:2]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w))
    amp[0, 0] = 0.0
    chans = shape[2] if len(shape) == 3 else 1
    spec = (rng.standard_normal((n, chans, h, fx.shape[1])) + 1j * rng.standard_normal((n, chans, h, fx.shape[1])))
    img = np.fft.irfft2(spec * amp, s=(h, w))
    img /= img.std(axis=(1, 2, 3), keepdims=True) + 1e-12
    img = np.clip(mean + contrast * img, 0.0, 1.0)
    img = np.moveaxis(img, 1, -1)
    return img[..., 0] if len(shape) == 2 else img


def load_pool(protocol: Any, seed: int = 0) -> np.ndarray:
    """The protocol's pool as floats 0..1 (n, *shape), checked against the safety limits."""
    space = protocol.stimulus
    if space.pool is not None:
        images = load_pool_file(space.pool, space.shape)
    else:
        limits = protocol.image_limits()
        lo, hi = limits["mean_luminance"]
        mean = min(max(0.5, lo), hi)
        contrast = min(0.2, 0.8 * limits["rms_contrast"][1])
        images = pink_noise_pool(space.pool_size, space.shape, seed, mean, contrast)
        images = np.round(images * 255) / 255  # what is stored and shown is uint8
    from orchestrator.protocol import SafetyViolation

    where = space.pool or "the generated pool"
    for i, img in enumerate(images):
        try:
            protocol.check_image(img, where=f"stimulus.pool: {where} image {i}")
        except SafetyViolation as exc:
            raise PoolError(str(exc).removeprefix("stimulus.pool: ")) from None
    return images


def to_tensor_layout(images: np.ndarray) -> np.ndarray:
    """(n, H, W[, C]) -> (n, C, H, W), the layout torch modules expect."""
    return images[:, None] if images.ndim == 3 else np.moveaxis(images, -1, 1)
