"""The Curve allow-list: which rig public keys may connect, re-read whenever ``DIR/rigs/`` changes.

Fail closed: a key file that cannot be read (empty, malformed, not a key) is reported and skipped,
so a broken file never keeps an old list alive, and a key whose file was removed or overwritten
stops being accepted at once. Only a failure to *look* at the directory for lack of resources
(too many open files, out of memory) keeps the current list until the next check, because nothing
is known to have changed and dropping every rig then would end the session the attacker targets.

The ZAP handler asks :meth:`AllowList.allows` for every Curve handshake, so a reload takes effect
for new connections immediately; the server drops existing connections whose key left the list.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import zmq.auth
from zmq.utils import z85

from orchestrator import keys as keyfiles

log = logging.getLogger("cloop.transport")

#: errno values meaning "cannot look right now", not "the list changed".
_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR})

#: How often (s) the directory is checked for changes.
CHECK_INTERVAL_S = 2.0


def _is_curve_key(public: bytes | None) -> bool:
    """A z85 text of a 32-byte Curve key (what pyzmq's certificate files hold)."""
    if not public or len(public) != 40:
        return False
    try:
        return len(z85.decode(public)) == 32
    except Exception:
        return False


class AllowListUnavailable(OSError):
    """The directory could not be read for lack of resources; the current list stays until the next try."""


class AllowList:
    """Public keys (z85) in ``keys_dir/rigs/*.key`` mapped to their file stem, the key's name."""

    def __init__(self, keys_dir: Path | str) -> None:
        self.keys_dir = Path(keys_dir)
        self.folder = keyfiles.allow_dir(self.keys_dir)
        if not self.folder.is_dir():
            raise keyfiles.SecurityError(
                f"allow-list directory {self.folder} not found: put the rigs' public NAME.key files there")
        self.keys: dict[bytes, str] = {}
        self.problems: dict[str, str] = {}   # file name -> why it was skipped
        self.denied: int = 0                 # handshakes refused by the ZAP handler
        self.last_denied: str | None = None  # abbreviated key of the last refused handshake
        self._signature: tuple[Any, ...] | None = None
        self._next_check = 0.0
        self.reload()

    # ------------------------------------------------------------------ reading
    def signature(self) -> tuple[Any, ...]:
        """Names, sizes and modification times of the key files (cheap change detection)."""
        try:
            entries = sorted(self.folder.glob("*.key"))
            return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size, p.stat().st_ino) for p in entries)
        except FileNotFoundError:
            return ()
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                raise AllowListUnavailable(exc.errno, f"cannot read {self.folder}: {exc.strerror}") from exc
            return ()

    def reload(self) -> dict[bytes, str]:
        """Re-read every key file now; returns the new mapping (also stored in ``keys``)."""
        signature = self.signature()
        found: dict[bytes, str] = {}
        problems: dict[str, str] = {}
        for name, *_ in signature:
            path = self.folder / name
            try:
                public, _ = zmq.auth.load_certificate(str(path))
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    raise AllowListUnavailable(exc.errno, f"cannot read {path}: {exc.strerror}") from exc
                problems[name] = f"unreadable: {exc.strerror or exc}"
                continue
            except Exception as exc:  # empty or malformed certificate file
                problems[name] = f"not a public key file ({exc})"
                continue
            if not _is_curve_key(public):
                problems[name] = "holds no 40-character z85 Curve public key"
                continue
            if public in found:
                problems[name] = f"same key as {found[public]}.key"
                continue
            found[public] = Path(name).stem
        if not self.folder.is_dir():
            problems[self.folder.name] = "allow-list directory is gone: no rig is accepted"
        for name, why in problems.items():
            if self.problems.get(name) != why:
                log.error("allow-list %s: skipped %s: %s", self.folder, name, why)
        self.keys, self.problems, self._signature = found, problems, signature
        log.info("allow-list %s: %d key(s)%s", self.folder, len(found),
                 f", {len(problems)} file(s) skipped" if problems else "")
        return found

    def changed(self, now: float) -> bool:
        """Check (at most every CHECK_INTERVAL_S) and reload if the files changed; True if reloaded."""
        if now < self._next_check:
            return False
        self._next_check = now + CHECK_INTERVAL_S
        if self.signature() == self._signature:
            return False
        self.reload()
        return True

    # ------------------------------------------------------------------ lookups
    def name_of(self, public_z85: bytes | str | None) -> str | None:
        """The allow-list name of a z85 public key, or None if it is not (or no longer) allowed."""
        if public_z85 is None:
            return None
        key = public_z85.encode() if isinstance(public_z85, str) else public_z85
        return self.keys.get(key)

    def callback(self, domain: str, public_z85: bytes) -> bool:
        """ZAP credentials check (runs in the authenticator's thread for every Curve handshake)."""
        if public_z85 in self.keys:
            return True
        self.denied += 1
        self.last_denied = public_z85.decode(errors="replace")[:8] + "..."
        return False
