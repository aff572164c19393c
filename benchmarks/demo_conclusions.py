"""How often `cloop demo`'s stopping rule names the wrong model, over many simulated subjects.

The demo's subject is the retention protocol's power-law truth; each seed is one simulated session
(the same closed loop as `cloop simulate`, hence as the demo itself with that seed). Prints JSON:
the fraction of sessions whose conclusion differs from the truth at the protocol's threshold, and
which seeds conclude correctly near the median trial count (candidates for the demo's seed).

    python benchmarks/demo_conclusions.py --sessions 200
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from orchestrator.protocol import load_protocol  # noqa: E402
from orchestrator.simulate import SimulationConfig, simulate  # noqa: E402

DEMO_TRUTH = "power:a=0.9025,b=0.4861"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--protocol", default=str(Path(__file__).resolve().parents[1] / "protocols" / "retention.yaml"))
    parser.add_argument("--truth", default=DEMO_TRUTH)
    args = parser.parse_args()
    torch.set_num_threads(1)
    protocol = load_protocol(args.protocol).protocol
    outcomes: list[tuple[int, str, int, bool]] = []
    for seed in range(args.first_seed, args.first_seed + args.sessions):
        last = None
        for last in simulate(protocol, SimulationConfig(truth=args.truth, seed=seed)):
            pass
        assert last is not None
        probabilities = last["model_probabilities"]
        winner = max(probabilities, key=probabilities.get)
        reached = probabilities[winner] >= protocol.stopping.model_probability
        outcomes.append((seed, winner, last["trial"] + 1, reached))
    truth = DEMO_TRUTH.split(":")[0] if args.truth == DEMO_TRUTH else args.truth.split(":")[0]
    wrong = [o for o in outcomes if o[3] and o[1] != truth]
    reached = [o for o in outcomes if o[3]]
    fraction = len(wrong) / len(reached) if reached else math.nan
    median_trials = statistics.median(o[2] for o in reached) if reached else math.nan
    typical = [o[0] for o in outcomes if o[3] and o[1] == truth and o[2] == median_trials]
    print(json.dumps({
        "protocol": Path(args.protocol).name, "truth": args.truth, "threshold": protocol.stopping.model_probability,
        "sessions": len(outcomes), "reached_threshold": len(reached), "wrong_conclusions": len(wrong),
        "fraction_wrong": round(fraction, 4),
        "standard_error": round(math.sqrt(fraction * (1 - fraction) / len(reached)), 4) if reached else None,
        "wrong_seeds": [o[0] for o in wrong], "median_trials": median_trials, "typical_correct_seeds": typical[:10],
    }))


if __name__ == "__main__":
    main()
