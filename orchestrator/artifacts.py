"""Content-addressed storage of the images a session shows: one uint8 .npy file per sha256.

A trial's stored stimulus is ``{"image": "<sha256>"}``; the pixels live here, named by the sha256
of their C-order pixel bytes (the hash :mod:`orchestrator.wire_images` puts on the wire), so the
same image shown twice is stored once and any copy can be verified. The default location is beside the SQLite database (``<db path>.artifacts/``);
``CLOOP_ARTIFACTS`` (or an explicit path) puts it elsewhere, which PostgreSQL sessions need.
Files are written to a temporary name, fsynced and renamed: a crash leaves no half image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.wire_images import image_payload, image_sha256

__all__ = ["ArtifactError", "ArtifactStore", "default_location", "image_sha256", "to_uint8"]

ENV_VAR = "CLOOP_ARTIFACTS"


class ArtifactError(ValueError):
    """An artifact is missing, corrupt, or not an image cloop can store."""


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """0..1 floats (or uint8) -> uint8 0..255, rounding to the nearest level."""
    arr = np.asarray(pixels)
    if arr.dtype == np.uint8:
        return arr
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise ArtifactError("image pixels must be finite numbers in 0..1")
    return np.round(arr * 255.0).astype(np.uint8)


def default_location(db_url: str | None) -> Path:
    """Where a session's images go: $CLOOP_ARTIFACTS, else beside a SQLite file, else ./cloop.artifacts."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    if db_url and db_url.startswith("sqlite:///"):
        path = db_url[len("sqlite:///"):]
        if path and path != ":memory:":
            return Path(path + ".artifacts")
    return Path("cloop.artifacts")


class ArtifactStore:
    """Put and get uint8 images by sha256 under one directory (two-level fan-out)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_database(cls, db_url: str | None, override: str | Path | None = None) -> "ArtifactStore":
        return cls(Path(override) if override else default_location(db_url))

    def _path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.npy"

    def put(self, pixels: np.ndarray) -> str:
        """Store an image (0..1 floats are quantised to uint8) and return its sha256."""
        arr = to_uint8(pixels)
        if arr.ndim not in (2, 3):
            raise ArtifactError(f"an image is (H, W) or (H, W, C), got shape {list(arr.shape)}")
        sha = image_sha256(arr)
        path = self._path(sha)
        if path.exists():
            return sha
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return sha

    def get(self, sha: str) -> np.ndarray:
        """The uint8 image stored under `sha`, verified against its hash."""
        path = self._path(sha)
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ArtifactError(f"image {sha} is not in {self.root}") from None
        if image_sha256(arr) != sha:
            raise ArtifactError(f"image {sha} in {self.root} is corrupt (its content hash differs)")
        return arr

    def __contains__(self, sha: str) -> bool:
        return self._path(sha).exists()

    def wire(self, stimulus: dict[str, Any]) -> dict[str, Any]:
        """The stimulus as sent to a rig: the image ref replaced by its pixels (:mod:`orchestrator.wire_images`)."""
        if set(stimulus) != {"image"} or not isinstance(stimulus["image"], str):
            return stimulus
        return {"image": image_payload(self.get(stimulus["image"]))}
