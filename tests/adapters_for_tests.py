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
