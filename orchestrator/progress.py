"""Live progress of a running session for the experimenter at the orchestrator's terminal.

On a terminal: a rich progress bar with trial n of max, the leading model and its probability, the
last decision time and the rig status. Not on a terminal (CI logs, nohup, Prefect workers): one plain
line per trial, so logs stay greppable.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.engine import TrialReport


class ProgressDisplay:
    """A SessionObserver (see orchestrator.session.observing) that shows progress as trials land."""

    def __init__(self, max_trials: int, stream: TextIO | None = None, live: bool | None = None,
                 trial_lines: bool = True, width: int | None = None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.trial_lines = trial_lines  # off when something else (a Prefect flow's logger) logs each trial
        self.width = width
        self.max_trials = max_trials
        self.rig_status = "waiting for rig"
        self._progress: Progress | None = None
        self._task_id: int | None = None

    def __enter__(self) -> "ProgressDisplay":
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]trial"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[leader]}"),
                TextColumn("decision {task.fields[decision]}"),
                TextColumn("rig: {task.fields[rig]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream, width=self.width),
                transient=False,
            )
            self._progress.start()
            self._task_id = self._progress.add_task(
                "session", total=self.max_trials, leader="-", decision="-", rig=self.rig_status
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def waiting(self, endpoint: str, message: str) -> None:
        self.rig_status = f"waiting on {endpoint}"
        if self._progress is not None and self._task_id is not None:
            self._progress.update(self._task_id, rig=self.rig_status)
        self._write(message)

    def trial(self, report: TrialReport) -> None:
        self.rig_status = "connected"
        leader, p = max(report.probabilities.items(), key=lambda kv: kv[1]) if report.probabilities else ("-", 0.0)
        decision = f"{report.decision.compute_ms:.1f} ms"
        if self._progress is not None and self._task_id is not None:
            self._progress.update(
                self._task_id, completed=report.index + 1, leader=f"{leader} P={p:.3f}", decision=decision,
                rig=f"{self.rig_status}, {report.attempts} attempt(s)",
            )
            return
        if not self.trial_lines:
            return
        stimulus = " ".join(f"{k}={v}" for k, v in report.stimulus.items())
        self._write(
            f"trial {report.index + 1}/{self.max_trials} {report.status} {stimulus} "
            f"response={report.response_text} leader={leader} P={p:.3f} decision={decision}"
            + (f" error={report.error}" if report.error else "")
        )

    def _write(self, line: str) -> None:
        # Not print(): inside a Prefect flow with log_prints, print() becomes a second, logged copy.
        self.stream.write(line + "\n")
        self.stream.flush()
