"""`cloop rig` (run a rig worker on a rig PC) and `cloop keys generate` (Curve key pairs).

Registered into the main Typer app by ``orchestrator.cli`` through :func:`register`.
Exit codes follow the main CLI: 2 for bad input (unknown adapter, bad option, missing keys,
--insecure on a non-loopback address), 0 when the worker is stopped with SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

BAD_INPUT = 2


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
