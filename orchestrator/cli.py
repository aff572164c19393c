"""`cloop`: the command line an experimenter, a rig PC and an analyst use.

Exit codes: 0 success, 1 the session could not run (no rig came, a rig failure), 2 bad input
(a bad protocol file, an unknown session, a refused option). Bad input never writes to the database.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from orchestrator import REPO_ROOT, code_version

app = typer.Typer(
    name="cloop",
    help=(
        "Active-learning closed-loop experiments.\n\n"
        "Start here: `cloop demo` runs a whole closed-loop session against a simulated subject.\n"
        "Then: `cloop validate protocols/retention.yaml`, `cloop run protocols/retention.yaml` on the "
        "orchestrator and `cloop rig --connect tcp://HOST:5555 --adapter ...` on each rig PC; "
        "`cloop sessions` and `cloop trials latest` read the results."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

BAD_INPUT = 2
RUN_FAILED = 1
DEMO_TRUTH = "power:a=0.9025,b=0.4861"


def _fail(message: str, code: int = BAD_INPUT) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load_or_exit(path: Path):  # -> LoadedProtocol
    from orchestrator.protocol import ProtocolError, load_protocol

    try:
        return load_protocol(path)
    except ProtocolError as exc:
        for problem in exc.problems:
            typer.echo(str(problem), err=True)
        raise typer.Exit(BAD_INPUT)


def _check_security(bind: str, keys: Optional[Path], insecure: bool) -> bool:
    """Decide whether the socket runs without Curve; refuse plaintext on anything but loopback."""
    if keys is not None and insecure:
        _fail("give either --keys DIR or --insecure, not both")
    if keys is not None:
        return False
    if not bind.startswith("tcp://"):
        _fail(f"--bind must be a tcp:// endpoint, got {bind!r}")
    from orchestrator.keys import is_loopback

    if not is_loopback(bind):
        _fail(
            f"--bind {bind} is not loopback: rig traffic on a network must be authenticated and "
            "encrypted; give --keys DIR (see `cloop keys generate --help`)"
            + (" (--insecure is refused for non-loopback binds)" if insecure else "")
        )
    if not insecure:
        logging.getLogger("cloop.cli").warning("loopback bind without --keys: running without Curve")
    return True


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def validate(protocol: Path = typer.Argument(..., help="Protocol YAML file to check.")) -> None:
    """Check a protocol file without touching a database or a rig; one line per problem, exit 2 if any."""
    loaded = _load_or_exit(protocol)
    p = loaded.protocol
    typer.echo(
        f"{protocol}: ok — {p.name} v{p.version}, "
        + (f"{p.stimulus.size[0]}x{p.stimulus.size[1]} image stimuli, {p.response.n_units} units, " if p.is_population
           else f"{len(p.stimulus.parameters)} stimulus parameter(s), ")
        + f"{p.response.kind} response, models {[m.name for m in p.models]}, design {p.design.strategy}, "
        f"sha256 {loaded.sha256[:12]}"
    )


@app.command()
def run(
    protocol: Path = typer.Argument(..., help="Protocol YAML file."),
    db: Optional[str] = typer.Option(None, "--db", help="Database URL (default $CLOOP_DB or sqlite:///./cloop.db)."),
    bind: str = typer.Option("tcp://127.0.0.1:5555", "--bind", help="Endpoint rigs connect to."),
    subject: str = typer.Option("anonymous", "--subject", help="Subject id (created if new)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the design and models (random if omitted; stored)."),
    max_trials: Optional[int] = typer.Option(None, "--max-trials", min=1, help="Override the protocol's max_trials."),
    design: Optional[str] = typer.Option(None, "--design", help="Override the protocol's design strategy."),
    keys: Optional[Path] = typer.Option(None, "--keys", help="CurveZMQ key directory (see `cloop keys generate`)."),
    insecure: bool = typer.Option(False, "--insecure", help="No Curve; allowed only on loopback binds."),
    wait_for_rig: Optional[float] = typer.Option(
        None, "--wait-for-rig", min=0.1, help="Seconds to wait for rigs before giving up (default: protocol)."
    ),
    prefect: bool = typer.Option(True, "--prefect/--no-prefect", help="Run as a Prefect flow (default) or directly."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a session: prints the session id first, waits for rigs, runs trials until a stopping rule fires."""
    from orchestrator.store import resolve_url

    _setup_logging(verbose)
    loaded = _load_or_exit(protocol)
    insecure = _check_security(bind, keys, insecure)
    request = _request(protocol, resolve_url(db), bind, subject, seed, max_trials, design, keys, insecure, wait_for_rig)
    _run_request(request, loaded, prefect)


def _request(protocol, db_url, bind, subject, seed, max_trials, design, keys, insecure, wait_for_rig):  # noqa: ANN001
    from orchestrator.session import SessionRequest

    return SessionRequest(
        protocol_path=str(Path(protocol).resolve()), db_url=db_url, bind=bind, subject=subject, seed=seed,
        max_trials=max_trials, design=design, keys_dir=str(keys) if keys else None, insecure=insecure,
        wait_for_rig_s=wait_for_rig,
    )


def _run_request(request, loaded, prefect: bool, extra_observer=None):  # noqa: ANN001, ANN202
    """Register the session (printing its id as the first line), then run it with live progress."""
    from orchestrator.progress import ProgressDisplay
    from orchestrator.keys import SecurityError
    from orchestrator.session import NoRigError, observing, register_session
    from orchestrator.transport import TransportError

    session_id, seed = register_session(request, loaded)
    typer.echo(session_id)
    max_trials = request.max_trials or loaded.protocol.stopping.max_trials
    try:
        with ProgressDisplay(max_trials, trial_lines=not prefect) as display, observing(display), \
                (observing(extra_observer) if extra_observer is not None else nullcontext()):
            summary = _execute(request, session_id, seed, loaded, prefect)
    except NoRigError as exc:
        _fail(str(exc), RUN_FAILED)
    except TransportError as exc:
        _fail(f"{exc} (session {session_id} is resumable: cloop resume {session_id})", RUN_FAILED)
    except SecurityError as exc:
        _fail(str(exc), BAD_INPUT)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; session {session_id} can be resumed", err=True)
        raise typer.Exit(130)
    probabilities = ", ".join(f"{k}={v:.4f}" for k, v in summary["probabilities"].items())
    typer.echo(
        f"session {session_id} {summary['status']}: {summary['trials_completed']} completed, "
        f"{summary['trials_invalid']} invalid, {summary['trials_failed']} failed trial(s); "
        f"{summary['stop_reason']}; P({probabilities})"
    )
    return session_id, summary


def _execute(request, session_id: str, seed: int, loaded, prefect: bool) -> dict:  # noqa: ANN001
    from dataclasses import asdict

    from orchestrator.session import execute_session

    if prefect:
        from orchestrator.flows import session_flow

        return session_flow(request, session_id=session_id, seed=seed)
    return asdict(execute_session(request, session_id, seed, loaded=loaded))


def _bundled_protocol(name: str) -> Path:
    path = REPO_ROOT / "protocols" / name
    if not path.exists():
        _fail(f"cannot find {path}; run cloop from a source checkout installed with `pip install -e .`")
    return path


class _DemoRig:
    """Starts the simulated rig worker as a separate process as soon as the orchestrator listens."""

    def __init__(self, truth: str, seed: int):
        self.truth, self.seed = truth, seed
        self.process: subprocess.Popen | None = None

    def waiting(self, endpoint: str, message: str) -> None:
        if self.process is None:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "rig", "--connect", endpoint, "--adapter", "simulated",
                 "--truth", self.truth, "--seed", str(self.seed), "--insecure"],
                stdout=subprocess.DEVNULL,
            )

    def trial(self, report) -> None:  # noqa: ANN001
        return None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@app.command()
def demo(
    db: Optional[str] = typer.Option(None, "--db", help="Database URL (default $CLOOP_DB or sqlite:///./cloop.db)."),
    seed: int = typer.Option(7, "--seed", help="Seed for design, models and the simulated subject."),
    max_trials: Optional[int] = typer.Option(None, "--max-trials", min=1),
    truth: str = typer.Option(DEMO_TRUTH, "--truth", help="Ground truth of the simulated subject."),
    prefect: bool = typer.Option(True, "--prefect/--no-prefect", help="Run as a Prefect flow (default)."),
) -> None:
    """A full closed-loop session: retention protocol, simulated rig worker process over ZMQ, SQLite."""
    from orchestrator.store import resolve_url

    _setup_logging(False)
    protocol = _bundled_protocol("retention.yaml")
    loaded = _load_or_exit(protocol)
    db_url = resolve_url(db)
    request = _request(protocol, db_url, "tcp://127.0.0.1:*", "demo-subject", seed, max_trials, None, None, True, 30.0)
    rig = _DemoRig(truth, seed)
    typer.echo(f"cloop {code_version()} demo: {loaded.protocol.description.strip()}", err=True)
    typer.echo(f"simulated subject's truth: {truth}", err=True)
    try:
        session_id, _ = _run_request(request, loaded, prefect, extra_observer=rig)
    finally:
        rig.stop()
    db_arg = "" if db is None and "CLOOP_DB" not in os.environ else f" --db {db_url}"
    typer.echo(
        "\n".join(
            [
                f"data: {db_url}  (session {session_id})",
                "look at it:",
                f"  cloop sessions{db_arg}",
                f"  cloop trials latest{db_arg} --format table   # or csv / json",
                f"  python -c \"from orchestrator.analysis import trials; print(trials('{db_url}', session='latest'))\"",
            ]
        )
    )


def _register_extensions() -> None:
    """Commands owned by other modules (rig, keys, data, simulate, lifecycle) add themselves here."""
    for module_name in (
        "orchestrator.cli_rig",
        "orchestrator.cli_data",
        "orchestrator.cli_simulate",
        "orchestrator.cli_lifecycle",
    ):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(app)


_register_extensions()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
