"""Limits that keep hostile or broken peers from exhausting the orchestrator's file handles or memory.

* File handles: the soft ``RLIMIT_NOFILE`` is raised to the hard limit when a server starts, a
  connection that has not finished its handshake within :data:`HANDSHAKE_TIMEOUT_MS` is closed by
  libzmq, at most :data:`MAX_IDLE_CONNECTIONS` connections that never delivered a message are kept
  (the oldest beyond it are closed), and the listen backlog is bounded.
* Memory: libzmq refuses any inbound frame over :data:`MAX_INBOUND_FRAME_BYTES` (it disconnects the
  peer), but it buffers the frames of an unfinished multipart message without limit and the
  application cannot see them. :class:`InboundBudget` therefore compares, per TCP connection, the
  bytes the kernel received (``TCP_INFO``) with the bytes handed to us as complete messages; a
  connection holding more than :data:`PEER_BUFFER_BYTES` undelivered is shut down, which makes
  libzmq drop it and free what it buffered.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import stat
import struct
import time

from orchestrator import messages as m

log = logging.getLogger("cloop.transport")

#: Largest inbound frame libzmq accepts: a message at the wire limit, with room to answer a somewhat
#: larger one with an ``error`` reply (the wire limit is checked in Python) instead of a disconnect.
#: Rigs send results, heartbeats and errors; image payloads travel only to the rig.
MAX_INBOUND_FRAME_BYTES = 2 * m.MAX_MESSAGE_BYTES
#: Bytes one connection may hold inside libzmq beyond what it delivered as complete messages.
PEER_BUFFER_BYTES = 2 * MAX_INBOUND_FRAME_BYTES
#: Framing and Curve overhead allowed per delivered message, and once per connection (greeting).
_PER_MESSAGE_OVERHEAD = 128
_PER_CONNECTION_OVERHEAD = 64 * 1024
#: A peer that connects but does not finish the ZMTP/Curve handshake within this is disconnected.
HANDSHAKE_TIMEOUT_MS = 5000
#: Connections that have not delivered a single message (unauthenticated, or idle since they
#: connected) kept at most; beyond it the oldest are closed at the next check.
MAX_IDLE_CONNECTIONS = 256
#: Pending TCP connections the kernel queues before refusing more.
LISTEN_BACKLOG = 128
#: How often (s) the per-connection budgets are checked.
BUDGET_CHECK_S = 0.05
_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received in Linux's struct tcp_info (since 4.1)


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (idle peers must not exhaust it); return it."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return -1
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    return target


def _bytes_received(fd: int) -> int | None:
    """Bytes the kernel received on a TCP socket (None if ``fd`` is not one or Linux lacks the field)."""
    sock = socket.socket(fileno=fd)
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    finally:
        sock.detach()
    if len(info) < _TCPI_BYTES_RECEIVED + 8:
        return None
    return struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0]


def _inode(fd: int) -> int | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


class InboundBudget:
    """Per-connection undelivered-bytes accounting; connections are named by libzmq's descriptor.

    The socket monitor reports each accepted connection's descriptor; messages carry it too
    (``ZMQ_SRCFD``). The descriptor's inode is recorded at accept, so a descriptor number reused by
    another socket after a close is never mistaken for the old connection.
    """

    def __init__(self, limit_bytes: int = PEER_BUFFER_BYTES, max_idle: int | None = None) -> None:
        self.limit_bytes = int(limit_bytes)
        self.max_idle = MAX_IDLE_CONNECTIONS if max_idle is None else int(max_idle)
        self.idle_closed = 0
        self._conns: dict[int, list[int]] = {}  # fd -> [inode, delivered bytes, messages]
        self._next_check = 0.0
        self.shut_down = 0
        self.enabled = hasattr(socket, "TCP_INFO")

    def __len__(self) -> int:
        return len(self._conns)

    def accepted(self, fd: int) -> None:
        if not self.enabled:
            return
        ino = _inode(fd)
        if ino is not None:
            self._conns[fd] = [ino, 0, 0]

    def closed(self, fd: int) -> None:
        self._conns.pop(fd, None)

    def delivered(self, fd: int | None, nbytes: int) -> None:
        entry = self._conns.get(fd) if fd is not None else None
        if entry is not None:
            entry[1] += nbytes
            entry[2] += 1

    def enforce(self, now: float | None = None) -> list[tuple[int, int]]:
        """Shut down connections over budget, and the oldest idle ones beyond the cap.

        Returns [(fd, undelivered bytes)] of the connections shut down for their budget.
        """
        now = time.monotonic() if now is None else now
        if now < self._next_check or not self._conns:
            return []
        self._next_check = now + BUDGET_CHECK_S
        over: list[tuple[int, int]] = []
        idle: list[int] = []  # in accept order: dicts keep insertion order
        for fd, (ino, delivered, messages) in list(self._conns.items()):
            if _inode(fd) != ino:  # closed (and perhaps reused) since: not ours to judge any more
                del self._conns[fd]
                continue
            if messages == 0:
                idle.append(fd)
            received = _bytes_received(fd)
            if received is None:
                continue
            held = received - delivered - messages * _PER_MESSAGE_OVERHEAD - _PER_CONNECTION_OVERHEAD
            if held > self.limit_bytes:
                self._close(fd)
                self.shut_down += 1
                over.append((fd, held))
        for fd in idle[:max(0, len(idle) - self.max_idle)]:
            if fd in self._conns:
                self._close(fd)
                self.idle_closed += 1
        return over

    def _close(self, fd: int) -> None:
        """End a connection under libzmq's feet: it sees the end of the stream and frees it."""
        sock = socket.socket(fileno=fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()
        del self._conns[fd]
