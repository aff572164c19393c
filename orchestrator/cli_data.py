"""The data-side commands of `cloop`: ``db upgrade``, ``sessions``, ``trials``, ``export``, ``report``.

`register(app)` adds them to the `cloop` Typer app. Every command takes ``--db URL`` (default
``$CLOOP_DB``, else ``sqlite:///./cloop.db``). Anything the user can fix (unknown session, old
schema, unwritable path) is a one-line ``error: ...`` on stderr and exit code 2.
"""
from __future__ import annotations

import contextlib
import enum
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from orchestrator import store as st

DB_HELP = "Database URL (default: $CLOOP_DB, else sqlite:///./cloop.db)."
DbOption = typer.Option(None, "--db", help=DB_HELP, show_default=False)


class OutFormat(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"


class ExportFormat(str, enum.Enum):
    csv = "csv"
    parquet = "parquet"
    nwb = "nwb"


def fail(message: str) -> "typer.Exit":
    """Print a one-line error and return the exit-code-2 exception to raise."""
    typer.echo("error: " + " ".join(str(message).split()), err=True)  # always exactly one line
    return typer.Exit(code=2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn store/export errors into ``error: ...`` + exit 2."""
    try:
        yield
    except st.StoreError as exc:
        raise fail(str(exc)) from None


def open_store(db: str | None) -> st.TrialStore:
    """Open an existing, up-to-date database (never creates one)."""
    return st.TrialStore(st.resolve_url(db))


def _print_table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    Console(width=max(120, len(columns) * 12)).print(table)


def _short_time(value: Any) -> str:
    s = st.iso(value)
    return "" if s is None else s.replace("T", " ")[:23]


def cmd_db_upgrade(db: Optional[str] = DbOption) -> None:
    """Create the database or upgrade its schema to the newest revision (Alembic)."""
    with user_errors():
        url = st.resolve_url(db)
        rev = st.upgrade(url)
    typer.echo(f"database {st.display_url(url)} is at revision {rev} (head)")


def cmd_sessions(
    db: Optional[str] = DbOption,
    fmt: OutFormat = typer.Option(OutFormat.table, "--format", "-f", help="Output format."),
) -> None:
    """List experiment sessions with their trial counts."""
    with user_errors():
        with open_store(db) as store:
            sessions = store.sessions()
    records = [
        {
            "id": s.id, "status": s.status, "protocol": s.protocol,
            "protocol_version": s.protocol_version, "subject": s.subject, "seed": s.seed,
            "started_at": st.iso(s.started_at), "stopped_at": st.iso(s.stopped_at),
            "n_trials": s.n_trials, **{f"n_{k}": v for k, v in s.counts.items()},
            "code_version": s.code_version,
        }
        for s in sessions
    ]
    if fmt is OutFormat.json:
        typer.echo(json.dumps(records, indent=2))
    elif fmt is OutFormat.csv:
        from orchestrator.export import csv_text

        cols = list(records[0]) if records else ["id", "status", "protocol", "subject", "started_at", "n_trials"]
        sys.stdout.write(csv_text(cols, records))
    else:
        if not sessions:
            typer.echo("no sessions yet (run `cloop demo` or `cloop run`)")
            return
        _print_table(
            f"{len(sessions)} session(s)",
            ["id", "status", "protocol", "subject", "started (UTC)", "trials", "done", "invalid", "failed"],
            [[s.id[:12], s.status, f"{s.protocol} {s.protocol_version}", s.subject,
              _short_time(s.started_at), s.n_trials, s.counts["completed"], s.counts["invalid"],
              s.counts["failed"]] for s in sessions],
        )


def cmd_trials(
    session: str = typer.Argument(..., help="Session id, unique id prefix, or 'latest'."),
    db: Optional[str] = DbOption,
    fmt: OutFormat = typer.Option(OutFormat.table, "--format", "-f", help="Output format."),
) -> None:
    """Show the trials of one session."""
    from orchestrator.export import csv_text, flat_records, trial_record

    with user_errors():
        with open_store(db) as store:
            sid = store.resolve_session(session)
            trials = store.trials(sid)
    records = [trial_record(t) for t in trials]
    if fmt is OutFormat.json:
        typer.echo(json.dumps(records, indent=2))
    elif fmt is OutFormat.csv:
        sys.stdout.write(csv_text(*flat_records(records)))
    else:
        if not records:
            typer.echo(f"session {sid} has no trials")
            return
        _print_table(
            f"session {sid}: {len(records)} trial(s)",
            ["#", "status", "att", "stimulus", "response", "dispatched", "presented", "responded", "rig"],
            [[r["index"], r["status"], r["attempts"],
              ", ".join(f"{k}={_fmt_num(v)}" for k, v in (r["stimulus"] or {}).items()),
              _fmt_response(r), _short_time(t.dispatched_at)[11:], _short_time(t.presented_at)[11:],
              _short_time(t.responded_at)[11:], r["rig_id"]] for r, t in zip(records, trials)],
        )


def _fmt_num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _fmt_response(r: dict[str, Any]) -> str:
    resp = r.get("response")
    if r["status"] == "invalid":
        return f"INVALID {resp.get('value') if isinstance(resp, dict) else resp!r}: {r.get('error')}"
    if isinstance(resp, dict):
        return ", ".join(f"{k}={_fmt_num(v)}" for k, v in resp.items())
    return "" if resp is None else str(resp)


def cmd_export(
    session: str = typer.Argument(..., help="Session id, unique id prefix, or 'latest'."),
    fmt: Optional[ExportFormat] = typer.Option(
        None, "--format", "-f", help="File format (default: from the file name: .csv, .parquet, .nwb)."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write (replaced atomically)."),
    db: Optional[str] = DbOption,
    species: Optional[str] = typer.Option(None, help="NWB only: subject species, e.g. 'Homo sapiens'."),
    sex: Optional[str] = typer.Option(None, help="NWB only: subject sex M, F, U (default) or O."),
    age: Optional[str] = typer.Option(None, help="NWB only: subject age as ISO 8601 duration, e.g. P25Y."),
    experimenter: Optional[str] = typer.Option(None, help="NWB only: experimenter name."),
    institution: Optional[str] = typer.Option(None, help="NWB only: institution."),
    artifacts: Optional[Path] = typer.Option(
        None, "--artifacts", help="NWB only: directory of the session's image artifacts "
        "(default: $CLOOP_ARTIFACTS, else <sqlite file>.artifacts)."),
) -> None:
    """Export one session's trials (and metadata) to CSV, Parquet or NWB."""
    from orchestrator import export

    if fmt is None:
        with user_errors():
            fmt = ExportFormat(export.format_from_suffix(output))
    nwb = {"species": species, "sex": sex, "age": age, "experimenter": experimenter, "institution": institution}
    if fmt is not ExportFormat.nwb and any(v is not None for v in nwb.values()):
        raise fail("--species/--sex/--age/--experimenter/--institution only apply to --format nwb")
    if sex is not None and sex not in ("M", "F", "U", "O"):
        raise fail(f"--sex must be one of M, F, U, O (got {sex!r})")
    with user_errors():
        path = export.export_session(st.resolve_url(db), session, fmt.value, output, artifacts=artifacts,
                                     **({k: v for k, v in nwb.items() if v is not None} if fmt is ExportFormat.nwb else {}))
    typer.echo(f"wrote {path}")


def cmd_report(
    session: str = typer.Argument(..., help="Session id, unique id prefix, or 'latest'."),
    output: Path = typer.Option(..., "--output", "-o", help="HTML file to write (replaced atomically)."),
    db: Optional[str] = DbOption,
    png_dir: Optional[Path] = typer.Option(None, "--png-dir", help="Also save each plot as PNG in this directory."),
) -> None:
    """Write a self-contained HTML report with plots for one session."""
    from orchestrator import report

    with user_errors():
        path = report.write_report(st.resolve_url(db), session, output, png_dir=png_dir)
    typer.echo(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add the data commands (``db upgrade``, ``sessions``, ``trials``, ``export``, ``report``) to ``app``."""
    db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
    db_app.command("upgrade")(cmd_db_upgrade)
    app.add_typer(db_app, name="db")
    app.command("sessions")(cmd_sessions)
    app.command("trials")(cmd_trials)
    app.command("export")(cmd_export)
    app.command("report")(cmd_report)
