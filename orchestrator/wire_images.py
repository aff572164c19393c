"""An image stimulus as it travels to a rig: exact uint8 pixels, their shape and their sha256.

A trial's stored stimulus refers to an image by hash (``{"image": "<sha256 hex>"}``); the trial sent
to the rig carries the pixels themselves::

    {"image": {"sha256": "<64 hex>", "shape": [H, W] or [H, W, C], "dtype": "uint8", "data": <bytes>}}

:func:`check_image_payload` is the structural check the wire decoder runs (no numpy, no hashing:
exact keys, types, ``len(data) == H*W*C``); :func:`image_array` is what a rig runs before showing it
(verifies the sha256, returns a read-only array); :func:`image_payload` builds the dict from an array.
Both sides import this module; it has no zmq and no torch.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import numpy as np

__all__ = ["MAX_IMAGE_BYTES", "MAX_IMAGE_SIDE", "ImagePayloadError", "check_image_payload", "image_payload",
           "image_array", "image_sha256", "is_image_payload"]

#: Largest pixel buffer a trial may carry (a 1920 x 1080 RGB frame is 6.2 MB).
MAX_IMAGE_BYTES = 8 << 20
#: Largest height or width in pixels.
MAX_IMAGE_SIDE = 4096
_CHANNELS = (1, 3, 4)
_KEYS = frozenset({"sha256", "shape", "dtype", "data"})
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ImagePayloadError(ValueError):
    """The image on the wire is malformed or its pixels do not match its hash."""


def is_image_payload(value: Any) -> bool:
    """True for a dict that claims to be an image payload (has a ``data`` or ``sha256`` key)."""
    return isinstance(value, dict) and ("data" in value or "sha256" in value)


def check_image_payload(value: Any, path: str = "image") -> tuple[int, ...]:
    """Structural check of an image payload (cheap: no hashing); return its shape.

    Raises :class:`ImagePayloadError` naming ``path`` and the field at fault.
    """
    if not isinstance(value, dict):
        raise ImagePayloadError(f"{path}: expected a map with sha256, shape, dtype, data, got {type(value).__name__}")
    keys = set(value)
    if keys != _KEYS:
        missing, extra = sorted(_KEYS - keys), sorted(str(k)[:40] for k in keys - _KEYS)
        raise ImagePayloadError(f"{path}: needs exactly the keys sha256, shape, dtype, data"
                                + (f"; missing {missing}" if missing else "") + (f"; unknown {extra[:5]}" if extra else ""))
    sha = value["sha256"]
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise ImagePayloadError(f"{path}.sha256: expected 64 lowercase hex digits, got {str(sha)[:80]!r}")
    if value["dtype"] != "uint8":
        raise ImagePayloadError(f"{path}.dtype: only 'uint8' is allowed, got {str(value['dtype'])[:40]!r}")
    shape = value["shape"]
    if not isinstance(shape, list) or len(shape) not in (2, 3) or not all(type(s) is int for s in shape):
        raise ImagePayloadError(f"{path}.shape: expected [H, W] or [H, W, C] of integers, got {str(shape)[:80]}")
    if not all(1 <= s <= MAX_IMAGE_SIDE for s in shape[:2]):
        raise ImagePayloadError(f"{path}.shape: height and width must be 1..{MAX_IMAGE_SIDE}, got {shape}")
    if len(shape) == 3 and shape[2] not in _CHANNELS:
        raise ImagePayloadError(f"{path}.shape: channels must be one of {list(_CHANNELS)}, got {shape[2]}")
    data = value["data"]
    if not isinstance(data, (bytes, bytearray)):
        raise ImagePayloadError(f"{path}.data: expected bytes, got {type(data).__name__}")
    expected = math.prod(shape)
    if expected > MAX_IMAGE_BYTES:
        raise ImagePayloadError(f"{path}.shape: {shape} is {expected} B, over the limit of {MAX_IMAGE_BYTES} B")
    if len(data) != expected:
        raise ImagePayloadError(f"{path}.data: {len(data)} B, but shape {shape} of uint8 needs {expected} B")
    return tuple(shape)


def image_sha256(pixels: np.ndarray) -> str:
    """The content hash of a uint8 image: sha256 of its C-order pixel bytes (what the wire carries)."""
    return hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).hexdigest()


def image_payload(pixels: np.ndarray) -> dict[str, Any]:
    """The wire form of a uint8 image (H x W or H x W x C); the hash is over the C-order bytes."""
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise ImagePayloadError(f"image: pixels must be uint8, got {array.dtype}")
    data = np.ascontiguousarray(array).tobytes()
    payload = {"sha256": hashlib.sha256(data).hexdigest(), "shape": [int(s) for s in array.shape],
               "dtype": "uint8", "data": data}
    check_image_payload(payload)
    return payload


def image_array(payload: Any, path: str = "image") -> np.ndarray:
    """Check an image payload and verify its sha256; return the pixels as a read-only uint8 array."""
    shape = check_image_payload(payload, path)
    data = bytes(payload["data"])
    digest = hashlib.sha256(data).hexdigest()
    if digest != payload["sha256"]:
        raise ImagePayloadError(f"{path}.sha256: the pixels hash to {digest}, not {payload['sha256']} "
                                "(corrupted or altered on the way)")
    array = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    return array
