"""Adapters that fail the way real rigs do, loaded by `cloop rig --adapter adapters_for_tests:NAME`."""

from __future__ import annotations

import time

from rig_adapters.base import AdapterResult
from rig_adapters.simulated import NullAdapter


class _CodedError(RuntimeError):
    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class AbortOnSecondTrial(NullAdapter):
    """The operator presses Escape during trial index 1."""

    name = "abort_second"

    def present(self, cmd):  # noqa: ANN001, ANN201
        if cmd.index == 1:
            raise _CodedError("Escape pressed by the operator", "aborted")
        now = time.time()
        return AdapterResult(response={"value": 5}, timing={"presented_at": now, "responded_at": now})


class RefuseEverything(NullAdapter):
    """The rig's own hard limits refuse every command."""

    name = "refuse_all"

    def present(self, cmd):  # noqa: ANN001, ANN201
        raise _CodedError("amplitude above the rig's limit", "refused")


class NanosecondClock(NullAdapter):
    """A driver that reports ``time.time_ns()`` where epoch seconds belong, on trial index 1 only."""

    name = "ns_clock"

    def present(self, cmd):  # noqa: ANN001, ANN201
        now = time.time()
        presented = time.time_ns() if cmd.index == 1 else now
        return AdapterResult(response={"value": 5}, timing={"presented_at": presented, "responded_at": now})


class GilHoggingStart(NullAdapter):
    """Starting the session holds the GIL in C for seconds at a time, like importing torch on a busy PC."""

    name = "gil_hog"

    def start(self, session):  # noqa: ANN001, ANN201
        end = time.time() + 4.0
        while time.time() < end:
            sum(range(30_000_000))  # one C call: no other thread runs meanwhile
        super().start(session)
