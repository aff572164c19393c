"""CurveZMQ key files for the rig network, and the rule for when plain text is allowed.

Layout (pyzmq certificate files, z85 text):

* orchestrator: ``DIR/orchestrator.key_secret`` (its key pair) and ``DIR/rigs/*.key`` (the allow-list:
  public keys of the rigs it accepts; the file stem names the key).
* rig ``NAME``: ``DIR/NAME.key_secret`` (its key pair) and ``DIR/orchestrator.key`` (whom it trusts).

Curve is required unless ``insecure`` is set, and ``insecure`` is only allowed when every address
involved is loopback (or ipc/inproc), so plain text can never leave the machine.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

ORCHESTRATOR_NAME = "orchestrator"
ALLOW_DIR = "rigs"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
log = logging.getLogger("cloop.keys")


class SecurityError(RuntimeError):
    """Keys are missing or unreadable, or plain text was requested where it is not allowed."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85
    secret: bytes  # z85


def check_name(name: str) -> str:
    """Key names become file names: keep them to a safe character set."""
    if name.startswith(".") or not _NAME_RE.match(name):
        raise SecurityError(f"key name {name!r} must match [A-Za-z0-9_.-]{{1,64}} and not start with '.'")
    return name


def generate(directory: Path | str, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` (public) and ``DIR/NAME.key_secret`` (mode 0600); return both paths."""
    check_name(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise SecurityError(f"{public} or {secret} already exists (use --force to replace the key pair)")
    old_umask = os.umask(0o077)
    try:
        pub_path, sec_path = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old_umask)
    os.chmod(sec_path, 0o600)
    os.chmod(pub_path, 0o644)
    return Path(pub_path), Path(sec_path)


def load_pair(path: Path) -> KeyPair:
    """Read a ``.key_secret`` file, with an error that says which file and what is wrong."""
    if not path.is_file():
        raise SecurityError(f"secret key file {path} not found (create it with `cloop keys generate`)")
    warn_if_exposed(path)
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except Exception as exc:
        raise SecurityError(f"cannot read key file {path}: {exc}") from None
    if not secret:
        raise SecurityError(f"{path} holds no secret key")
    return KeyPair(public=public, secret=secret)


def warn_if_exposed(path: Path) -> str | None:
    """Warn (and return the warning) when a secret key file is readable or writable by others than its
    owner: anyone who can read it can impersonate this machine on the rig network."""
    if os.name != "posix":
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return None
    text = (f"secret key file {path} has mode {mode:o}: other users can read it and impersonate this "
            f"machine; run `chmod 600 {path}`")
    log.warning("%s", text)
    return text


def load_public(path: Path) -> bytes:
    if not path.is_file():
        raise SecurityError(f"public key file {path} not found")
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except Exception as exc:
        raise SecurityError(f"cannot read key file {path}: {exc}") from None
    return public


def orchestrator_pair(keys_dir: Path) -> KeyPair:
    return load_pair(Path(keys_dir) / f"{ORCHESTRATOR_NAME}.key_secret")


def allow_dir(keys_dir: Path) -> Path:
    return Path(keys_dir) / ALLOW_DIR


def allowed_keys(keys_dir: Path) -> dict[bytes, str]:
    """Public keys in ``DIR/rigs/`` mapped to their file stem (the name a rig is known by)."""
    folder = allow_dir(keys_dir)
    if not folder.is_dir():
        raise SecurityError(f"allow-list directory {folder} not found: put the rigs' public NAME.key files there")
    found: dict[bytes, str] = {}
    for path in sorted(folder.glob("*.key")):
        found[load_public(path)] = path.stem
    return found


@dataclass(frozen=True)
class WorkerKeys:
    pair: KeyPair
    server_public: bytes


def worker_keys(keys_dir: Path, name: str) -> WorkerKeys:
    check_name(name)
    keys_dir = Path(keys_dir)
    return WorkerKeys(pair=load_pair(keys_dir / f"{name}.key_secret"),
                      server_public=load_public(keys_dir / f"{ORCHESTRATOR_NAME}.key"))


def endpoint_host(endpoint: str) -> str | None:
    """Host part of ``tcp://HOST:PORT`` (None for ipc:// and inproc://, which never leave the machine)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return None
    if scheme != "tcp" or not rest:
        raise SecurityError(f"unsupported endpoint {endpoint!r}: use tcp://HOST:PORT")
    if ";" in rest:  # tcp://source;dest form: the destination is what matters
        rest = rest.split(";", 1)[1]
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return host.strip("[]")


def is_loopback(endpoint: str) -> bool:
    """True for tcp on 127.0.0.0/8, ::1 or localhost, and for ipc/inproc endpoints."""
    host = endpoint_host(endpoint)
    if host is None:
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', interface names, DNS names: may be reachable from outside


def require_security(endpoint: str, keys_dir: Path | None, insecure: bool, *, role: str) -> None:
    """Enforce: keys unless insecure; insecure only on loopback. ``role`` words the error."""
    if keys_dir is not None and insecure:
        raise SecurityError("give either --keys DIR or --insecure, not both")
    if keys_dir is None and not insecure:
        raise SecurityError(
            f"the {role} needs Curve keys: pass --keys DIR (see `cloop keys generate`), "
            "or --insecure for a loopback-only test setup")
    if insecure and not is_loopback(endpoint):
        raise SecurityError(
            f"--insecure is refused for {endpoint}: it is not a loopback address. "
            "Plain text is only allowed on 127.0.0.1/::1; use --keys DIR on a real network")
