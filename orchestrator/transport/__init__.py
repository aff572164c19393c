"""The orchestrator's side of the rig network over ZeroMQ (see :mod:`.server`).

The rig vocabulary (commands, outcomes, typed failures) lives in :mod:`orchestrator.rig_api`, which
has no zmq dependency; it is re-exported here so existing imports keep working.
"""

from orchestrator.rig_api import (AttemptFailed, FailureReason, NoRigError, RigInfo, RigLost, TransportError,
                                  TrialCommand, TrialOutcome, TrialRejected, TrialTimeout)
from orchestrator.transport.guard import MAX_INBOUND_FRAME_BYTES, PEER_BUFFER_BYTES
from orchestrator.transport.server import RigServer

__all__ = [
    "AttemptFailed", "FailureReason", "MAX_INBOUND_FRAME_BYTES", "NoRigError", "PEER_BUFFER_BYTES", "RigInfo",
    "RigLost", "RigServer", "TransportError", "TrialCommand", "TrialOutcome", "TrialRejected", "TrialTimeout",
]
