"""`cloop models` and `cloop designs`: what a protocol can name in this installation."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the catalogue commands to the `cloop` app."""

    @app.command("models")
    def models_command() -> None:
        """Builtin and installed models with their inputs, parameters and settings; prior distributions."""
        from orchestrator.catalogue import render_models

        typer.echo(render_models(), nl=False)

    @app.command("designs")
    def designs_command() -> None:
        """Design strategies with their aliases and settings; installed plug-ins (entry points)."""
        from orchestrator.catalogue import render_designs

        typer.echo(render_designs(), nl=False)
