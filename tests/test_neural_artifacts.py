"""Images are stored by content hash beside the database and travel to the rig verified."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator.artifacts import ArtifactError, ArtifactStore, default_location, image_sha256
from orchestrator.wire_images import ImagePayloadError, image_array, image_payload


def test_put_get_roundtrip_is_content_addressed(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "a")
    img = np.random.default_rng(0).integers(0, 256, (12, 10), dtype=np.uint8)
    sha = store.put(img)
    assert sha == image_sha256(img) and sha in store
    np.testing.assert_array_equal(store.get(sha), img)
    assert store.put(img.copy()) == sha and len(list((tmp_path / "a").rglob("*.npy"))) == 1
    floats = store.put(np.full((4, 4), 0.5))
    assert store.get(floats).dtype == np.uint8 and int(store.get(floats)[0, 0]) == 128


def test_corrupt_or_missing_artifact_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    sha = store.put(np.zeros((4, 4), np.uint8))
    path = next(tmp_path.rglob(f"{sha}.npy"))
    np.save(path, np.ones((4, 4), np.uint8))
    with pytest.raises(ArtifactError, match="corrupt"):
        store.get(sha)
    with pytest.raises(ArtifactError, match="is not in"):
        store.get("0" * 64)
    with pytest.raises(ArtifactError, match="0..1"):
        store.put(np.full((4, 4), 1.5))


def test_default_location_is_beside_sqlite_and_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOOP_ARTIFACTS", raising=False)
    assert default_location(f"sqlite:///{tmp_path}/s.db") == Path(f"{tmp_path}/s.db.artifacts")
    monkeypatch.setenv("CLOOP_ARTIFACTS", str(tmp_path / "shared"))
    assert default_location("postgresql://localhost/cloop") == tmp_path / "shared"
    assert ArtifactStore.for_database("postgresql://x/y", tmp_path / "opt").root == tmp_path / "opt"


def test_wire_form_decodes_to_the_same_pixels(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    img = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    sha = store.put(img)
    wire = store.wire({"image": sha})["image"]
    assert wire["shape"] == [8, 8, 3] and wire["dtype"] == "uint8" and isinstance(wire["data"], bytes)
    assert wire == image_payload(img) and wire["sha256"] == sha  # one wire format, one hash
    np.testing.assert_array_equal(image_array(wire), img)
    with pytest.raises(ImagePayloadError, match="hash to"):
        image_array({**wire, "data": bytes(len(wire["data"]))})
    with pytest.raises(ImagePayloadError, match="needs"):
        image_array({**wire, "data": wire["data"][:-1]})
