"""Live progress: a rich bar on a terminal, one greppable line per trial otherwise."""

from __future__ import annotations

import io

from orchestrator.design import Decision
from orchestrator.engine import TrialReport
from orchestrator.progress import ProgressDisplay


def _report(index: int, p: float) -> TrialReport:
    decision = Decision({"lag": index}, "mutual_information", "max MI", 0.3, 4.2)
    return TrialReport(index, "completed", {"lag": index}, 7.0, {"power": p, "exponential": 1 - p}, decision, 1)


def test_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    with ProgressDisplay(40, stream=stream) as display:
        display.waiting("tcp://127.0.0.1:5555", "waiting for 1 rig on tcp://127.0.0.1:5555")
        display.trial(_report(0, 0.6))
        display.trial(_report(1, 0.2))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("waiting for 1 rig")
    assert lines[1] == "trial 1/40 completed lag=0 response=7.0 leader=power P=0.600 decision=4.2 ms"
    assert "leader=exponential P=0.800" in lines[2]


def test_live_bar_shows_trial_leader_decision_and_rig() -> None:
    stream = io.StringIO()
    with ProgressDisplay(40, stream=stream, live=True, width=160) as display:
        display.waiting("tcp://127.0.0.1:5555", "waiting")
        display.trial(_report(4, 0.97))
    text = stream.getvalue()
    assert "5/40" in text and "power P=0.970" in text and "4.2 ms" in text and "connected" in text


def test_no_trial_lines_when_a_flow_logs_them() -> None:
    stream = io.StringIO()
    with ProgressDisplay(10, stream=stream, trial_lines=False) as display:
        display.trial(_report(0, 0.5))
    assert stream.getvalue() == ""
