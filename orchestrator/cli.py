"""`cloop`: the command line an experimenter, a rig PC and an analyst use.

Exit codes: 0 success, 1 the session could not run (no rig came, a rig failure), 2 bad input
(a bad protocol file, an unknown session, a refused option). Bad input never writes to the database.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from orchestrator import code_version
from orchestrator.cli_common import ExitCode, db_option, fail, run_and_report, setup_logging
from orchestrator.preflight import check_session_options

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

DEMO_TRUTH = "power:a=0.9025,b=0.4861"
DEMO_SEED = 15  # a typical subject: the demo's truth is concluded in the median number of trials


def _load_or_exit(path: Path):  # -> LoadedProtocol
    from orchestrator.protocol import ProtocolError, load_protocol
    from orchestrator.protocol_checks import orchestrator_checks

    try:
        return load_protocol(path, checks=orchestrator_checks())
    except ProtocolError as exc:
        for problem in exc.problems:
            typer.echo(str(problem), err=True)
        raise typer.Exit(ExitCode.BAD_INPUT)


def _check_security(bind: str, keys: Optional[Path], insecure: bool) -> bool:
    """Decide whether the socket runs without Curve; refuse plaintext on anything but loopback."""
    if keys is not None and insecure:
        fail("give either --keys DIR or --insecure, not both")
    if keys is not None:
        return False
    if not bind.startswith("tcp://"):
        fail(f"--bind must be a tcp:// endpoint, got {bind!r}")
    from orchestrator.keys import SecurityError, is_loopback

    try:
        loopback = is_loopback(bind)
    except SecurityError as exc:
        fail(f"--bind: {exc}")
    if not loopback:
        fail(
            f"--bind {bind} is not loopback: rig traffic on a network must be authenticated and "
            "encrypted; give --keys DIR (see `cloop keys generate --help`)"
            + (" (--insecure is refused for non-loopback binds)" if insecure else "")
        )
    return True


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
    db: Optional[str] = db_option(),
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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every step (HTTP, Prefect, rig network)."),
) -> None:
    """Run a session: prints the session id first, waits for rigs, runs trials until a stopping rule fires."""
    from orchestrator.store import resolve_url

    setup_logging(verbose)
    loaded = _load_or_exit(protocol)
    explicit_insecure = insecure
    insecure = _check_security(bind, keys, insecure)
    _preflight(lambda: check_session_options(loaded.protocol, bind=bind, keys_dir=keys, design=design,
                                             subject=subject))
    if insecure and not explicit_insecure:
        logging.getLogger("cloop.cli").warning("loopback bind without --keys: running without Curve")
    request = _request(protocol, resolve_url(db), bind, subject, seed, max_trials, design, keys, insecure, wait_for_rig)
    session_id, seed = _register(request, loaded)
    run_and_report(request, loaded, session_id, seed, prefect=prefect)


def _preflight(check) -> None:  # noqa: ANN001
    """Run option checks before anything is written; an OptionError is one line and exit 2."""
    from orchestrator.preflight import OptionError

    try:
        check()
    except OptionError as exc:
        fail(str(exc))


def _register(request, loaded) -> tuple[str, int]:  # noqa: ANN001
    """Create the session row and print its id as the first line of output."""
    from orchestrator.session import register_session
    from orchestrator.store import StoreError

    try:
        session_id, seed = register_session(request, loaded)
    except StoreError as exc:
        fail(f"--db: {exc}")
    typer.echo(session_id)
    return session_id, seed


def _request(protocol, db_url, bind, subject, seed, max_trials, design, keys, insecure, wait_for_rig):  # noqa: ANN001
    from orchestrator.session import SessionRequest

    return SessionRequest(
        protocol_path=str(Path(protocol).resolve()), db_url=db_url, bind=bind, subject=subject, seed=seed,
        max_trials=max_trials, design=design, keys_dir=str(keys) if keys else None, insecure=insecure,
        wait_for_rig_s=wait_for_rig,
    )


def _bundled_protocol(name: str) -> Path:
    from orchestrator.resources import ResourceNotFound, bundled_protocol

    try:
        return bundled_protocol(name)
    except ResourceNotFound as exc:
        fail(str(exc))


class _DemoRig:
    """Starts the simulated rig worker as a separate process as soon as the orchestrator listens."""

    def __init__(self, truth: str, seed: int):
        self.truth, self.seed = truth, seed
        self.process: subprocess.Popen | None = None

    def waiting(self, endpoint: str, message: str) -> None:
        if self.process is None:
            from orchestrator.children import start_owned  # Ctrl-C pauses the session, not the rig

            self.process = start_owned(
                [sys.executable, "-m", "orchestrator", "rig", "--connect", endpoint, "--adapter", "simulated",
                 "--truth", self.truth, "--seed", str(self.seed), "--insecure"],
                stdout=subprocess.DEVNULL,
            )

    def trial(self, report) -> None:  # noqa: ANN001
        return None

    def stop(self) -> None:
        from orchestrator.children import stop_owned

        if self.process is not None:
            stop_owned(self.process, timeout_s=10)


#: Measured with `python benchmarks/demo_conclusions.py --sessions 200` (seeds 0-199, the demo's truth,
#: the retention protocol's P >= 0.99 rule): the fraction of sessions that conclude the wrong model.
DEMO_WRONG_FRACTION = 0.01  # 2 of 200 (seeds 7 and 66)


def conclusion_line(truth: str, summary: dict) -> str:
    """One line comparing the simulated subject's truth with the session's conclusion."""
    true_model = truth.split(":", 1)[0].strip()
    probabilities = summary["probabilities"]
    winner = max(probabilities, key=probabilities.get)
    if not summary["stop_reason"].startswith("model "):
        return (f"truth {true_model!r}; no model reached the threshold ({summary['stop_reason']}); "
                f"leading: {winner!r} P={probabilities[winner]:.4f}")
    if winner == true_model:
        return f"truth {true_model!r}, conclusion {winner!r} (P={probabilities[winner]:.4f}): the conclusion is right"
    return (f"truth {true_model!r}, conclusion {winner!r} (P={probabilities[winner]:.4f}): wrong; at this threshold "
            f"that happens to {100 * DEMO_WRONG_FRACTION:.1f}% of simulated subjects with this truth "
            "(benchmarks/demo_conclusions.py)")


@app.command()
def demo(
    db: Optional[str] = db_option(),
    seed: int = typer.Option(DEMO_SEED, "--seed", help="Seed for design, models and the simulated subject."),
    max_trials: Optional[int] = typer.Option(None, "--max-trials", min=1),
    truth: str = typer.Option(DEMO_TRUTH, "--truth", help="Ground truth of the simulated subject."),
    prefect: bool = typer.Option(True, "--prefect/--no-prefect", help="Run as a Prefect flow (default)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every step (HTTP, Prefect, rig network)."),
) -> None:
    """A full closed-loop session: retention protocol, simulated rig worker process over ZMQ, SQLite."""
    from orchestrator.preflight import check_truth
    from orchestrator.store import resolve_url

    setup_logging(verbose)
    protocol = _bundled_protocol("retention.yaml")
    loaded = _load_or_exit(protocol)
    _preflight(lambda: check_truth(loaded.protocol, truth))
    db_url = resolve_url(db)
    request = _request(protocol, db_url, "tcp://127.0.0.1:*", "demo-subject", seed, max_trials, None, None, True, 30.0)
    rig = _DemoRig(truth, seed)
    typer.echo(f"cloop {code_version()} demo: {loaded.protocol.description.strip()}", err=True)
    typer.echo(f"simulated subject's truth: {truth}", err=True)
    session_id, seed = _register(request, loaded)
    try:
        summary = run_and_report(request, loaded, session_id, seed, prefect=prefect, observers=[rig])
    finally:
        rig.stop()
    typer.echo(conclusion_line(truth, summary))
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
        "rig_adapters.cli",
        "orchestrator.cli_data",
        "orchestrator.cli_simulate",
        "orchestrator.cli_lifecycle",
        "orchestrator.cli_catalogue",
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
