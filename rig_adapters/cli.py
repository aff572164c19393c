"""`cloop rig` (run a rig worker on a rig PC) and `cloop keys generate` (Curve key pairs).

The rig side owns its command: ``orchestrator.cli`` adds it to the main Typer app through
:func:`register`, and ``python -m rig_adapters`` runs it alone on a rig PC (:func:`main`).
Exit codes follow the main CLI: 2 for bad input (unknown adapter, bad option, missing keys,
--insecure on a non-loopback address), 0 when the worker is stopped with SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

BAD_INPUT = 2
_RIG_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(BAD_INPUT)


def _options(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--option expects KEY=VALUE, got {pair!r}")
        out[key.replace("-", "_")] = value
    return out


def connect_problem(endpoint: str) -> str | None:
    """Why ``endpoint`` is not something a rig can connect to (None when it is): checked before any
    socket exists, so a typo gives one line instead of a ZMQ or security traceback."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        return f"--connect {endpoint!r}: expected tcp://HOST:PORT (e.g. tcp://10.0.0.5:5555)"
    if scheme == "ipc":
        return None if rest else f"--connect {endpoint!r}: ipc:// needs a path"
    if scheme != "tcp":
        return f"--connect {endpoint!r}: unsupported scheme {scheme!r}; use tcp://HOST:PORT"
    host, colon, port = rest.rpartition(":")
    if not colon or not host.strip("[]"):
        return f"--connect {endpoint!r}: expected tcp://HOST:PORT with both a host and a port"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"--connect {endpoint!r}: port {port!r} is not a number in 1..65535"
    if host in ("*", "0.0.0.0"):
        return f"--connect {endpoint!r}: {host} is a bind address; give the orchestrator's host"
    return None


def _state_dir_problem(state_dir: Path) -> str | None:
    """Why the journal cannot live in ``state_dir`` (None when it can)."""
    if state_dir.exists() and not state_dir.is_dir():
        return f"--state-dir {state_dir}: exists and is not a directory"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--state-dir {state_dir}: cannot create it ({exc.strerror or exc})"
    if not os.access(state_dir, os.W_OK | os.X_OK):
        return f"--state-dir {state_dir}: not writable by this user"
    return None


def rig(
    connect: str = typer.Option(..., "--connect", help="Orchestrator endpoint, e.g. tcp://10.0.0.5:5555."),
    adapter: str = typer.Option("simulated", "--adapter",
                                help="Adapter name (entry point in cloop.adapters) or module:Class."),
    truth: Optional[str] = typer.Option(None, "--truth",
                                        help="Simulated adapter: ground truth MODEL:param=value,..."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Simulated adapter: seed of the responses."),
    trial_seconds: Optional[float] = typer.Option(None, "--trial-seconds",
                                                  help="Simulated adapter: how long each trial takes."),
    option: list[str] = typer.Option([], "--option", "-o", help="Extra adapter option KEY=VALUE (repeatable)."),
    rig_id: Optional[str] = typer.Option(None, "--rig-id", help="Rig id (default: --name, else HOST-ADAPTER)."),
    keys: Optional[Path] = typer.Option(None, "--keys",
                                        help="Key directory with NAME.key_secret and orchestrator.key."),
    name: Optional[str] = typer.Option(None, "--name", help="This rig's key name (DIR/NAME.key_secret)."),
    insecure: bool = typer.Option(False, "--insecure", help="No Curve (allowed only for loopback addresses)."),
    state_dir: Optional[Path] = typer.Option(
        None, "--state-dir",
        help="Keep the journal of presented trials here, so a restarted worker never presents a trial twice."),
    heartbeat: float = typer.Option(0.25, "--heartbeat", min=0.01, help="Heartbeat interval before the "
                                    "orchestrator sets its own (s)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a rig worker: connect to the orchestrator, present trials with the adapter, reconnect forever."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from orchestrator.keys import SecurityError, is_loopback
    from rig_adapters.base import AdapterError, build_adapter
    from rig_adapters.worker import RigWorker

    problem = connect_problem(connect)
    if problem is None and rig_id is not None and not _RIG_ID.fullmatch(rig_id):
        problem = f"--rig-id {rig_id!r}: use 1-64 characters from A-Z a-z 0-9 _ . : @ -"
    if problem is None and state_dir is not None:
        problem = _state_dir_problem(state_dir)
    if problem is not None:
        _fail(problem)
    opts = _options(option)
    for key, value in (("truth", truth), ("seed", seed), ("trial_seconds", trial_seconds)):
        if value is not None:
            opts[key] = str(value)
    try:
        built = build_adapter(adapter, opts)
    except AdapterError as exc:
        _fail(str(exc))
    if keys is None and not insecure and is_loopback(connect):
        # Plain text that never leaves this machine; on any other address keys stay mandatory.
        typer.echo("warning: no --keys on a loopback address: connecting without Curve", err=True)
        insecure = True
    try:
        worker = RigWorker(connect, built, rig_id=rig_id, keys_dir=keys, key_name=name, insecure=insecure,
                           state_dir=state_dir, heartbeat_s=heartbeat)
    except (SecurityError, ValueError, RuntimeError) as exc:
        _fail(str(exc))
    typer.echo(f"rig {worker.rig_id} ({built.name}) serving {connect}; Ctrl-C to stop", err=True)
    raise typer.Exit(worker.run(install_signal_handlers=True))


def keys_generate(
    directory: Path = typer.Argument(..., help="Directory to write the key files into."),
    name: str = typer.Option(..., "--name", help="Key name: 'orchestrator' for the orchestrator, else the rig's name."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing key pair."),
) -> None:
    """Write DIR/NAME.key (public: share it) and DIR/NAME.key_secret (secret: keep it on this machine)."""
    from orchestrator.keys import ALLOW_DIR, ORCHESTRATOR_NAME, SecurityError, generate

    try:
        public, secret = generate(directory, name, force=force)
    except SecurityError as exc:
        _fail(str(exc))
    typer.echo(f"public key: {public}\nsecret key: {secret} (mode 600; never copy it off this machine)")
    if name == ORCHESTRATOR_NAME:
        typer.echo(f"next: copy {public.name} to each rig's key directory; put each rig's public NAME.key "
                   f"into {Path(directory) / ALLOW_DIR}/")
    else:
        typer.echo(f"next: copy {public.name} into the orchestrator's {ALLOW_DIR}/ directory, and the "
                   f"orchestrator's orchestrator.key into {directory}/")


def register(app: typer.Typer) -> None:
    """Add `rig` and `keys generate` to the main `cloop` app."""
    app.command("rig")(rig)
    keys_app = typer.Typer(help="CurveZMQ key pairs for the orchestrator and the rigs.", no_args_is_help=True)
    keys_app.command("generate")(keys_generate)
    app.add_typer(keys_app, name="keys")


def main(argv: list[str] | None = None) -> None:
    """``python -m rig_adapters ...``: the ``cloop rig`` command without the rest of the CLI."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app(args=["rig", *(sys.argv[1:] if argv is None else argv)], prog_name="cloop-rig")
