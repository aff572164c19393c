"""Population responses in the store, analysis and NWB export, on real SQLite and PostgreSQL."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator import analysis
from orchestrator import store as st
from store_factory import loaded_protocol

UNITS = ["u17", "u18", "u20", "u31", "u32"]
POPULATION_TEXT = """\
name: population-store
version: "1.0"
description: a five-unit population
stimulus:
  type: abstract
  parameters:
    contrast: {kind: float, low: 0, high: 1}
response:
  kind: population
  units: [u17, u18, u20, u31, u32]
  noise: gaussian
  window_s: 0.5
models: []
"""


def _outcome(i: int, value: list[float] | None = None) -> dict:
    t = 1_780_000_000.0 + i
    return {"rig_id": "rig-pop", "attempt": 1, "response": {"value": value, "alignment": {"lag_ms": 1.5 + i}},
            "timing": {"presented_at": 10.0 + i, "responded_at": 10.5 + i},
            "mapped_timing": {"presented_at": t, "responded_at": t + 0.5}}


def _population_session(store: st.TrialStore, n: int = 8, seed: int = 3) -> tuple[str, list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    pid = store.add_protocol(loaded_protocol(POPULATION_TEXT))
    sid = store.create_session(protocol_id=pid, subject_id=store.subject("m1"), seed=seed)
    expected = rng.normal(size=(n, len(UNITS)))
    expected[1, 2] = np.nan  # one unit masked on one trial
    expected[4, [0, 3]] = np.nan
    tids = []
    for i in range(n):
        tid = store.plan_trial(sid, i, {"stimulus": {"contrast": float(i) / n}, "strategy": "random", "reason": "",
                                        "score": None, "compute_ms": 1.0})
        store.mark_dispatched(tid, 1, "rig-pop")
        store.complete_trial(tid, _outcome(i, expected[i].tolist()), expected[i].copy(), None)
        tids.append(tid)
    return sid, tids, expected


def test_population_vector_is_stored_typed_with_masked_units_counted(url: str) -> None:
    with st.TrialStore(url) as store:
        sid, tids, expected = _population_session(store)
        trials = store.trials(sid)
        assert [t.status for t in trials] == ["completed"] * len(tids)
        assert all(t.value is None for t in trials)  # the vector lives in population_responses only
        assert trials[1].response == {"alignment": {"lag_ms": 2.5}}  # extras kept, the list not repeated
        ids, arr = store.population_responses(sid)
        assert ids == tids and arr.dtype == np.float64
        np.testing.assert_array_equal(arr, expected)  # bit-exact, NaN where masked
        replay = store.observations(sid)
        assert [s for s, _ in replay] == [t.stimulus for t in trials]
        np.testing.assert_array_equal(np.stack([v for _, v in replay]), expected)
        engine = st.make_engine(url)
        try:
            from sqlalchemy import text

            with engine.connect() as conn:
                rows = conn.execute(text("SELECT n_units, n_masked, dtype, length(data) FROM population_responses "
                                         "ORDER BY trial_id")).all()
        finally:
            engine.dispose()
        assert [tuple(r) for r in rows] == [(5, int(np.isnan(e).sum()), "float64", 40) for e in expected]


def test_float32_stays_float32_and_bad_vectors_are_refused(url: str) -> None:
    with st.TrialStore(url) as store:
        sid, tids, _ = _population_session(store)
        f32 = np.array([0.1, 1e-7, np.nan, 3.5, -2.25], dtype=np.float32)
        tid = store.plan_trial(sid, 8, {"stimulus": {"contrast": 0.5}})
        store.complete_trial(tid, _outcome(1), f32, None)
        _, arr = store.population_responses(sid)
        np.testing.assert_array_equal(arr[8], f32.astype(np.float64))
        # An infinite unit is not a measurement: the trial is stored invalid with the unit named.
        bad = store.plan_trial(sid, 9, {"stimulus": {"contrast": 0.6}})
        store.complete_trial(bad, _outcome(2, [1, 2, float("inf"), 4, 5]), np.array([1, 2, np.inf, 4, 5.0]), None)
        row = store.trials(sid)[9]
        assert row.status == "invalid" and row.error == "population response unit 2 is infinite"
        assert row.response["value"] == [1, 2, "Infinity", 4, 5]  # the raw answer stays visible
        assert store.population_responses(sid)[0] == tids + [tid]
        flat = store.plan_trial(sid, 10, {"stimulus": {"contrast": 0.7}})
        store.complete_trial(flat, _outcome(3), np.ones((2, 2)), None)
        assert "1-D vector" in store.trials(sid)[10].error


def test_analysis_population_responses_returns_metadata_and_array(url: str) -> None:
    with st.TrialStore(url) as store:
        sid, tids, expected = _population_session(store)
    meta, arr = analysis.population_responses(url, sid[:8])
    np.testing.assert_array_equal(arr, expected)
    assert list(meta["trial_id"]) == tids and list(meta["index"]) == list(range(len(tids)))
    assert list(meta["n_masked"]) == [0, 1, 0, 0, 2, 0, 0, 0] and set(meta["n_units"]) == {5}
    assert meta.attrs["units"] == UNITS
    assert list(meta["stimulus.contrast"]) == [i / 8 for i in range(8)]
    assert str(meta["presented_at"].dtype) == "datetime64[us, UTC]"


def test_nwb_export_puts_population_in_a_processing_module(url: str, tmp_path: Path) -> None:
    pytest.importorskip("pynwb")
    from orchestrator.export import export_session
    from orchestrator.export_population import read_population

    with st.TrialStore(url) as store:
        sid, tids, expected = _population_session(store)
    out = export_session(url, sid, "nwb", tmp_path / "pop.nwb")
    ids, arr, images = read_population(out)
    assert ids == tids and images == {}
    np.testing.assert_array_equal(arr, expected)
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(out), "r") as io_:
        nwb = io_.read()
        module = nwb.processing["population"]
        assert [str(u) for u in module["units"]["unit_id"].data[:]] == UNITS
        assert list(module["units"]["n_masked"].data[:]) == [1, 0, 1, 1, 0]
        starts = list(nwb.trials["start_time"].data[:])
        assert list(module["responses"].timestamps[:]) == starts


def test_image_stimuli_are_exported_and_returned_as_exact_pixels(tmp_path: Path) -> None:
    artifacts = pytest.importorskip("orchestrator.artifacts", reason="this build has no image artifact store")
    pytest.importorskip("pynwb")
    from orchestrator.export import export_session
    from orchestrator.export_population import read_population

    url = f"sqlite:///{tmp_path / 'img.db'}"
    st.upgrade(url)
    images = artifacts.ArtifactStore.for_database(url)
    rng = np.random.default_rng(0)
    shown = [rng.integers(0, 256, size=(8, 6), dtype=np.uint8), rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)]
    shas = [images.put(p) for p in shown]
    with st.TrialStore(url) as store:
        pid = store.add_protocol(loaded_protocol(POPULATION_TEXT))
        sid = store.create_session(protocol_id=pid, subject_id=None, seed=1)
        for i, sha in enumerate([shas[0], shas[1], shas[0]]):
            tid = store.plan_trial(sid, i, {"stimulus": {"image": sha}})
            store.complete_trial(tid, _outcome(i), np.arange(5, dtype=np.float64) + i, None)
    got = analysis.stimulus_images(url, sid)
    assert list(got) == shas
    for sha, pixels in zip(shas, shown):
        np.testing.assert_array_equal(got[sha], pixels)
        assert got[sha].dtype == np.uint8
    _, _, exported = read_population(export_session(url, sid, "nwb", tmp_path / "img.nwb"))
    assert set(exported) == set(shas)
    for sha, pixels in zip(shas, shown):
        np.testing.assert_array_equal(exported[sha], pixels)
