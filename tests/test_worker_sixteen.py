"""16 simulated-subject rig workers (real processes, each answering from the ground truth) in one session."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from orchestrator.transport import RigServer, TrialCommand
from orchestrator.protocol_checks import load_checked
from test_transport_helpers import Workers

REPO = Path(__file__).resolve().parents[1]
TRUTH = "power:a=0.9,b=0.4"


@pytest.mark.slow
def test_sixteen_simulated_rigs_in_one_session(tmp_path: Path) -> None:
    from orchestrator.models import build_truth
    from orchestrator.protocol import load_protocol

    loaded = load_checked(REPO / "protocols" / "retention.yaml")
    truth = build_truth(loaded.protocol, TRUTH)
    with RigServer("tcp://127.0.0.1:0", insecure=True) as srv, Workers(tmp_path) as workers:
        srv.set_session("sixteen", loaded.text)
        for n in range(16):
            workers.start(srv.endpoint, f"sim-{n:02d}", adapter="simulated",
                          options={"truth": TRUTH, "seed": 42, "trial_seconds": 0.02})
        rigs = srv.wait_for_rigs(loaded.protocol.rig.capabilities, 16, 180)
        assert len({r.rig_id for r in rigs}) == 16
        lags = [int(x) for x in np.random.default_rng(0).integers(0, 100, size=160)]
        futures = [srv.submit(TrialCommand(trial_id=f"sixteen:{i}", attempt=1, index=i, session_id="sixteen",
                                           stimulus={"lag": lag}, stimulus_type="abstract",
                                           response_kind="binomial", timeout_s=60.0))
                   for i, lag in enumerate(lags)]
        outs = [f.result(timeout=180) for f in futures]
    # Every rig answered, and every answer is the truth's draw for that trial index, whichever rig gave it.
    used = collections.Counter(o.rig_id for o in outs)
    assert len(used) == 16, used
    for i, (lag, out) in enumerate(zip(lags, outs)):
        assert out.response["value"] == truth.sample({"lag": lag}, np.random.default_rng([42, i]))
