"""Population response storage: write time per trial, database size and read time (JSON on stdout).

Writes a session of N units x T trials through the real `TrialStore` API (plan_trial, then
complete_trial with an ndarray value: one transaction each, as the engine does), on SQLite
and/or PostgreSQL, then reads the whole trials x units array back with
`analysis.population_responses`. Sizes: the SQLite file after a WAL checkpoint; on PostgreSQL
the database and the population_responses table (TOAST included).

    python benchmarks/population_storage.py --units 1000 --trials 10000 --db-kind both
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from orchestrator import analysis
from orchestrator import store as st

PG_ADMIN_URL = os.environ.get("CLOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def database(kind: str) -> Iterator[str]:
    """A fresh database of the given kind, removed afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            url = f"sqlite:///{Path(d) / 'population.db'}"
            st.upgrade(url)
            yield url
        return
    from sqlalchemy import create_engine, text

    name = f"cloop_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        st.upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class _Loaded:
    def __init__(self, n_units: int) -> None:
        import hashlib
        import types

        self.text = f"name: population-bench\nresponse: {{kind: population, units: {n_units}}}\n"
        self.sha256 = hashlib.sha256(self.text.encode()).hexdigest()
        self.protocol = types.SimpleNamespace(name="population-bench", version="1")


def _sizes(url: str) -> dict[str, float]:
    from sqlalchemy import text

    engine = st.make_engine(url)
    try:
        with engine.connect() as conn:
            if st.is_sqlite(url):
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
                path = st.sqlite_path(url)
                return {"db_mb": path.stat().st_size / 1e6}
            db = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
            table = conn.execute(text("SELECT pg_total_relation_size('population_responses')")).scalar_one()
            return {"db_mb": db / 1e6, "population_table_mb": table / 1e6}
    finally:
        engine.dispose()


def run(kind: str, n_units: int, n_trials: int, dtype: str, mask_fraction: float, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    with database(kind) as url:
        with st.TrialStore(url) as store:
            pid = store.add_protocol(_Loaded(n_units))
            sid = store.create_session(protocol_id=pid, subject_id=store.subject("bench"), seed=seed)
            complete_ms: list[float] = []
            trial_ms: list[float] = []
            masked = 0
            t_start = time.perf_counter()
            for i in range(n_trials):
                value = rng.poisson(5.0, size=n_units).astype(dtype)
                value[rng.random(n_units) < mask_fraction] = np.nan
                masked += int(np.isnan(value).sum())
                outcome = {"rig_id": "rig-bench", "attempt": 1, "response": {"value": None},
                           "timing": {"presented_at": 100.0 + i}, "mapped_timing": {"presented_at": time.time()}}
                t0 = time.perf_counter()
                tid = store.plan_trial(sid, i, {"stimulus": {"image": f"{i:064x}"}, "strategy": "bench"})
                t1 = time.perf_counter()
                store.complete_trial(tid, outcome, value, None)
                t2 = time.perf_counter()
                complete_ms.append((t2 - t1) * 1e3)
                trial_ms.append((t2 - t0) * 1e3)
            write_s = time.perf_counter() - t_start
        t0 = time.perf_counter()
        meta, arr = analysis.population_responses(url, sid)
        read_s = time.perf_counter() - t0
        assert arr.shape == (n_trials, n_units) and int(np.isnan(arr).sum()) == masked == int(meta["n_masked"].sum())
        sizes = _sizes(url)
    raw_mb = n_trials * n_units * np.dtype(dtype).itemsize / 1e6
    return {
        "db": kind, "units": n_units, "trials": n_trials, "dtype": dtype, "masked_units": masked,
        "complete_trial_ms": {"mean": statistics.fmean(complete_ms), "p50": float(np.percentile(complete_ms, 50)),
                              "p95": float(np.percentile(complete_ms, 95)), "max": max(complete_ms)},
        "plan_plus_complete_ms": {"mean": statistics.fmean(trial_ms), "p95": float(np.percentile(trial_ms, 95))},
        "write_total_s": write_s,
        "read_all_s": read_s,
        "raw_array_mb": raw_mb,
        **sizes,
        "db_mb_per_1000_trials": sizes["db_mb"] / n_trials * 1000,
        "load_avg_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--db-kind", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--mask-fraction", type=float, default=0.01, help="share of units masked (NaN) per trial")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    kinds = ("sqlite", "postgres") if args.db_kind == "both" else (args.db_kind,)
    results = [run(k, args.units, args.trials, args.dtype, args.mask_fraction, args.seed) for k in kinds]
    json.dump({"benchmark": "population_storage", "results": results}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
