"""PsychoPy display adapter: draws visual stimuli frame by frame and times every flip.

``cloop rig --adapter psychopy -o response=simulated --truth ... -o rig_config=rig.yaml``

One trial: resolve the stimulus (trial values over the protocol's ``stimulus.fixed`` over type
defaults), draw it for ``n = round(duration_s * refresh)`` frames, then flip back to the background.
The offset is time-locked: after a late flip the next flip shows the frame due at that time, so
the stimulus still lasts ``n`` refreshes; frames that never appeared are reported as skipped.
Every flip is timestamped (``Window.flip()`` returns the flip time on PsychoPy's clock; it is
mapped to epoch seconds). Reported per trial: ``timing`` carries the onset/offset flip times
(``presented_at`` = onset flip); the response payload carries frames requested, shown, skipped and
measured (offset - onset in refreshes), dropped frames (intervals longer than
``dropped_frame_tolerance`` refresh periods; PsychoPy's own count over the same flips alongside)
and the interval statistics. An optional photodiode patch is white exactly while the stimulus is on.
An image stimulus sent as pixels (``{"image": {"sha256", "shape", "dtype", "data"}}``, see
:mod:`orchestrator.wire_images`) is verified against its hash, checked against the rig config's
``image_limits`` (pixel range, mean luminance, RMS contrast: a trial outside them is refused with the
reason, code ``refused``) and shown pixel for pixel (:class:`stimuli.draw.PixelImage`).
Escape (rig config ``keyboard.abort_key``) aborts the trial: :class:`TrialAborted` is raised,
nothing is recorded for it, and the worker reports it with code ``aborted``.

Virtual displays (Xvfb) have no vertical blank, so flips return immediately; set
``display.software_vsync: true`` there to pace flips on the nominal refresh grid.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

from orchestrator.messages import Trial
from orchestrator.wire_images import image_array
from rig_adapters.base import Adapter, AdapterError, AdapterResult, SessionInfo, StimulusRefused
from rig_adapters.responses import (
    KeyboardPoller,
    ResponseSource,
    ResponseTimeout,
    TrialAborted,
    make_response_source,
)
from rig_adapters.rig_config import RigConfig, RigConfigError, load_rig_config
from stimuli import StimulusParameterError, UnknownStimulusType, get_stimulus_type, stimulus_type_names

__all__ = ["PsychoPyDisplayAdapter", "open_window", "FrameClock"]

_CORNERS = {"top-left": (-1, 1), "top-right": (1, 1), "bottom-left": (-1, -1), "bottom-right": (1, -1)}


def open_window(rig: RigConfig) -> Any:
    """A PsychoPy window in degrees, with the rig's monitor profile (imports PsychoPy)."""
    from psychopy import logging as plog
    from psychopy import monitors, visual

    from stimuli.draw import luminance_to_rgb

    plog.console.setLevel(plog.ERROR)  # dropped frames are counted and reported per trial instead
    mon = monitors.Monitor(rig.monitor.name, width=rig.monitor.width_cm, distance=rig.monitor.distance_cm,
                           autoLog=False)
    mon.setSizePix(list(rig.monitor.resolution))
    d = rig.display
    return visual.Window(size=list(d.size), screen=d.screen, fullscr=d.fullscreen, monitor=mon, units="deg",
                         color=luminance_to_rgb(d.background), colorSpace="rgb", winType="pyglet",
                         allowGUI=False, waitBlanking=d.wait_blanking, checkTiming=False, autoLog=False)


class FrameClock:
    """Flips a window and returns epoch timestamps; paces flips when the display cannot."""

    def __init__(self, win: Any, refresh_hz: float, software_vsync: bool) -> None:
        from psychopy import logging as plog

        self.win = win
        self.period = 1.0 / refresh_hz
        self.software_vsync = software_vsync
        self._clock = plog.defaultClock
        self._next: float | None = None
        self._anchor: float | None = None

    def offset(self) -> float:
        """epoch - PsychoPy clock, sampled now (both clocks run at the same rate over a trial)."""
        return time.time() - self._clock.getTime()

    def flip(self) -> float:
        """Flip; return the flip time on PsychoPy's clock."""
        if self.software_vsync and self._next is not None:
            target = self._next
            while True:
                remaining = target - self._clock.getTime()
                if remaining <= 0:
                    break
                if remaining > 0.002:
                    time.sleep(remaining - 0.0015)
        t = self.win.flip()
        if t is None:  # waitBlanking=False: PsychoPy returns no time
            t = self._clock.getTime()
        if self.software_vsync:
            # a fixed grid, like a display's vertical blanks: the slot after the one this flip
            # landed in (a flip more than half a period late belongs to the following slot)
            if self._anchor is None:
                self._anchor = t
            slot = round((t - self._anchor) / self.period)
            self._next = self._anchor + (slot + 1) * self.period
        return float(t)

    def reset(self) -> None:
        """Start a new grid at the next flip (once per trial)."""
        self._next = None
        self._anchor = None


class PsychoPyDisplayAdapter(Adapter):
    """Presents visual stimuli from ``stimuli/`` in a PsychoPy window; answers via a response source."""

    name = "psychopy"

    def __init__(self, rig: RigConfig, response: ResponseSource, *, software_vsync: bool | None = None) -> None:
        self.rig = rig
        self.response = response
        self.software_vsync = rig.display.software_vsync if software_vsync is None else bool(software_vsync)
        self.win: Any = None
        self.frames: FrameClock | None = None
        self.keys: KeyboardPoller | None = None
        self.refresh_hz: float | None = rig.monitor.refresh_hz
        self._fixed: dict[str, Any] = {}
        self._duration_s: float | None = None
        self._stim_type: str | None = None
        self._screenshots_left = rig.display.screenshots if rig.display.screenshot_dir else 0
        self._pd_on: Any = None
        self._pd_off: Any = None
        self.trials_presented = 0

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "PsychoPyDisplayAdapter":
        import importlib.util

        if importlib.util.find_spec("psychopy") is None:
            raise AdapterError("the psychopy adapter needs PsychoPy: see docs/install-psychopy.md")
        allowed = {"rig_config", "response", "truth", "seed", "software_vsync", "trial_seconds"}
        unknown = set(options) - allowed
        if unknown:
            raise AdapterError(f"the psychopy adapter has no option(s) {sorted(unknown)} (known: {sorted(allowed)})")
        try:
            rig = load_rig_config(options.get("rig_config") or None)
        except RigConfigError as exc:
            raise AdapterError(str(exc)) from None
        try:
            seed = int(options.get("seed") or 0)
        except ValueError:
            raise AdapterError(f"option seed={options['seed']!r} is not an integer") from None
        source = make_response_source(options.get("response") or "keyboard", rig=rig,
                                      truth=options.get("truth"), seed=seed)
        vsync = options.get("software_vsync")
        return cls(rig, source, software_vsync=None if vsync is None else vsync.lower() in ("1", "true", "yes"))

    def capabilities(self) -> dict[str, list[str]]:
        visual = [n for n in stimulus_type_names() if get_stimulus_type(n).modality == "visual"]
        return {"stimulus_types": visual, "response_kinds": list(self.response.response_kinds)}

    # ------------------------------------------------------------------ session

    def open(self) -> None:
        """Open the window (main thread) and measure or adopt the refresh rate."""
        if self.win is not None:
            return
        self.win = open_window(self.rig)
        if self.refresh_hz is None:
            measured = self.win.getActualFrameRate(nIdentical=10, nMaxFrames=120, nWarmUpFrames=10, threshold=1)
            self.refresh_hz = float(measured) if measured else 60.0
        self.frames = FrameClock(self.win, self.refresh_hz, self.software_vsync)
        self._make_photodiode()
        watch = tuple(dict.fromkeys(self.response.watch_keys + (self.rig.keyboard.abort_key,)))
        self.keys = KeyboardPoller(watch, backend=self.rig.keyboard.backend)
        if self.response.abort_key is None:
            self.response.abort_key = self.rig.keyboard.abort_key
        self.frames.flip()

    def _make_photodiode(self) -> None:
        pd = self.rig.display.photodiode
        if not pd.enabled:
            return
        from psychopy import visual

        w, h = self.win.size
        sx, sy = _CORNERS[pd.corner]
        pos = (sx * (w / 2 - pd.size_px / 2), sy * (h / 2 - pd.size_px / 2))
        common = dict(units="pix", width=pd.size_px, height=pd.size_px, pos=pos, lineColor=None, colorSpace="rgb")
        self._pd_on = visual.Rect(self.win, fillColor=(1, 1, 1), **common)
        self._pd_off = visual.Rect(self.win, fillColor=(-1, -1, -1), **common)

    def start(self, session: SessionInfo) -> None:
        from orchestrator.protocol import parse_protocol_text

        protocol = parse_protocol_text(session.protocol_text, source=f"<session {session.session_id}>", checks=()).protocol
        try:
            stype = get_stimulus_type(protocol.stimulus.type)
        except UnknownStimulusType as exc:
            raise AdapterError(str(exc)) from None
        if stype.modality != "visual":
            raise AdapterError(f"the psychopy adapter draws visual stimuli; {stype.name!r} is {stype.modality}")
        self._stim_type = stype.name
        self._fixed = dict(getattr(protocol.stimulus, "fixed", None) or {})  # image spaces have none
        self._duration_s = protocol.stimulus.duration_s or stype.default_duration_s
        self.open()
        self.response.start(session)

    def configure(self, *, stimulus_type: str, fixed: dict[str, Any] | None = None,
                  duration_s: float | None = None) -> None:
        """Set what `start` takes from a protocol, for use without an orchestrator (benchmarks)."""
        stype = get_stimulus_type(stimulus_type)
        self._stim_type = stype.name
        self._fixed = dict(fixed or {})
        self._duration_s = duration_s or stype.default_duration_s
        self.open()

    # ------------------------------------------------------------------ trial

    def _draw_photodiode(self, on: bool) -> None:
        if self._pd_on is not None:
            (self._pd_on if on else self._pd_off).draw()

    def _keys(self) -> None:
        assert self.keys is not None
        self.response.offer_keys(self.keys.poll())

    def _drawable(self, cmd: Trial) -> tuple[Any, dict[str, Any], float | None]:
        """What to draw for ``cmd``, the parameters to record with it, and the type's default duration."""
        from stimuli.draw import PixelImage, build_drawable

        if isinstance(cmd.stimulus.get("image"), dict):  # pixels on the wire
            pixels = image_array(cmd.stimulus["image"], "stimulus.image")
            problems = self.rig.image_limits.violations(pixels)
            if problems:
                raise StimulusRefused("refused by rig image limits: " + "; ".join(problems))
            try:
                drawable = PixelImage(self.win, pixels)
            except StimulusParameterError as exc:
                raise StimulusRefused(f"cannot show trial {cmd.trial_id}: {exc}") from None
            recorded = {k: v for k, v in cmd.stimulus.items() if k != "image"}
            recorded["image"] = {"sha256": cmd.stimulus["image"]["sha256"], "shape": list(pixels.shape)}
            return drawable, recorded, None
        try:
            stype = get_stimulus_type(cmd.stimulus_type)
        except UnknownStimulusType as exc:
            raise AdapterError(str(exc)) from None
        if stype.modality != "visual":
            raise AdapterError(f"the psychopy adapter cannot present {stype.name!r} ({stype.modality})")
        fixed = self._fixed if stype.name == self._stim_type else {}
        try:
            params = stype.resolve(cmd.stimulus, fixed)
            drawable = build_drawable(self.win, stype, params, refresh_hz=self.refresh_hz,
                                      image_dir=self.rig.display.image_dir)
        except StimulusParameterError as exc:
            raise AdapterError(f"cannot draw trial {cmd.trial_id}: {exc}") from None
        return drawable, _plain(params), stype.default_duration_s

    def present(self, cmd: Trial) -> AdapterResult:
        if self.win is None or self.frames is None or self.refresh_hz is None:
            raise AdapterError("no session started: the psychopy window is not open")
        drawable, recorded, default_duration = self._drawable(cmd)
        duration = self._duration_s or default_duration or 0.5
        n_frames = max(1, int(round(duration * self.refresh_hz)))

        assert self.keys is not None
        # keys pressed since the last trial are stale as responses, but an abort key among them
        # means the operator wants to stop: honour it before showing anything
        stale = self.keys.poll()
        if any(k.name == self.rig.keyboard.abort_key for k in stale):
            raise TrialAborted(f"trial aborted by the operator ({self.rig.keyboard.abort_key} pressed before onset)")
        frames = self.frames
        flips: list[float] = []
        screenshot: str | None = None
        payload: dict[str, Any] | None = None
        period = 1.0 / self.refresh_hz
        tolerance = self.rig.display.dropped_frame_tolerance
        frames.reset()
        frames.flip()  # align to a frame boundary so the onset is a clean frame
        offset = frames.offset()
        # PsychoPy's own dropped-frame count over the same flips, as a cross-check of ours
        self.win.refreshThreshold = tolerance * period
        self.win.frameIntervals = []
        dropped_before = self.win.nDroppedFrames
        self.win.recordFrameIntervals = True  # the onset flip starts the record (not an interval)
        frame = 0
        while True:
            drawable.draw(frame)
            self._draw_photodiode(True)
            flips.append(frames.flip())
            if frame == 0:
                self.response.begin(cmd, flips[0] + offset)
            # only the keyboard is read while the stimulus is on: anything slower (a simulated
            # subject's model, draining a stream) waits for the offset so no frame is late
            self._keys_or_abort()
            # time-locked: the next flip shows the frame due then, so a late frame shortens
            # nothing and lengthens nothing; frames that never appeared are counted as skipped
            frame = max(frame + 1, int(round((flips[-1] - flips[0]) / period)) + 1)
            if frame >= n_frames:
                break
        self._draw_photodiode(False)
        t_off = frames.flip()
        self.win.recordFrameIntervals = False
        psychopy_dropped = self.win.nDroppedFrames - dropped_before
        onset, offset_t = flips[0] + offset, t_off + offset

        intervals = [b - a for a, b in zip(flips, flips[1:] + [t_off])]
        dropped = sum(1 for d in intervals if d > tolerance * period)
        if self._screenshots_left > 0:
            # redraw the first frame off-screen now: reading pixels back during the stimulus
            # would make its frames late
            drawable.draw(0)
            self._draw_photodiode(True)
            screenshot = self._save_screenshot(cmd)
            self.win.clearBuffer()
        # wait for the response, keeping the background up and the keyboard polled
        deadline = onset + cmd.timeout_s
        while payload is None:
            payload = self.response.poll(time.time())
            if payload is not None:
                break
            if time.time() > deadline:
                raise ResponseTimeout(f"no response within {cmd.timeout_s:g} s of onset")
            self._draw_photodiode(False)
            frames.flip()
            self._keys_or_abort()
        for _ in range(self.rig.display.inter_trial_frames - 1):
            self._draw_photodiode(False)
            frames.flip()
        self.trials_presented += 1

        responded_at = float(payload.pop("responded_at", time.time()))
        # timing holds epoch timestamps only (the orchestrator maps them onto its clock); the
        # frame statistics travel with the response, so they are stored with the trial
        timing: dict[str, float | None] = {
            "presented_at": onset,
            "responded_at": responded_at,
            "onset_flip": onset,
            "offset_flip": offset_t,
        }
        frame_stats: dict[str, Any] = {
            "stimulus_duration_s": offset_t - onset,
            "frames_requested": n_frames,
            "frames_shown": len(flips),
            "frames_skipped": n_frames - len(flips),
            "frames_measured": int(round((offset_t - onset) / period)),
            "dropped_frames": dropped,
            "dropped_frames_psychopy": int(psychopy_dropped),
            "frame_interval_mean_ms": statistics.fmean(intervals) * 1000.0,
            "frame_interval_max_ms": max(intervals) * 1000.0,
            "frame_interval_sd_ms": (statistics.pstdev(intervals) * 1000.0) if len(intervals) > 1 else 0.0,
            "refresh_hz": float(self.refresh_hz),
        }
        payload.update(frame_stats)
        meta: dict[str, Any] = {"adapter": self.name, "stimulus_type": cmd.stimulus_type,
                                "resolved_stimulus": recorded, "response_source": self.response.name,
                                "software_vsync": self.software_vsync}
        if screenshot:
            meta["screenshot"] = screenshot
        return AdapterResult(response=payload, timing=timing, meta=meta)

    def _keys_or_abort(self) -> None:
        try:
            self._keys()
        except TrialAborted:
            assert self.frames is not None
            self.win.recordFrameIntervals = False
            self._draw_photodiode(False)
            self.frames.flip()  # take the stimulus off before reporting
            raise

    def _save_screenshot(self, cmd: Trial) -> str:
        """Save the back buffer (the stimulus's first frame, redrawn) as PNG."""
        out_dir = Path(self.rig.display.screenshot_dir)  # type: ignore[arg-type]
        out_dir.mkdir(parents=True, exist_ok=True)
        image = self.win.getMovieFrame(buffer="back")
        self.win.movieFrames.clear()
        path = out_dir / f"{cmd.stimulus_type}_trial{cmd.index:04d}.png"
        image.save(path)
        self._screenshots_left -= 1
        return str(path)

    def close(self) -> None:
        try:
            self.response.close()
        finally:
            if self.win is not None:
                self.win.close()
                self.win = None


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out
