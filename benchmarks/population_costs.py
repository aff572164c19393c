"""Population design costs: readout update, scoring the pool, one synthesis, readout memory.

Issue #13's targets on a 2-core CPU with one torch thread: readout update <= 1 ms per model per
trial (N = 100, 257 features), scoring the 1,000-image pool <= 60 ms, one synthesis p95 <= 0.5 s
(32 x 32 vs 2 models) and <= 2 s (32 x 32 vs 3 models, 64 x 64 vs 2), memory linear in N and d.
Every time is given as p50 / p95 with the load average (``uptime``) before and after, since the
machine is shared. Synthesis also reports the acquisition value it reached (mean over proposals)
next to the best pool image's, so a faster synthesis that climbs less shows.

``--baseline DIR`` runs this script first on the source tree DIR (e.g. an unpacked ``git archive``
of an earlier commit, or another checkout) in a subprocess with DIR on the import path, so both
halves make the same measurements, and adds the ratio baseline / this tree. The readout rows time
one trial of a model (update, then its log evidence) for the protocol's default readout grid of
the measured tree and for a 4-point weight-scale grid.

    python benchmarks/population_costs.py [--baseline DIR] [--repeats 12] [--readout-only] > costs.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from population_common import CNN_A, CNN_B, GABOR, SYNTH, protocol_for

SYNTHESIS_CELLS = (("32x32_2models", [GABOR, CNN_A], 32), ("32x32_3models", [GABOR, CNN_A, CNN_B], 32),
                   ("64x64_2models", [GABOR, CNN_A], 64))


def load() -> float:
    return round(os.getloadavg()[0], 2)


def percentiles(samples: tuple[list[float], list[float]], digits: int = 3) -> dict[str, float]:
    wall, cpu = samples
    return {"p50": round(float(np.percentile(wall, 50)), digits), "p95": round(float(np.percentile(wall, 95)), digits),
            "cpu_p50": round(float(np.percentile(cpu, 50)), digits), "cpu_p95": round(float(np.percentile(cpu, 95)), digits)}


def timed(fn: Callable[[], Any], repeats: int, scale: float = 1000.0) -> tuple[list[float], list[float]]:
    """Wall-clock and this thread's CPU times of `repeats` calls (CPU time is what an idle machine
    would take, roughly: on a loaded one the wall clock also counts waiting for a core)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append((time.perf_counter() - t0) * scale)
        cpu.append((time.thread_time() - c0) * scale)
    return wall, cpu


def readout_grid_of(prior: dict[str, Any], n_units: int, d_raw: int) -> Any:
    """A model's readout grid for the readout prior `prior` (protocol keys), built with whichever API
    the measured tree has, so the baseline run measures the same grid."""
    from orchestrator.neural import comparison
    from orchestrator.protocol import ReadoutPrior, ReadoutSpec

    prior = {k: v for k, v in prior.items() if k in ReadoutPrior.model_fields}
    spec = type("Spec", (), {"readout": ReadoutSpec(prior=ReadoutPrior(**prior))})()
    if hasattr(comparison, "readout_grid"):
        grid = comparison.readout_grid(spec, n_units, d_raw)
        grid.set_scale(5.0)  # the first trial's spread of Poisson(5) counts
        return grid
    from orchestrator.neural.hyper import ReadoutGrid  # trees before the closed-form grid
    return ReadoutGrid(n_units, comparison.readout_priors(spec, d_raw))


def readout_costs() -> dict[str, Any]:
    from orchestrator.neural.readout import NIGPrior, PopulationReadout

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    prior = NIGPrior(np.r_[np.full(256, 256.0), 0.01], 2.0, 1.0)
    for n in (100, 1000):
        r = PopulationReadout(n, prior)
        X, Y = rng.standard_normal((300, 257)), rng.poisson(5, (300, n)).astype(float)
        rows = iter(zip(X, Y))
        out[f"readout_update_ms_N{n}_d257"] = percentiles(timed(lambda: r.update(*next(rows)), 300))
        st = r.state
        out[f"readout_state_bytes_N{n}_d257"] = int(st.S.nbytes + st.means.nbytes + st.a.nbytes + st.b.nbytes)
    grids = {"snr_grid4": {"weight_sd": [0.25, 0.5, 1.0, 2.0], "bias_sd": 10.0, "noise_levels": None},
             "default_grid": {}}  # the protocol default (the tree's own)
    for label, spec in grids.items():
        grid = readout_grid_of(spec, 100, 256)
        X, Y = rng.standard_normal((300, 257)), rng.poisson(5, (300, 100)).astype(float)
        rows = iter(zip(X, Y))

        def step() -> None:  # one trial: the update and the model's evidence after it
            grid.update(*next(rows))
            float(grid.log_evidence)

        out[f"readout_update_ms_N100_d257_{label}"] = percentiles(timed(step, 300))
        out[f"readout_components_N100_d257_{label}"] = int(len(grid.weights()))
    return out


def comparison_costs() -> dict[str, Any]:
    """One trial of a session's model comparison (3 models, N = 100, Poisson, features cached):
    every model's readout update, its evidence and its predictive-check scores."""
    from orchestrator.neural.comparison import PopulationComparison
    from orchestrator.neural.truth import build_population_truth

    protocol = protocol_for([GABOR, CNN_A, CNN_B], 100, noise="poisson", strategy="population_random_pool")
    base = PopulationComparison.from_protocol(protocol, 0)
    truth = build_population_truth(protocol, "cnn_a:ev=0.1,seed=1", base)
    comparison = base.fresh(0)
    rng = np.random.default_rng(1)
    images = iter(rng.integers(len(base.pool), size=400))

    def trial() -> None:
        image = int(next(images))
        ref = f"{image:064x}"
        comparison._cache.setdefault(ref, [c.features.pool_features[image].numpy() for c in comparison.candidates])
        y = truth.sample({}, rng, features=truth.features.pool_features[image].numpy())
        comparison.update({"image": ref}, y)
        comparison.leader()

    trial()  # the first trial sets the centre
    early = timed(trial, 10)  # the grid's posterior still broad: many components checked
    late = timed(trial, 100)
    return {"comparison_trial_ms_3models_N100_trials2to11": percentiles(early),
            "comparison_trial_ms_3models_N100_trials12to111": percentiles(late)}


def design_costs(repeats: int) -> dict[str, Any]:
    from orchestrator.design import make_design
    from orchestrator.neural.comparison import PopulationComparison
    from orchestrator.neural.truth import build_population_truth

    out: dict[str, Any] = {}
    for label, models, size in SYNTHESIS_CELLS:
        protocol = protocol_for(models, 100, size)
        base = PopulationComparison.from_protocol(protocol, 0)
        truth = build_population_truth(protocol, "cnn_a:ev=0.3,seed=1", base)
        comparison = base.fresh(0)
        for i in range(10):  # some data, so the models disagree
            img = base.pool[i]
            y = np.asarray(truth.sample({}, np.random.default_rng(i), pixels=img), float)
            comparison.update({"image": f"{i:064x}"}, y, pixels=img)
        pool_design = make_design(protocol, 0, "population_pool")
        snaps = pool_design.snapshots(comparison)
        pool_design.scores(comparison, snaps)  # the first call caches the pool's features
        if size == 32:
            out[f"score_pool1000_ms_{label}_N100"] = percentiles(
                timed(lambda: pool_design.scores(comparison, snaps), repeats), 2)
        synth = make_design(protocol, 0, "population_synthesis")
        synth.pipeline = False
        t0 = time.perf_counter()
        synth.propose(comparison, 99)  # the first proposal of a design also builds its caches
        out[f"synthesis_first_s_{label}"] = round(time.perf_counter() - t0, 3)
        reached, pool_best = [], []

        def propose() -> None:
            d = synth.propose(comparison, 100 + len(reached))
            reached.append(float(d.score))
            pool_best.append(float(d.info["best_pool_score"]))

        out[f"synthesis_s_{label}"] = percentiles(timed(propose, repeats, 1.0))
        out[f"synthesis_objective_{label}"] = {"reached_mean": round(float(np.mean(reached)), 5),
                                               "best_pool_mean": round(float(np.mean(pool_best)), 5)}
    return out


def measure(repeats: int, readout_only: bool = False) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    start = load()
    costs = {**readout_costs(), **comparison_costs(), **({} if readout_only else design_costs(repeats))}
    import orchestrator

    return {"load_start": start, "load_end": load(), "source": str(Path(orchestrator.__file__).parent.parent),
            "costs": costs}


def _ratio(base: Any, new: Any) -> Any:
    if isinstance(base, dict) and isinstance(new, dict):
        return {k: _ratio(base[k], new[k]) for k in new if k in base and "objective" not in k and "components" not in k}
    if isinstance(base, (int, float)) and isinstance(new, (int, float)) and new:
        return round(base / new, 2)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12, help="pool scorings and syntheses per cell")
    parser.add_argument("--baseline", type=Path, help="a source tree to measure first, for ratios")
    parser.add_argument("--readout-only", action="store_true",
                        help="only the readout and comparison rows (a minute, not ten)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch_threads": 1},
                              "settings": {"synthesis": SYNTH, "pool_images": 1000, "units": 100, "repeats": args.repeats}}
    if args.baseline is not None:
        env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve()), "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--repeats", str(args.repeats)]
                             + (["--readout-only"] if args.readout_only else []),
                             env=env, capture_output=True, text=True, check=True, cwd=str(args.baseline))
        result["baseline"] = {"tree": str(args.baseline), **json.loads(run.stdout)["this_tree"]}
    result["this_tree"] = measure(args.repeats, args.readout_only)
    if "baseline" in result:
        result["ratio_baseline_over_this"] = _ratio(result["baseline"]["costs"], result["this_tree"]["costs"])
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
