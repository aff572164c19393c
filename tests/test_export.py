"""`cloop export`: CSV, Parquet and NWB files read back equal to the database; bad input exits 2."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from orchestrator import analysis, export
from orchestrator import store as st
from orchestrator.cli_data import register
from store_factory import Built, build_session, loaded_protocol


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Built]:
    url = f"sqlite:///{tmp_path_factory.mktemp('ex') / 'cloop.db'}"
    st.upgrade(url)
    with st.TrialStore(url) as store:
        built = build_session(store, n=10)
    return url, built


def _rows(url: str, sid: str) -> list[dict]:
    with st.TrialStore(url) as store:
        return store.trials(sid)


def _check_equals_db(df: pd.DataFrame, rows: list[dict]) -> None:
    """Field by field against the store's own rows (not against another export)."""
    assert len(df) == len(rows)
    for rec, row in zip(df.to_dict("records"), rows):
        assert rec["index"] == row["index"] and rec["trial_id"] == row["id"]
        assert rec["status"] == row["status"] and rec["attempts"] == row["attempts"]
        assert rec["stimulus.lag"] == row["stimulus"]["lag"]
        assert (math.isnan(rec["value"]) and row["value"] is None) or rec["value"] == row["value"]
        resp = row["response"] or {}
        for field in ("value", "rt_s"):
            got, want = rec[f"response.{field}"], resp.get(field)
            if want is None or want == "NaN":
                assert math.isnan(got)
            else:
                assert got == want
        assert rec["error"] == row["error"] and rec["rig_id"] == row["rig_id"]
        for k in export.TIME_COLUMNS:
            got = None if pd.isna(rec[k]) else rec[k].to_pydatetime()
            assert got == row[k], (k, got, row[k])


@pytest.mark.parametrize("fmt", ["csv", "parquet", "nwb"])
def test_round_trip_equals_database(db: tuple[str, Built], tmp_path: Path, fmt: str) -> None:
    url, built = db
    out = export.export_session(url, built.session_id[:8], fmt, tmp_path / f"s.{fmt}")
    back = export.read_export(out)
    _check_equals_db(back, _rows(url, built.session_id))
    pd.testing.assert_frame_equal(back, analysis.normalize_frame(analysis.trials(url, built.session_id)))
    assert [p.name for p in tmp_path.iterdir()] == [f"s.{fmt}"]  # no temporary files left behind


def test_csv_is_what_cloop_trials_prints(db: tuple[str, Built], tmp_path: Path) -> None:
    url, built = db
    out = export.export_session(url, built.session_id, "csv", tmp_path / "t.csv")
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["trials", built.session_id, "--format", "csv", "--db", url])
    assert res.exit_code == 0 and out.read_text() == res.stdout


def test_parquet_carries_session_metadata(db: tuple[str, Built], tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    url, built = db
    out = export.export_session(url, built.session_id, "parquet", tmp_path / "t.parquet")
    meta = json.loads(pq.read_schema(out).metadata[b"cloop.session"])
    assert meta["id"] == built.session_id and meta["subject"] == "subj-01" and meta["seed"] == 7
    assert meta["protocol_text"] == loaded_protocol().text and meta["models"] == ["power", "exponential"]


def test_nwb_content_and_validators(db: tuple[str, Built], tmp_path: Path) -> None:
    pynwb = pytest.importorskip("pynwb")
    url, built = db
    out = export.export_session(url, built.session_id, "nwb", tmp_path / "t.nwb", species="Homo sapiens", sex="F",
                                age="P25Y", experimenter="Doe, Jane", institution="Test Lab")
    assert pynwb.validate(path=str(out)) == []
    with pynwb.NWBHDF5IO(str(out), "r") as io_:
        nwb = io_.read()
        assert nwb.identifier == built.session_id and nwb.session_id == built.session_id
        assert nwb.protocol == loaded_protocol().text
        assert nwb.subject.subject_id == "subj-01" and nwb.subject.species == "Homo sapiens"
        with st.TrialStore(url) as store:
            info = store.session(built.session_id)
        assert nwb.session_start_time == info["started_at"]
        trials = nwb.trials.to_dataframe()
        assert len(trials) == 10 and (trials["stop_time"] >= trials["start_time"]).all()
        rows = _rows(url, built.session_id)
        onset = [(r["presented_at"] - info["started_at"]).total_seconds() for r in rows if r["presented_at"]]
        assert list(trials["start_time"][trials["presented_time"].notna()]) == pytest.approx(onset, abs=1e-9)
        states = nwb.processing["misc"]["model_states"].to_dataframe()
        assert list(states["p_power"]) == pytest.approx([p["power"] for p in built.probabilities])
        assert set(states["strategy"]) == {"random", "mutual_information"}
        assert len(nwb.processing["misc"]["parameter_summaries"].to_dataframe()) == 40
    nwbinspector = pytest.importorskip("nwbinspector")
    messages = list(nwbinspector.inspect_nwbfile(nwbfile_path=str(out)))
    serious = [m for m in messages if m.importance.name in ("CRITICAL", "BEST_PRACTICE_VIOLATION", "ERROR",
                                                             "PYNWB_VALIDATION")]
    assert serious == [], [m.message for m in serious]


def test_nwb_without_subject_details_only_misses_those(db: tuple[str, Built], tmp_path: Path) -> None:
    nwbinspector = pytest.importorskip("nwbinspector")
    url, built = db
    out = export.export_session(url, built.session_id, "nwb", tmp_path / "bare.nwb")
    serious = {m.check_function_name for m in nwbinspector.inspect_nwbfile(nwbfile_path=str(out))
               if m.importance.name in ("CRITICAL", "BEST_PRACTICE_VIOLATION", "ERROR", "PYNWB_VALIDATION")}
    assert serious <= {"check_subject_age", "check_subject_species_exists"}


def test_failed_write_leaves_old_file_untouched(db: tuple[str, Built], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url, built = db
    target = tmp_path / "keep.csv"
    target.write_text("old\n")

    def broken(data: object, path: Path) -> None:
        Path(path).write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_csv", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_session(url, built.session_id, "csv", target)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["keep.csv"]


def test_cli_export_and_bad_input(db: tuple[str, Built], tmp_path: Path) -> None:
    url, built = db
    with st.TrialStore(url) as store:
        empty = store.create_session(protocol_id=store.add_protocol(loaded_protocol()), subject_id=None, seed=3)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    out = tmp_path / "x.parquet"
    res = runner.invoke(app, ["export", built.session_id, "--format", "parquet", "-o", str(out), "--db", url])
    assert res.exit_code == 0 and res.stdout.strip() == f"wrote {out}" and out.stat().st_size > 0
    cases = {
        ("export", "nope", "--format", "csv", "-o", str(tmp_path / "a.csv")): "error: no session matches 'nope'",
        ("export", empty, "--format", "nwb", "-o", str(tmp_path / "b.nwb")):
            f"error: session {empty} has no trials; nothing to export",
        ("export", built.session_id, "--format", "csv", "-o", str(tmp_path / "no" / "c.csv")):
            "error: cannot write",
        ("export", built.session_id, "--format", "csv", "-o", str(tmp_path)): "error: cannot write",
        ("export", built.session_id, "--format", "csv", "--species", "Mus musculus", "-o", str(tmp_path / "d.csv")):
            "error: --species/--sex/--age/--experimenter/--institution only apply to --format nwb",
    }
    for args, message in cases.items():
        res = runner.invoke(app, [*args, "--db", url])
        assert res.exit_code == 2, (args, res.output)
        assert res.stderr.startswith(message) and res.stderr.count("\n") == 1, res.stderr
    assert runner.invoke(app, ["export", "latest", "--format", "xls", "-o", "x", "--db", url]).exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.parquet"]


@pytest.mark.postgres
def test_round_trip_from_postgres(tmp_path: Path) -> None:
    from store_factory import postgres_database

    with postgres_database() as url:
        st.upgrade(url)
        with st.TrialStore(url) as store:
            built = build_session(store, n=8)
        for fmt in ("csv", "parquet", "nwb"):
            back = export.read_export(export.export_session(url, built.session_id, fmt, tmp_path / f"pg.{fmt}"))
            _check_equals_db(back, _rows(url, built.session_id))


def test_cli_export_takes_the_format_from_the_file_name(db: tuple[str, Built], tmp_path: Path) -> None:
    url, built = db
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    for name in ("x.parquet", "x.csv", "x.nwb"):
        res = runner.invoke(app, ["export", built.session_id, "-o", str(tmp_path / name), "--db", url])
        assert res.exit_code == 0, res.output
        back = export.read_export(tmp_path / name)  # each file is really in the format its suffix names
        assert list(back["trial_id"]) == built.trial_ids
    assert (tmp_path / "x.parquet").read_bytes()[:4] == b"PAR1"
    assert (tmp_path / "x.nwb").read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    res = runner.invoke(app, ["export", built.session_id, "-o", str(tmp_path / "x.xlsx"), "--db", url])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert res.stderr.startswith("error: cannot tell the export format from") and "--format" in res.stderr
    assert not (tmp_path / "x.xlsx").exists()


@pytest.mark.parametrize(("module", "fmt", "extra"), [("pyarrow", "parquet", "analysis"), ("pynwb", "nwb", "analysis")])
def test_missing_optional_package_names_the_extra(db: tuple[str, Built], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  module: str, fmt: str, extra: str) -> None:
    url, built = db
    monkeypatch.setitem(__import__("sys").modules, module, None)  # as if the package were not installed
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["export", built.session_id, "-o", str(tmp_path / f"x.{fmt}"), "--db", url])
    assert res.exit_code == 2, res.output
    assert res.stderr == f"error: {'Parquet' if fmt == 'parquet' else 'NWB'} export needs the optional package " \
                         f"{module}: pip install 'cloop[{extra}]'\n"
    assert list(tmp_path.iterdir()) == []


def test_exports_respect_the_umask(db: tuple[str, Built], tmp_path: Path) -> None:
    import os
    import stat

    url, built = db
    old = os.umask(0o027)
    try:
        path = export.export_session(url, built.session_id, "csv", tmp_path / "private.csv")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    old = os.umask(0o002)
    try:
        path = export.export_session(url, built.session_id, "csv", tmp_path / "shared.csv")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
