"""Serial (pyserial) driver for stimulators speaking cloop's simple line protocol.

ASCII lines ending in ``\\n``; the host sends one command at a time, each with a sequence number
so a late reply to an earlier command can never be mistaken for the current one::

    host -> device                                        device -> host
    ID?                                                   ID <free text>
    TRAIN <seq> ch=<int> amp=<uA> freq=<Hz> pw=<us> dur=<ms>
                                                          ACK <seq>          (train started)
                                                          DONE <seq>         (train finished)
                                                       or ERR <seq> <reason> (refused / failed)
    STOP                                                  STOPPED

Firmware should enforce its own limits too and answer ``ERR``; the host never relies on that.
:class:`LineProtocolEmulator` is a device written to this spec (used by the tests over a
pseudo-terminal pair and for rehearsing a rig without the hardware).
"""

from __future__ import annotations

import os
import re
import threading
import time
from decimal import Decimal
from typing import Any

from rig_adapters.stimulator_device import Delivery, DeviceError, PulseTrain, StimulatorDevice

__all__ = ["SerialStimulator", "LineProtocolEmulator", "format_train", "plain_decimal"]

_TRAIN = re.compile(
    r"^TRAIN (\d+) ch=(\d+) amp=([0-9.eE+-]+) freq=([0-9.eE+-]+) pw=([0-9.eE+-]+) dur=([0-9.eE+-]+)$")


def plain_decimal(value: float) -> str:
    """``value`` to 6 significant digits in plain decimal (``0.00005``, never ``5e-05``): simple firmware
    parsers read digits and one point, not exponents."""
    return format(Decimal(f"{value:.6g}"), "f")


def format_train(seq: int, train: PulseTrain) -> str:
    """The TRAIN command line (without newline); numbers in plain decimal."""
    return (f"TRAIN {seq} ch={train.channel} amp={plain_decimal(train.amplitude)} "
            f"freq={plain_decimal(train.frequency)} pw={plain_decimal(train.pulse_width)} "
            f"dur={plain_decimal(train.train_duration)}")


class SerialStimulator(StimulatorDevice):
    """Drives a line-protocol stimulator on a serial port (or any pyserial URL)."""

    def __init__(self, port: str, *, baudrate: int = 115200, timeout_s: float = 2.0) -> None:
        self.port = port
        self.baudrate = baudrate
        self.timeout_s = timeout_s
        self._serial: Any = None
        self._seq = 0
        self.identity: str | None = None

    def open(self) -> str:
        import serial

        try:
            self._serial = serial.serial_for_url(self.port, baudrate=self.baudrate, timeout=0.05,
                                                 write_timeout=self.timeout_s)
        except (serial.SerialException, ValueError) as exc:
            raise DeviceError(f"cannot open stimulator port {self.port}: {exc}") from None
        self._serial.reset_input_buffer()
        self._send("ID?")
        line = self._read_line(time.monotonic() + self.timeout_s)
        if not line.startswith("ID "):
            raise DeviceError(f"stimulator on {self.port} answered {line!r} to ID? (expected 'ID ...')")
        self.identity = line[3:].strip()
        return self.identity

    def _send(self, line: str) -> None:
        if self._serial is None:
            raise DeviceError("stimulator port is not open")
        try:
            self._serial.write((line + "\n").encode("ascii"))
            self._serial.flush()
        except Exception as exc:  # SerialException, SerialTimeoutException, OSError
            raise DeviceError(f"write to {self.port} failed: {exc}") from None

    def _read_line(self, deadline: float) -> str:
        buf = b""
        while time.monotonic() < deadline:
            try:
                chunk = self._serial.readline()
            except Exception as exc:
                raise DeviceError(f"read from {self.port} failed: {exc}") from None
            buf += chunk
            if buf.endswith(b"\n"):
                return buf.decode("ascii", errors="replace").strip()
        raise DeviceError(f"stimulator on {self.port} did not answer within {self.timeout_s:g} s"
                          + (f" (partial reply {buf!r})" if buf else ""))

    def _expect(self, seq: int, deadline: float, want: str) -> str:
        """Next reply for `seq`; replies for other sequence numbers are stale and skipped."""
        while True:
            line = self._read_line(deadline)
            parts = line.split(" ", 2)
            if len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) != seq:
                continue
            if parts[0] == want and len(parts) >= 2:
                return line
            if parts[0] == "ERR":
                raise DeviceError(f"stimulator refused train {seq}: {parts[2] if len(parts) > 2 else 'no reason'}")
            raise DeviceError(f"unexpected reply {line!r} (waiting for {want} {seq})")

    def deliver(self, train: PulseTrain) -> Delivery:
        self._seq += 1
        seq = self._seq
        self._send(format_train(seq, train))
        self._expect(seq, time.monotonic() + self.timeout_s, "ACK")
        started = time.time()
        self._expect(seq, time.monotonic() + train.train_duration / 1000.0 + self.timeout_s, "DONE")
        return Delivery(started, time.time(), {"seq": seq})

    def stop(self) -> None:
        if self._serial is not None:
            try:
                self._send("STOP")
            except DeviceError:
                pass

    def close(self) -> None:
        if self._serial is not None:
            self._serial.close()
            self._serial = None


class LineProtocolEmulator:
    """A device on the far side of a file descriptor (e.g. a pty master), written to the spec above.

    ``limits`` (name -> (min, max)) makes it answer ``ERR`` like careful firmware would;
    ``received`` keeps every command line, so tests can prove what did (not) reach the device.
    """

    def __init__(self, fd: int, *, identity: str = "cloop line-protocol emulator v1",
                 limits: dict[str, tuple[float, float]] | None = None, time_scale: float = 1.0) -> None:
        self.fd = fd
        self.identity = identity
        self.limits = limits or {}
        self.time_scale = time_scale
        self.received: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stimulator-emulator", daemon=True)

    def start(self) -> "LineProtocolEmulator":
        self._thread.start()
        return self

    def _write(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode("ascii"))

    def _handle(self, line: str) -> None:
        self.received.append(line)
        if line == "ID?":
            self._write(f"ID {self.identity}")
            return
        if line == "STOP":
            self._write("STOPPED")
            return
        m = _TRAIN.match(line)
        if not m:
            self._write(f"ERR 0 unknown command {line[:40]!r}")
            return
        seq = int(m.group(1))
        values = dict(zip(("channel", "amplitude", "frequency", "pulse_width", "train_duration"),
                          (float(g) for g in m.groups()[1:])))
        for name, (lo, hi) in self.limits.items():
            if not lo <= values[name] <= hi:
                self._write(f"ERR {seq} {name} {values[name]:g} outside device limit")
                return
        self._write(f"ACK {seq}")
        time.sleep(values["train_duration"] / 1000.0 * self.time_scale)
        self._write(f"DONE {seq}")

    def _run(self) -> None:
        import select

        buf = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 1024)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode("ascii", errors="replace").strip()
                if line:
                    self._handle(line)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
