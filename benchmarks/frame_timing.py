"""Frame timing of the PsychoPy display adapter: N presentations, every flip timestamped.

    python benchmarks/frame_timing.py                       # starts its own Xvfb if needed
    python benchmarks/frame_timing.py --n 300 --frames 2 --refresh 60 --json benchmarks/out/frame_timing.json

Two modes are measured with the real adapter (`PsychoPyDisplayAdapter.present`, drifting grating):

- ``paced``: flips paced on a nominal refresh grid (``display.software_vsync``), as the display
  tests run on Xvfb. Reports stimulus duration error, frame-interval spread and dropped frames
  (interval > 1.2 periods, counted by the adapter and by PsychoPy's own ``nDroppedFrames``).
- ``free``: no pacing, flips as fast as the virtual display allows: what one flip costs here.
- ``image``: paced, a new 256 x 256 RGB image per presentation sent as pixels through the wire
  format (encode, decode, sha256 check, rig image limits, texture upload, shown pixel for pixel);
  ``prepare_ms`` is the time from the call to the onset flip.

On a real monitor with vsync the same report comes from the hardware's vertical blank; Xvfb has
none, so these figures measure this machine's scheduling and software rendering, not a display.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ensure_display() -> subprocess.Popen | None:
    """Use $DISPLAY if set, else start a private Xvfb (killed on exit)."""
    if os.environ.get("DISPLAY"):
        return None
    if not shutil.which("Xvfb"):
        sys.exit("no $DISPLAY and no Xvfb (apt-get install -y xvfb libgl1-mesa-dri)")
    for n in range(120, 200):
        if not Path(f"/tmp/.X{n}-lock").exists() and not Path(f"/tmp/.X11-unix/X{n}").exists():
            break
    proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "1024x768x24", "-nolisten", "tcp", "-noreset"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{n}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.environ["DISPLAY"] = f":{n}"
    # stop Xvfb after we exit (stopping it earlier makes Xlib abort on the still-open connection)
    subprocess.Popen(["sh", "-c", f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 0.5; done; kill {proc.pid}"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    return proc


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[k]


def run_mode(n: int, frames: int, refresh: float, paced: bool, images: bool = False) -> dict[str, Any]:
    import numpy as np

    from orchestrator import messages as m
    from orchestrator.messages import Trial
    from orchestrator.wire_images import image_payload
    from rig_adapters.psychopy_display import PsychoPyDisplayAdapter
    from rig_adapters.responses import ResponseSource
    from rig_adapters.rig_config import RigConfig

    class Instant(ResponseSource):
        name = "instant"

        def begin(self, cmd: Trial, onset: float) -> None:
            pass

        def poll(self, now: float) -> dict[str, Any] | None:
            return {"value": 1}

    rig = RigConfig.model_validate({
        "monitor": {"distance_cm": 57, "width_cm": 40, "resolution": [1024, 768], "refresh_hz": refresh},
        "display": {"size": [800, 600], "software_vsync": paced, "photodiode": {"enabled": True}},
    })
    adapter = PsychoPyDisplayAdapter(rig, Instant())
    adapter.configure(stimulus_type="grating", fixed={"sf": 1.0, "size": 10, "drift": 2.0},
                      duration_s=frames / refresh)
    rows = []
    prepare_ms: list[float] = []
    rng = np.random.default_rng(0)
    t0 = time.monotonic()
    for i in range(n):
        if images:
            pixels = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
            called = time.time()
            cmd = m.decode(m.encode(Trial(trial_id=i, attempt=1, index=i, session_id="bench", response_kind="bernoulli",
                                          timeout_s=5, stimulus={"image": image_payload(pixels)},
                                          stimulus_type="image")))
        else:
            called = time.time()
            cmd = Trial(trial_id=i, attempt=1, index=i, session_id="bench", response_kind="bernoulli", timeout_s=5,
                        stimulus={"orientation": float(i * 7 % 180), "contrast": 0.8}, stimulus_type="grating")
        res = adapter.present(cmd)
        prepare_ms.append((res.timing["onset_flip"] - called) * 1000)
        rows.append({**res.timing, **res.response})
    elapsed = time.monotonic() - t0
    adapter.close()
    period_ms = 1000.0 / refresh
    out: dict[str, Any] = {
        "mode": "image" if images else ("paced" if paced else "free"),
        "presentations": n,
        "frames_per_presentation": frames,
        "elapsed_s": round(elapsed, 2),
        "frame_interval_ms": {"mean": round(statistics.fmean(r["frame_interval_mean_ms"] for r in rows), 3),
                              "mean_sd_within_trial": round(statistics.fmean(r["frame_interval_sd_ms"] for r in rows), 3),
                              "worst": round(max(r["frame_interval_max_ms"] for r in rows), 3)},
    }
    if not paced:  # no refresh grid: only what a flip costs
        out["flips_per_s"] = round(1000.0 / out["frame_interval_ms"]["mean"], 1)
        return out
    durations = [(r["offset_flip"] - r["onset_flip"]) * 1000 for r in rows]
    errors = [d - frames * period_ms for d in durations]
    out.update({
        "nominal_refresh_hz": refresh,
        "duration_ms": {"nominal": round(frames * period_ms, 3), "median": round(statistics.median(durations), 3),
                        "sd": round(statistics.pstdev(durations), 3), "p95": round(percentile(durations, 95), 3),
                        "max": round(max(durations), 3)},
        "duration_error_ms": {"mean": round(statistics.fmean(errors), 3),
                              "median_abs": round(statistics.median(abs(e) for e in errors), 3),
                              "abs_p95": round(percentile([abs(e) for e in errors], 95), 3)},
        "exact_frames_fraction": round(sum(r["frames_measured"] == frames for r in rows) / n, 4),
        "frames_skipped": int(sum(r["frames_skipped"] for r in rows)),
        "dropped_frames": int(sum(r["dropped_frames"] for r in rows)),
        "dropped_frames_psychopy": int(sum(r["dropped_frames_psychopy"] for r in rows)),
        "intervals_total": n * frames,
        "prepare_ms": {"median": round(statistics.median(prepare_ms), 2), "p95": round(percentile(prepare_ms, 95), 2)},
        "presentations_with_drops": sum(1 for r in rows if r["dropped_frames"] > 0),
    })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="presentations per mode")
    ap.add_argument("--frames", type=int, default=2, help="frames per presentation")
    ap.add_argument("--refresh", type=float, default=60.0, help="nominal refresh rate (Hz) for the paced mode")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    ensure_display()
    results = [run_mode(args.n, args.frames, args.refresh, paced=True),
               run_mode(args.n, args.frames, args.refresh, paced=False),
               run_mode(args.n, args.frames, args.refresh, paced=True, images=True)]
    load = os.getloadavg()
    import psychopy

    report = {"machine": {"cpus": os.cpu_count(), "loadavg_1m": round(load[0], 2), "display": os.environ["DISPLAY"],
                          "psychopy": psychopy.__version__},
              "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


if __name__ == "__main__":
    main()
