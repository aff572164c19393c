"""The analysts' DataFrame API, read from a real SQLite database written through TrialStore."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from orchestrator import analysis
from orchestrator import store as st
from store_factory import Built, build_session


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Built]:
    url = f"sqlite:///{tmp_path_factory.mktemp('an') / 'cloop.db'}"
    st.upgrade(url)
    with st.TrialStore(url) as store:
        built = build_session(store, n=12)
    return url, built


def test_trials_frame_has_one_column_per_parameter_and_field(db: tuple[str, Built]) -> None:
    url, built = db
    df = analysis.trials(url, session="latest")
    assert list(df["index"]) == list(range(12))
    assert list(df.columns[:5]) == ["index", "trial_id", "status", "attempts", "stimulus.lag"]
    assert {"value", "response.value", "response.rt_s", "error", "rig_id", "presented_at"} <= set(df.columns)
    assert df["stimulus.lag"].dtype == "int64" and list(df["stimulus.lag"]) == [s["lag"] for s in built.stimuli]
    assert str(df["presented_at"].dtype) == "datetime64[us, UTC]"
    values = [None if math.isnan(v) else v for v in df["value"]]
    assert values == built.values
    assert list(df["status"]) == ["completed"] * 5 + ["invalid"] + ["completed"] * 5 + ["failed"]
    assert df.loc[2, "attempts"] == 2 and df.loc[11, "attempts"] == 3
    assert math.isnan(df.loc[5, "response.value"]) and df.loc[5, "error"] == "response value is NaN"
    assert pd.isna(df.loc[11, "presented_at"]) and df.loc[11, "error"] == "no response after 3 attempts"
    # timestamps are exactly the store's (microseconds, UTC)
    with st.TrialStore(url) as store:
        rows = store.trials(built.session_id)
    assert [None if pd.isna(t) else t.to_pydatetime() for t in df["responded_at"]] == [r["responded_at"] for r in rows]


def test_probabilities_decisions_parameters(db: tuple[str, Built]) -> None:
    url, built = db
    data = analysis.load_session(url, built.session_id[:10])
    assert data.models == ["power", "exponential"]
    probs = analysis.model_probabilities(url, built.session_id)
    assert list(probs.columns) == ["index", "status", "power", "exponential"]
    assert probs[["power", "exponential"]].to_dict("records") == built.probabilities
    dec = analysis.decisions(url)
    assert list(dec["strategy"][:3]) == ["random"] * 3 and set(dec["strategy"][3:]) == {"mutual_information"}
    assert list(dec["stimulus.lag"]) == [s["lag"] for s in built.stimuli]
    assert dec["compute_ms"].between(4, 60).all() and dec["score"][:3].isna().all()
    par = analysis.parameter_summaries(url)
    assert len(par) == 12 * 4 and set(par["parameter"]) == {"a", "b"}
    last = par[(par["index"] == 11) & (par["model"] == "power") & (par["parameter"] == "b")].iloc[0]
    assert last["mean"] == 0.4 and last["sd"] == pytest.approx(0.2 / math.sqrt(12))
    assert list(data.attempts[data.attempts["index"] == 2]["status"]) == ["failed", "completed"]
    assert len(data.evidence) == 24


def test_sessions_frame_and_unknown_session(db: tuple[str, Built]) -> None:
    url, built = db
    s = analysis.sessions(url)
    assert list(s["id"]) == [built.session_id] and s.loc[0, "n_invalid"] == 1 and s.loc[0, "n_failed"] == 1
    with pytest.raises(st.SessionNotFound, match="no session matches 'feedbeef'"):
        analysis.trials(url, "feedbeef")


def test_empty_session_gives_empty_frames(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    st.upgrade(url)
    with st.TrialStore(url) as store:
        from store_factory import loaded_protocol

        store.create_session(protocol_id=store.add_protocol(loaded_protocol()), subject_id=None, seed=1)
    data = analysis.load_session(url)
    assert data.trials.empty and data.probabilities.empty and data.models == []
    assert "presented_at" in data.trials.columns
