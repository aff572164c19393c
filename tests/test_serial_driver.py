"""The serial stimulator driver against a pseudo-terminal pair standing in for the device."""

from __future__ import annotations

import re
import os
import threading
import time
import tty
from typing import Iterator

import pytest

from rig_adapters.serial_driver import LineProtocolEmulator, SerialStimulator, format_train
from rig_adapters.stimulator import DeviceError, PulseTrain

pytest.importorskip("serial", reason="pyserial is not installed (pip install -e '.[psychopy]')")


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, str]]:
    """(master fd for the fake device, slave path for the driver)."""
    master, slave = os.openpty()
    tty.setraw(master)
    path = os.ttyname(slave)
    try:
        yield master, path
    finally:
        os.close(slave)
        os.close(master)


@pytest.fixture
def device(pty_pair: tuple[int, str]) -> Iterator[tuple[LineProtocolEmulator, str]]:
    master, path = pty_pair
    emu = LineProtocolEmulator(master, limits={"amplitude": (0, 100)}, time_scale=1.0).start()
    yield emu, path
    emu.stop()


def test_identify_and_deliver_over_a_real_tty(device: tuple[LineProtocolEmulator, str]) -> None:
    emu, path = device
    drv = SerialStimulator(path, timeout_s=2.0)
    try:
        assert drv.open() == "cloop line-protocol emulator v1"
        train = PulseTrain(amplitude=25.5, frequency=100, pulse_width=200, train_duration=50, channel=2)
        t0 = time.time()
        d = drv.deliver(train)
        assert t0 <= d.started_at <= d.finished_at
        assert d.finished_at - d.started_at == pytest.approx(0.05, abs=0.03)  # the device took the train's time
        d2 = drv.deliver(train)
        assert d2.device["seq"] == d.device["seq"] + 1
    finally:
        drv.close()
    assert emu.received == ["ID?", format_train(1, train), format_train(2, train)]
    assert emu.received[1] == "TRAIN 1 ch=2 amp=25.5 freq=100 pw=200 dur=50"


def test_device_error_reply_is_a_failed_trial(device: tuple[LineProtocolEmulator, str]) -> None:
    emu, path = device
    drv = SerialStimulator(path, timeout_s=2.0)
    drv.open()
    try:
        with pytest.raises(DeviceError, match="refused train 1: amplitude 500 outside device limit"):
            drv.deliver(PulseTrain(500, 100, 200, 10, 0))
    finally:
        drv.close()


def test_silent_device_times_out(pty_pair: tuple[int, str]) -> None:
    _master, path = pty_pair  # nobody answers on the master side
    drv = SerialStimulator(path, timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="did not answer within 0.3 s"):
        drv.open()
    assert time.monotonic() - t0 < 2
    drv.close()


def test_stale_reply_is_skipped(pty_pair: tuple[int, str]) -> None:
    """A late DONE for an earlier command must not complete the current one."""
    master, path = pty_pair
    lines: list[str] = []

    def device() -> None:
        buf = b""
        while len(lines) < 2:
            buf += os.read(master, 1024)
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                lines.append(raw.decode())
                if raw == b"ID?":
                    os.write(master, b"ID picky\n")
                else:
                    seq = raw.split()[1].decode()
                    os.write(master, b"DONE 99\nACK 99\n" + f"ACK {seq}\n".encode())
                    time.sleep(0.05)
                    os.write(master, f"DONE {seq}\n".encode())

    t = threading.Thread(target=device, daemon=True)
    t.start()
    drv = SerialStimulator(path, timeout_s=2.0)
    assert drv.open() == "picky"
    d = drv.deliver(PulseTrain(1, 10, 100, 1, 0))
    assert d.finished_at - d.started_at >= 0.04  # waited for its own DONE, not the stale one
    drv.close()
    t.join(timeout=2)


def test_unopenable_port_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="cannot open stimulator port /dev/does-not-exist"):
        SerialStimulator("/dev/does-not-exist").open()


def test_stimulator_adapter_with_serial_driver_end_to_end(device: tuple[LineProtocolEmulator, str],
                                                          tmp_path) -> None:
    """rig config -> adapter -> pyserial -> tty -> device, and a refused command never hits the wire."""
    import yaml

    from orchestrator.messages import Trial
    from rig_adapters.base import SessionInfo
    from rig_adapters.stimulator import StimulatorAdapter, StimulusRefused
    from test_stimulator import PROTOCOL, FixedResponse, LIMITS
    from rig_adapters.rig_config import load_rig_config

    emu, path = device
    cfg = tmp_path / "rig.yaml"
    cfg.write_text(yaml.safe_dump({"stimulator": {"driver": "serial", "port": path, "limits": LIMITS}}))
    adapter = StimulatorAdapter(load_rig_config(cfg), FixedResponse())
    adapter.start(SessionInfo(session_id="s1", protocol_text=PROTOCOL, rig_id="r"))
    ok = Trial(trial_id=1, attempt=1, index=0, session_id="s1", stimulus={"amplitude": 10.0, "frequency": 50.0},
               stimulus_type="pulse_train", response_kind="bernoulli", timeout_s=5)
    res = adapter.present(ok)
    assert res.meta["device"] == "cloop line-protocol emulator v1"
    bad = ok.model_copy(update={"stimulus": {"amplitude": 60.0, "frequency": 50.0}, "trial_id": 2})
    with pytest.raises(StimulusRefused):
        adapter.present(bad)
    adapter.close()
    trains = [l for l in emu.received if l.startswith("TRAIN")]
    assert trains == ["TRAIN 1 ch=0 amp=10 freq=50 pw=200 dur=20"]


def test_train_line_uses_plain_decimals_never_exponents() -> None:
    from rig_adapters.serial_driver import plain_decimal

    line = format_train(3, PulseTrain(amplitude=0.00005, frequency=1e6, pulse_width=0.1, train_duration=1234567.0))
    assert line == "TRAIN 3 ch=0 amp=0.00005 freq=1000000 pw=0.1 dur=1234570"
    assert not re.search(r"\d[eE][+-]?\d", line)
    assert [plain_decimal(x) for x in (1e-7, 25.5, 100.0, 123.456789)] == ["0.0000001", "25.5", "100", "123.457"]
