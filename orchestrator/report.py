"""`cloop report`: a self-contained HTML page (PNG plots embedded as data URIs) about one session.

Plots: model probabilities over trials, the stimuli chosen in stimulus space coloured by trial,
each model's fitted prediction (posterior-mean parameters) against the observed responses (for a
population session: the images shown and the trials x units responses, orchestrator.report_population),
design decision times, and trial timing; plus a summary table. A plot whose inputs are missing
is still drawn, with a note saying why it is empty-handed, so the page layout never changes.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from orchestrator.analysis import SessionData, image_refs, load_session
from orchestrator.export import ExportError, _check_writable, atomic_path, need
from orchestrator.store import iso

PLOTS = ("probabilities", "stimuli", "predictions", "decision_time", "timing")


@dataclass
class Plot:
    key: str
    title: str
    png: bytes
    caption: str


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.35", wrap=True)


def _protocol(data: SessionData) -> Any | None:
    try:
        from orchestrator.protocol import parse_protocol_text

        return parse_protocol_text(data.protocol_text, source="<stored protocol>").protocol
    except Exception:
        return None


# --------------------------------------------------------------------------------------------
# plots


def plot_probabilities(data: SessionData, protocol: Any) -> Plot:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    p = data.probabilities
    if p.empty or not data.models:
        _note(ax, "no model states recorded")
    else:
        for m in data.models:
            ax.plot(p["index"], p[m], marker="o", ms=3, lw=1.5, label=m)
        threshold = getattr(getattr(protocol, "stopping", None), "model_probability", None)
        if threshold:
            ax.axhline(threshold, color="0.5", ls="--", lw=1, label=f"stop at {threshold:g}")
        ax.legend(loc="best", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("trial")
    ax.set_ylabel("posterior model probability")
    ax.grid(alpha=0.3)
    return Plot("probabilities", "Model probabilities over trials", _png(fig),
                "Posterior probability of each candidate model after each trial.")


def _stim_columns(data: SessionData) -> list[str]:
    return [c for c in data.trials.columns if c.startswith("stimulus.")]


def _numeric(series: pd.Series) -> tuple[np.ndarray, list[str] | None]:
    """Values as floats; categorical values become codes (returned with their labels)."""
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy(dtype=float), None
    labels = sorted({str(v) for v in series.dropna()})
    return np.array([labels.index(str(v)) if v is not None and v == v else np.nan for v in series], float), labels


def plot_stimuli(data: SessionData, protocol: Any) -> Plot:
    plt = _plt()
    cols = _stim_columns(data)
    t = data.trials
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if t.empty or not cols:
        _note(ax, "no stimuli recorded")
    else:
        idx = t["index"].to_numpy()
        x, xl = _numeric(t[cols[0]])
        if len(cols) == 1:
            y, yl, ylabel = idx.astype(float), None, "trial"
        else:
            y, yl = _numeric(t[cols[1]])
            ylabel = cols[1].split(".", 1)[1]
        sc = ax.scatter(x, y, c=idx, cmap="viridis", s=28, edgecolors="k", linewidths=0.3)
        bad = t["status"].to_numpy() != "completed"
        if bad.any():
            ax.scatter(x[bad], y[bad], marker="x", c="red", s=40, label="not completed")
            ax.legend(loc="best", fontsize=8)
        fig.colorbar(sc, ax=ax, label="trial")
        ax.set_xlabel(_label(cols[0], protocol))
        ax.set_ylabel(ylabel if len(cols) == 1 else _label(cols[1], protocol))
        _log_axis(ax, cols[0], protocol, "x")
        if len(cols) > 1:
            _log_axis(ax, cols[1], protocol, "y")
        if xl:
            ax.set_xticks(range(len(xl)), xl)
        if yl:
            ax.set_yticks(range(len(yl)), yl)
        if len(cols) > 2:
            ax.set_title(f"first two of {len(cols)} stimulus parameters", fontsize=9)
        ax.grid(alpha=0.3)
    return Plot("stimuli", "Stimuli chosen", _png(fig),
                "Each chosen stimulus in stimulus space, coloured by trial index (red x: not completed).")


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _log_axis(ax: Any, col: str, protocol: Any, axis: str) -> None:
    """Log scale for parameters the protocol declares ``log: true``."""
    try:
        is_log = bool(protocol.stimulus.parameters[col.split(".", 1)[1]].log)
    except Exception:
        is_log = False
    if is_log:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _label(col: str, protocol: Any) -> str:
    name = col.split(".", 1)[1]
    try:
        units = protocol.stimulus.parameters[name].units
    except Exception:
        units = None
    return f"{name} ({units})" if units else name


def _response_scale(protocol: Any) -> tuple[float, str]:
    resp = getattr(protocol, "response", None)
    kind = getattr(resp, "kind", None)
    if kind == "binomial" and getattr(resp, "n", None):
        return float(resp.n), f"proportion (k / {resp.n})"
    if kind == "bernoulli":
        return 1.0, "response (0/1)"
    return 1.0, "response"


def _final_params(data: SessionData) -> dict[str, dict[str, float]]:
    """Posterior means per model from the last trial that has summaries."""
    p = data.parameters
    if p.empty:
        return {}
    last = p[p["index"] == p["index"].max()]
    out: dict[str, dict[str, float]] = {}
    for r in last.itertuples():
        out.setdefault(str(r.model), {})[str(r.parameter)] = float(r.mean)
    return out


Curves = dict[str, tuple[np.ndarray, np.ndarray]]


def _predictions(data: SessionData, protocol: Any, xcol: str) -> tuple[Curves, dict[str, str], dict[str, Any]]:
    """Model mean response over a grid of ``xcol`` at posterior-mean parameters.

    Returns (curves, notes for models without a curve, values the other stimulus parameters are held at).
    """
    curves: Curves = {}
    notes: dict[str, str] = {}
    if protocol is None:
        return curves, {m: "stored protocol could not be parsed" for m in data.models}, {}
    try:
        import torch

        from orchestrator.models import build_candidates
        from orchestrator.models.space import StimulusEncoding

        cands = build_candidates(protocol)
        enc = StimulusEncoding(protocol)
    except Exception as exc:  # models package unavailable or protocol no longer builds
        return curves, {m: f"models cannot be rebuilt: {exc}" for m in data.models}, {}
    params = _final_params(data)
    name = xcol.split(".", 1)[1]
    dim = enc.dims[enc.index[name]]
    if dim.kind == "categorical":
        grid_vals: list[Any] = list(dim.allowed)
        xs = np.arange(len(grid_vals), dtype=float)
    elif dim.kind == "integer":
        xs = np.unique(np.linspace(dim.lo, dim.hi, 201).round())
        grid_vals = [int(v) for v in xs]
    else:
        xs = np.geomspace(dim.lo, dim.hi, 201) if dim.log and dim.lo > 0 else np.linspace(dim.lo, dim.hi, 201)
        grid_vals = [float(v) for v in xs]
    completed = data.trials[data.trials["status"] == "completed"]
    base: dict[str, Any] = {}
    for other in enc.dims:
        col = f"stimulus.{other.name}"
        vals = completed[col] if col in completed and not completed.empty else data.trials.get(col)
        if vals is None or len(vals) == 0:
            base[other.name] = other.allowed[0] if other.kind == "categorical" else other.lo
        elif other.kind == "categorical":
            base[other.name] = vals.mode().iloc[0]
        else:
            med = float(np.nanmedian(vals.to_numpy(dtype=float)))
            base[other.name] = int(round(med)) if other.kind == "integer" else med
    X = torch.stack([enc.stimulus_to_raw({**base, name: v}) for v in grid_vals])
    for cand in cands:
        if cand.is_gp:
            try:
                curves[cand.name] = (xs, _gp_curve(data, cand, enc, X))
            except Exception as exc:
                notes[cand.name] = f"Gaussian process could not be refit: {exc}"
            continue
        theta_means = params.get(cand.name, {})
        missing = [p for p in cand.free_params if p not in theta_means]
        if missing:
            notes[cand.name] = f"no posterior mean stored for {', '.join(missing)}"
            continue
        try:
            theta = {p: torch.tensor([theta_means[p]], dtype=X.dtype) for p in cand.free_params}
            mean = cand.mean(X, theta)[0].detach().cpu().numpy().astype(float)
            curves[cand.name] = (xs, mean)
        except Exception as exc:
            notes[cand.name] = f"prediction failed: {exc}"
    return curves, notes, {k: v for k, v in base.items() if k != name}


MAX_GP_REFIT = 500


def _gp_curve(data: SessionData, cand: Any, enc: Any, X: Any) -> np.ndarray:
    """Refit the GP on the completed observations (its summaries cannot rebuild it); link(posterior mean)."""
    from orchestrator.models.gp import GPPosterior

    obs = [(r.stimulus, float(r.value)) for r in data.rows if r.status == "completed" and r.value is not None]
    if len(obs) > MAX_GP_REFIT:
        raise ValueError(f"{len(obs)} observations (refit limited to {MAX_GP_REFIT})")
    post = GPPosterior(cand, enc, int(data.info.seed or 0))
    for stimulus, value in obs:
        post.update(enc.stimulus_to_raw(stimulus), value)
    mu, _ = post.latent_predictive(X)
    return post.link(mu).detach().cpu().numpy().astype(float)


def plot_predictions(data: SessionData, protocol: Any) -> Plot:
    plt = _plt()
    cols = _stim_columns(data)
    models = data.models or ["(no models)"]
    ncols = min(len(models), 3)
    nrows = math.ceil(len(models) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False, sharey=True)
    caption = "Observed responses against the first stimulus parameter, with each model's mean response at its " \
              "posterior-mean parameters after the last trial (other parameters at their median; a Gaussian " \
              "process is refit on the completed trials and shown as link(posterior mean))."
    t = data.trials
    done = t[t["status"] == "completed"]
    scale, ylabel = _response_scale(protocol)
    if not cols or done.empty:
        for ax in axes.flat:
            _note(ax, "no completed trials")
        return Plot("predictions", "Model predictions vs observed responses", _png(fig), caption)
    xcol = cols[0]
    x_obs, labels = _numeric(done[xcol])
    y_obs = done["value"].to_numpy(dtype=float) / scale
    try:
        curves, notes, held = _predictions(data, protocol, xcol)
    except Exception as exc:  # never let a model problem cost the whole report
        curves, notes, held = {}, {m: f"prediction failed: {exc}" for m in data.models}, {}
    if held:
        fig.suptitle("curves at " + ", ".join(f"{k}={_fmt(v)}" for k, v in held.items()), fontsize=9, y=1.0)
    probs = data.probabilities
    for ax, m in zip(axes.flat, models):
        ax.scatter(x_obs, y_obs, c=done["index"], cmap="viridis", s=22, edgecolors="k", linewidths=0.3,
                   label="observed")
        _log_axis(ax, xcol, protocol, "x")
        if m in curves:
            xs, ys = curves[m]
            ax.plot(xs, ys, color="C3", lw=2, label="model mean")
        elif m in notes:
            ax.text(0.02, 0.02, notes[m], transform=ax.transAxes, fontsize=7, color="0.3", va="bottom", wrap=True)
        pm = f" (P={probs[m].iloc[-1]:.3f})" if m in probs and not probs.empty else ""
        ax.set_title(f"{m}{pm}", fontsize=10)
        ax.set_xlabel(_label(xcol, protocol))
        if labels:
            ax.set_xticks(range(len(labels)), labels)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    return Plot("predictions", "Model predictions vs observed responses", _png(fig), caption)


def plot_decision_time(data: SessionData, protocol: Any) -> Plot:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    d = data.decisions
    ms = d["compute_ms"].dropna().to_numpy(dtype=float) if not d.empty else np.array([])
    if ms.size == 0:
        _note(ax, "no decision times recorded")
    else:
        for strategy, grp in d.dropna(subset=["compute_ms"]).groupby("strategy"):
            ax.hist(grp["compute_ms"], bins=min(30, max(5, len(grp) // 2)), alpha=0.7, label=str(strategy))
        ax.axvline(float(np.median(ms)), color="k", ls="--", lw=1, label=f"median {np.median(ms):.1f} ms")
        ax.legend(fontsize=8)
    ax.set_xlabel("design computation time (ms)")
    ax.set_ylabel("trials")
    return Plot("decision_time", "Design decision time", _png(fig),
                "Time the design strategy spent choosing each stimulus, by strategy.")


def plot_timing(data: SessionData, protocol: Any) -> Plot:
    plt = _plt()
    t = data.trials
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    series = {
        "dispatch → onset (ms)": (t["presented_at"] - t["dispatched_at"]).dt.total_seconds() * 1000,
        "onset → response (s)": (t["responded_at"] - t["presented_at"]).dt.total_seconds(),
        "inter-trial interval (s)": t.sort_values("index")["dispatched_at"].diff().dt.total_seconds(),
    }
    for ax, (label, s) in zip(axes, series.items()):
        v = s.dropna().to_numpy(dtype=float)
        if v.size == 0:
            _note(ax, "no timestamps")
        else:
            ax.hist(v, bins=min(30, max(5, v.size // 2)), color="C0", alpha=0.8)
            ax.axvline(float(np.median(v)), color="k", ls="--", lw=1)
            ax.set_title(f"median {np.median(v):.3g}", fontsize=9)
        ax.set_xlabel(label)
    axes[0].set_ylabel("trials")
    return Plot("timing", "Trial timing", _png(fig),
                "Latency from dispatch to stimulus onset (orchestrator clock), response time, and interval "
                "between successive dispatches.")


PLOT_FUNCS: dict[str, Callable[[SessionData, Any], Plot]] = {
    "probabilities": plot_probabilities,
    "stimuli": plot_stimuli,
    "predictions": plot_predictions,
    "decision_time": plot_decision_time,
    "timing": plot_timing,
}


# --------------------------------------------------------------------------------------------
# page


def summary_rows(data: SessionData) -> list[tuple[str, str]]:
    info = data.info
    counts = info.get("counts", {})
    rows: list[tuple[str, str]] = [
        ("session", data.session_id),
        ("protocol", f"{info.get('protocol')} {info.get('protocol_version')} (sha256 {str(info.get('protocol_sha256'))[:12]})"),
        ("subject", str(info.get("subject"))),
        ("status", str(info.get("status"))),
        ("seed", str(info.get("seed"))),
        ("design", str(info.get("design"))),
        ("started (UTC)", str(iso(info.get("started_at")))),
        ("stopped (UTC)", str(iso(info.get("stopped_at")))),
        ("code version", str(info.get("code_version"))),
        ("trials", ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "0"),
    ]
    if info.get("started_at") and info.get("stopped_at"):
        rows.append(("duration", f"{(info['stopped_at'] - info['started_at']).total_seconds():.1f} s"))
    if not data.probabilities.empty and data.models:
        last = data.probabilities.iloc[-1]
        rows.append(("final model probabilities",
                     ", ".join(f"{m} {last[m]:.4f}" for m in sorted(data.models, key=lambda m: -last[m]))))
    p = data.parameters
    if not p.empty:
        final = p[p["index"] == p["index"].max()]
        for model, grp in final.groupby("model", sort=False):
            rows.append((f"{model} parameters", ", ".join(f"{r.parameter} = {r.mean:.4g} ± {r.sd:.2g}"
                                                         for r in grp.itertuples())))
    ms = data.decisions["compute_ms"].dropna() if not data.decisions.empty else pd.Series(dtype=float)
    if not ms.empty:
        rows.append(("decision time", f"median {ms.median():.1f} ms, max {ms.max():.1f} ms"))
    rt = (data.trials["responded_at"] - data.trials["presented_at"]).dt.total_seconds().dropna()
    if not rt.empty:
        rows.append(("response time", f"median {rt.median():.3f} s"))
    return rows


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
color:#222;padding:0 1em} h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em}
table.summary{border-collapse:collapse;font-size:.92em} table.summary td{border-bottom:1px solid #ddd;padding:.3em .8em}
table.summary td:first-child{font-weight:600;white-space:nowrap} figure{margin:1em 0} figure img{max-width:100%}
figcaption{font-size:.85em;color:#555} pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.85em}
"""


def render_html(data: SessionData, plots: list[Plot]) -> str:
    """The report page; every image is an inline PNG data URI (no external files)."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>cloop report {e(data.session_id[:12])}</title><style>{CSS}</style></head><body>",
        f"<h1>cloop session {e(data.session_id)}</h1>",
        f"<p>Protocol <b>{e(str(data.info.get('protocol')))}</b>, subject <b>{e(str(data.info.get('subject')))}</b>. "
        f"Generated {e(dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'))}.</p>",
        '<h2>Summary</h2><table class="summary" id="summary">',
        *[f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in summary_rows(data)],
        "</table>",
    ]
    for p in plots:
        b64 = base64.b64encode(p.png).decode("ascii")
        parts.append(f'<h2>{e(p.title)}</h2><figure id="plot-{p.key}">'
                     f'<img alt="{e(p.title)}" src="data:image/png;base64,{b64}">'
                     f"<figcaption>{e(p.caption)}</figcaption></figure>")
    parts.append(f"<h2>Protocol</h2><pre>{e(data.protocol_text)}</pre></body></html>")
    return "\n".join(parts)


def population_plots(data: SessionData, images: dict[str, np.ndarray]) -> dict[str, Callable[[SessionData, Any], Plot]]:
    """A population session's "stimuli" and "predictions" figures: the images shown, the responses."""
    from orchestrator import report_population as pop

    def stimuli(data: SessionData, protocol: Any) -> Plot:
        rows, columns = pop.thumbnail_grid(data)
        fig = _plt().figure(figsize=(1.3 * columns + 0.4, 1.45 * rows + 0.3))
        pop.draw_images(fig, data, images)
        return Plot("stimuli", "Images shown", _png(fig),
                    f"The images shown, in trial order (at most {pop.MAX_THUMBNAILS}, evenly spaced), "
                    "exact pixels from the artifact store.")

    def responses(data: SessionData, protocol: Any) -> Plot:
        fig = _plt().figure(figsize=(7, 3.6))
        pop.draw_responses(fig, data)
        return Plot("predictions", "Population responses", _png(fig),
                    "Each completed trial's response vector, trials by units (blank: a masked unit).")

    return {"stimuli": stimuli, "predictions": responses}


def make_plots(data: SessionData, images: dict[str, np.ndarray] | None = None) -> list[Plot]:
    """The report's figures; a population session (`images`: its pixels by sha256) gets its own two."""
    protocol = _protocol(data)
    funcs = PLOT_FUNCS if images is None else {**PLOT_FUNCS, **population_plots(data, images)}
    return [funcs[k](data, protocol) for k in PLOTS]


def _session_images(db_url: str | None, data: SessionData) -> dict[str, np.ndarray]:
    """A population session's shown images by sha256; a missing artifact store draws a note, not an error."""
    from orchestrator.analysis import load_images
    from orchestrator.store import StoreError, resolve_url

    refs = image_refs([r.stimulus for r in data.rows])
    try:
        return load_images(resolve_url(db_url), refs) if refs else {}
    except StoreError:
        return {}


def _prepare_png_dir(png_dir: Path) -> None:
    """Create a missing plot directory (and its parents); refuse a path that is a file."""
    if png_dir.exists() and not png_dir.is_dir():
        raise ExportError(f"cannot write plots to {png_dir}: it is a file, not a directory")
    try:
        png_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create plot directory {png_dir}: {exc.strerror}") from None


def write_report(db_url: str | None, session: str, output: str | os.PathLike[str],
                 png_dir: str | os.PathLike[str] | None = None) -> Path:
    """Render the HTML report for a session to ``output`` (atomically); optionally also the PNGs."""
    output = Path(output)
    _check_writable(output)
    need("matplotlib", "the HTML report")
    if png_dir is not None:
        _prepare_png_dir(Path(png_dir))
    data = load_session(db_url, session)
    if data.trials.empty:
        raise ExportError(f"session {data.session_id} has no trials; nothing to report")
    plots = make_plots(data, _session_images(db_url, data) if data.population is not None else None)
    page = render_html(data, plots)
    with atomic_path(output) as tmp:
        tmp.write_text(page, encoding="utf-8")
    if png_dir is not None:
        for p in plots:
            with atomic_path(Path(png_dir) / f"{p.key}.png") as tmp:
                tmp.write_bytes(p.png)
    return output
