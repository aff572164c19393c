"""`cloop simulate PROTOCOL --truth MODEL:param=value,...`: pilot a protocol against a simulated subject."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from orchestrator.cli_common import ExitCode, fail


def register(app: typer.Typer) -> None:
    """Add the `simulate` command to the cloop Typer app."""

    @app.command("simulate")
    def simulate_cmd(
        protocol: Path = typer.Argument(..., help="Protocol YAML file."),
        truth: str = typer.Option(..., "--truth", help="Ground truth, e.g. power:a=0.9,b=0.5 (missing params: prior medians)."),
        design: Optional[str] = typer.Option(None, "--design", help="Design strategy (default: the protocol's)."),
        replicates: int = typer.Option(1, "--replicates", min=1, help="Independent simulated sessions."),
        seed: int = typer.Option(0, "--seed", help="Seed of replicate 0 (replicate r uses seed + r)."),
        max_trials: Optional[int] = typer.Option(None, "--max-trials", min=1, help="Default: stopping.max_trials."),
        as_json: bool = typer.Option(False, "--json", help="One JSON object per trial on stdout."),
        threads: int = typer.Option(1, "--threads", min=1, help="torch threads (1 is fastest on small shared CPUs)."),
    ) -> None:
        """Run the closed loop in-process against a simulated subject; one line per trial."""
        import torch

        from orchestrator.protocol import ProtocolError, load_protocol
        from orchestrator.protocol_checks import orchestrator_checks
        from orchestrator.simulate import SimulationConfig, simulate

        torch.set_num_threads(threads)
        try:
            loaded = load_protocol(protocol, checks=orchestrator_checks())
        except ProtocolError as exc:
            for problem in exc.problems:
                typer.echo(str(problem), err=True)
            raise typer.Exit(ExitCode.BAD_INPUT)
        from orchestrator.preflight import OptionError, check_design, check_truth

        try:  # before the first trial, one line naming the option
            check_truth(loaded.protocol, truth)
            check_design(loaded.protocol, design)
        except OptionError as exc:
            fail(str(exc))
        config = SimulationConfig(truth=truth, design=design, replicates=replicates, seed=seed, max_trials=max_trials)
        try:
            records = simulate(loaded.protocol, config)
            first = next(records, None)
        except ValueError as exc:
            fail(str(exc))
        rec = first
        while rec is not None:
            if as_json:
                sys.stdout.write(json.dumps(rec) + "\n")
            else:
                probs = " ".join(f"{k}={v:.3f}" for k, v in rec["model_probabilities"].items())
                stim = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec["stimulus"].items())
                resp = rec["response"]
                shown = f"{resp:g}" if isinstance(resp, (int, float)) else f"[{len(resp)} units]"
                typer.echo(f"rep {rec['replicate']} trial {rec['trial']:3d}  {stim:<32} -> {shown}  "
                           f"{probs}  ({rec['decision_ms']:.1f} ms, {rec['strategy']})")
            sys.stdout.flush()
            rec = next(records, None)
