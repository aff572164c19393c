"""`cloop report`: every plot is present, a real non-blank PNG, and bad input exits 2."""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from orchestrator import report
from orchestrator import store as st
from orchestrator.cli_data import register
from store_factory import Built, build_session, loaded_protocol

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Built]:
    url = f"sqlite:///{tmp_path_factory.mktemp('rep') / 'cloop.db'}"
    st.upgrade(url)
    with st.TrialStore(url) as store:
        built = build_session(store, n=16)
    return url, built


def _images(page: str) -> dict[str, bytes]:
    found = re.findall(r'<figure id="plot-([a-z_]+)"><img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"',
                       page)
    return {k: base64.b64decode(v) for k, v in found}


def _non_blank(png: bytes) -> bool:
    import matplotlib.image as mpimg

    img = mpimg.imread(io.BytesIO(png), format="png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    # A drawn plot has many distinct colours and is not one flat colour.
    return float(np.std(img[..., :3])) > 0.05 and len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 50


def test_report_has_every_plot_and_summary(db: tuple[str, Built], tmp_path: Path) -> None:
    url, built = db
    out = report.write_report(url, built.session_id[:6], tmp_path / "r.html", png_dir=tmp_path)
    page = out.read_text()
    images = _images(page)
    assert list(images) == list(report.PLOTS)
    for key, png in images.items():
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and _non_blank(png), key
        assert (tmp_path / f"{key}.png").read_bytes() == png
    assert "http://" not in page and "https://" not in page  # self-contained
    summary = re.search(r'<table class="summary" id="summary">(.*?)</table>', page, re.S).group(1)
    for label in ("session", "protocol", "subject", "final model probabilities", "power parameters",
                  "decision time", "response time"):
        assert f"<td>{label}</td>" in summary
    assert built.session_id in summary and "completed 14" in summary and "invalid 1" in summary
    assert "name: retention" in page  # protocol text shown


def test_predictions_use_the_fitted_models(db: tuple[str, Built]) -> None:
    from orchestrator.analysis import load_session

    url, built = db
    data = load_session(url, built.session_id)
    curves, notes, _ = report._predictions(data, report._protocol(data), "stimulus.lag")
    assert notes == {} and set(curves) == {"power", "exponential"}
    xs, ys = curves["power"]
    # power model a*(t+1)^-b at the stored posterior means a=0.9, b=0.4
    assert ys[0] == pytest.approx(0.9) and ys[-1] == pytest.approx(0.9 * 101 ** -0.4, rel=1e-6)
    xs, ys = curves["exponential"]
    assert ys[-1] == pytest.approx(0.8 * np.exp(-0.03 * 100), rel=1e-6)


def test_report_degrades_when_models_cannot_be_rebuilt(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    st.upgrade(url)
    text = loaded_protocol().text.replace("retention_exponential", "no_such_model")
    with st.TrialStore(url) as store:
        built = build_session(store, n=6, problems=False, protocol_text=text)
    from orchestrator.analysis import load_session

    data = load_session(url, built.session_id)
    curves, notes, _ = report._predictions(data, report._protocol(data), "stimulus.lag")
    assert curves == {} and set(notes) == {"power", "exponential"}
    out = report.write_report(url, built.session_id, tmp_path / "r.html")
    images = _images(out.read_text())
    assert list(images) == list(report.PLOTS) and all(_non_blank(p) for p in images.values())


def test_cli_report_and_bad_input(db: tuple[str, Built], tmp_path: Path) -> None:
    url, built = db
    with st.TrialStore(url) as store:
        empty = store.create_session(protocol_id=store.add_protocol(loaded_protocol()), subject_id=None, seed=1)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["report", built.session_id, "-o", str(tmp_path / "r.html"), "--db", url])
    assert res.exit_code == 0 and res.stdout.strip() == f"wrote {tmp_path / 'r.html'}"
    for args, message in {
        ("report", "0000", "-o", str(tmp_path / "a.html")): "error: no session matches '0000'",
        ("report", empty, "-o", str(tmp_path / "b.html")): f"error: session {empty} has no trials",
        ("report", built.session_id, "-o", str(tmp_path / "nodir" / "c.html")): "error: cannot write",
    }.items():
        res = runner.invoke(app, [*args, "--db", url])
        assert res.exit_code == 2 and res.stderr.startswith(message) and res.stderr.count("\n") == 1, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


@pytest.mark.slow  # ~25-50 s: a real `cloop demo` (orchestrator + rig worker process over ZMQ)
def test_real_demo_session_to_dataframe_nwb_and_report(cloop_cmd: list[str], run_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    """The README path on a real engine session: `cloop demo`, then DataFrame, NWB and report."""
    import subprocess

    import pandas as pd

    from orchestrator import analysis, export

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    proc = subprocess.run([*cloop_cmd, "demo", "--no-prefect", "--max-trials", "4", "--db", url], env=run_env,
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = analysis.trials(url, "latest")
    assert len(df) == 4 and set(df["status"]) == {"completed"}
    assert df["presented_at"].notna().all() and (df["responded_at"] >= df["presented_at"]).all()
    assert (df["value"] == df["response.value"]).all()
    nwb = export.export_session(url, "latest", "nwb", tmp_path / "demo.nwb")
    pd.testing.assert_frame_equal(export.read_export(nwb), analysis.normalize_frame(df))
    page = report.write_report(url, "latest", tmp_path / "demo.html").read_text()
    images = _images(page)
    assert list(images) == list(report.PLOTS) and all(_non_blank(p) for p in images.values())
    data = analysis.load_session(url, "latest")
    curves, notes, _ = report._predictions(data, report._protocol(data), "stimulus.lag")
    assert set(curves) == {"power", "exponential"} and notes == {}


def test_two_parameter_poisson_session_with_gaussian_process(tmp_path: Path) -> None:
    """orientation x contrast, three models incl. a GP: every model gets a curve, every plot renders."""
    from store_factory import REPO

    from orchestrator.analysis import load_session

    text = (REPO / "protocols" / "orientation_tuning.yaml").read_text()
    url = f"sqlite:///{tmp_path / 'o.db'}"
    st.upgrade(url)
    rng = np.random.default_rng(5)
    with st.TrialStore(url) as store:
        sid = store.create_session(protocol_id=store.add_protocol(loaded_protocol(text)), subject_id=None, seed=5)
        params = {"von_mises": {"b": 2.0, "g": 20.0, "k": 1.5, "pref": 90.0, "c50": 0.2, "n": 2.0},
                  "gaussian": {"b": 2.0, "g": 20.0, "w": 20.0, "pref": 90.0, "c0": 0.05},
                  "gp": {"lengthscale": 0.3, "outputscale": 1.0, "mean": 1.0}}
        for i in range(12):
            stim = {"orientation": float(rng.uniform(0, 180)), "contrast": float(rng.uniform(0.05, 1.0))}
            tid = store.plan_trial(sid, i, {"stimulus": stim, "strategy": "mutual_information", "reason": "",
                                            "score": 0.1, "compute_ms": 30.0})
            store.mark_dispatched(tid, 1, "r")
            count = int(rng.poisson(3 + 15 * np.exp(-((stim["orientation"] - 90) / 25) ** 2)))
            store.complete_trial(tid, {"rig_id": "r", "response": {"value": count}, "timing": {}}, float(count))
            store.record_model_state(tid, {"von_mises": 0.5, "gaussian": 0.3, "gp": 0.2},
                                     {m: {"params": {p: {"mean": v, "sd": 0.1} for p, v in ps.items()}}
                                      for m, ps in params.items()})
    data = load_session(url, sid)
    curves, notes, held = report._predictions(data, report._protocol(data), "stimulus.orientation")
    assert notes == {} and set(curves) == {"von_mises", "gaussian", "gp"}
    completed = [r["stimulus"]["contrast"] for r in data.rows]
    assert set(held) == {"contrast"} and held["contrast"] == pytest.approx(float(np.median(completed)))
    for name, (xs, ys) in curves.items():
        assert xs[0] == 0 and xs[-1] == 180 and np.isfinite(ys).all() and (ys > 0).all(), name
    images = _images(report.write_report(url, sid, tmp_path / "o.html").read_text())
    assert list(images) == list(report.PLOTS) and all(_non_blank(p) for p in images.values())


def test_png_dir_is_created_when_missing_and_refused_when_a_file(db: tuple[str, Built], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url, built = db
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    plots = tmp_path / "new" / "plots"
    res = runner.invoke(app, ["report", built.session_id, "-o", str(tmp_path / "r.html"), "--png-dir", str(plots),
                              "--db", url])
    assert res.exit_code == 0, res.output
    assert plots.is_dir() and sorted(p.suffix for p in plots.iterdir()) == [".png"] * len(list(plots.iterdir()))
    assert len(list(plots.iterdir())) >= 3
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    res = runner.invoke(app, ["report", built.session_id, "-o", str(tmp_path / "s.html"), "--png-dir", str(a_file),
                              "--db", url])
    assert res.exit_code == 2 and res.stderr == f"error: cannot write plots to {a_file}: it is a file, not a directory\n"
    assert not (tmp_path / "s.html").exists()
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    res = runner.invoke(app, ["report", built.session_id, "-o", str(tmp_path / "t.html"), "--db", url])
    assert res.exit_code == 2
    assert res.stderr == "error: the HTML report needs the optional package matplotlib: pip install 'cloop[analysis]'\n"
    assert not (tmp_path / "t.html").exists()
