"""Key files and the plain-text rule, including the `cloop keys generate` command."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from orchestrator import keys


def test_generate_writes_pyzmq_certificates_with_private_secret(tmp_path: Path) -> None:
    public, secret = keys.generate(tmp_path / "k", "rig1")
    assert public == tmp_path / "k" / "rig1.key" and secret == tmp_path / "k" / "rig1.key_secret"
    pub, sec = zmq.auth.load_certificate(str(secret))
    assert len(pub) == 40 and len(sec) == 40  # z85 text of 32-byte keys
    assert zmq.auth.load_certificate(str(public)) == (pub, None)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    keys.generate(tmp_path, "rig1")
    before = (tmp_path / "rig1.key").read_bytes()
    with pytest.raises(keys.SecurityError, match="already exists"):
        keys.generate(tmp_path, "rig1")
    keys.generate(tmp_path, "rig1", force=True)
    assert (tmp_path / "rig1.key").read_bytes() != before


@pytest.mark.parametrize("name", ["", "../evil", ".hidden", "a b", "x" * 65])
def test_bad_key_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(keys.SecurityError, match="key name"):
        keys.generate(tmp_path, name)


def test_allow_list_maps_keys_to_names(tmp_path: Path) -> None:
    (tmp_path / "rigs").mkdir()
    keys.generate(tmp_path / "rigs", "rig-a")
    keys.generate(tmp_path / "rigs", "rig-b")
    (tmp_path / "rigs" / "rig-a.key_secret").unlink()  # only public keys belong there
    allowed = keys.allowed_keys(tmp_path)
    assert sorted(allowed.values()) == ["rig-a", "rig-b"]
    with pytest.raises(keys.SecurityError, match="allow-list directory"):
        keys.allowed_keys(tmp_path / "nowhere")


def test_missing_key_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(keys.SecurityError, match=r"orchestrator\.key_secret not found"):
        keys.orchestrator_pair(tmp_path)
    keys.generate(tmp_path, "rig1")
    with pytest.raises(keys.SecurityError, match=r"orchestrator\.key not found"):
        keys.worker_keys(tmp_path, "rig1")
    (tmp_path / "garbage.key_secret").write_text("not a certificate")
    with pytest.raises(keys.SecurityError, match="garbage.key_secret"):
        keys.load_pair(tmp_path / "garbage.key_secret")


@pytest.mark.parametrize(
    "endpoint, loopback",
    [("tcp://127.0.0.1:5555", True), ("tcp://127.9.9.9:1", True), ("tcp://localhost:5555", True),
     ("tcp://[::1]:5555", True), ("ipc:///tmp/x", True), ("tcp://*:5555", False), ("tcp://0.0.0.0:5555", False),
     ("tcp://10.0.0.5:5555", False), ("tcp://rig-host:5555", False), ("tcp://eth0:5555", False),
     ("tcp://127.0.0.1:1;10.0.0.5:5555", False)],
)
def test_loopback_detection(endpoint: str, loopback: bool) -> None:
    assert keys.is_loopback(endpoint) is loopback


def test_security_rule() -> None:
    keys.require_security("tcp://127.0.0.1:5", None, True, role="orchestrator")
    keys.require_security("tcp://10.0.0.1:5", Path("k"), False, role="rig")
    with pytest.raises(keys.SecurityError, match="needs Curve keys"):
        keys.require_security("tcp://127.0.0.1:5", None, False, role="rig")
    with pytest.raises(keys.SecurityError, match="--insecure is refused for tcp://0.0.0.0:5"):
        keys.require_security("tcp://0.0.0.0:5", None, True, role="orchestrator")
    with pytest.raises(keys.SecurityError, match="not both"):
        keys.require_security("tcp://127.0.0.1:5", Path("k"), True, role="rig")


def _cloop(*args: str) -> subprocess.CompletedProcess:
    code = "import sys, typer; from rig_adapters.cli import register; app = typer.Typer(); " \
           "register(app); app(args=sys.argv[1:], prog_name='cloop')"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def test_keys_generate_command(tmp_path: Path) -> None:
    done = _cloop("keys", "generate", str(tmp_path / "keys"), "--name", "orchestrator")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "keys" / "orchestrator.key").is_file()
    assert (tmp_path / "keys" / "orchestrator.key_secret").is_file()
    again = _cloop("keys", "generate", str(tmp_path / "keys"), "--name", "orchestrator")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_rig_command_refuses_insecure_network_address() -> None:
    done = _cloop("rig", "--connect", "tcp://10.1.2.3:5555", "--adapter", "rig_adapters.simulated:NullAdapter",
                  "--insecure")
    assert done.returncode == 2
    assert "--insecure is refused for tcp://10.1.2.3:5555" in done.stderr


def test_rig_command_requires_keys_off_loopback() -> None:
    """Without keys only loopback runs (plain text that never leaves the machine); elsewhere, refused."""
    done = _cloop("rig", "--connect", "tcp://10.1.2.3:5555", "--adapter", "rig_adapters.simulated:NullAdapter")
    assert done.returncode == 2 and "needs Curve keys" in done.stderr


def test_rig_command_unknown_adapter() -> None:
    done = _cloop("rig", "--connect", "tcp://127.0.0.1:5555", "--adapter", "nosuch", "--insecure")
    assert done.returncode == 2 and "unknown adapter 'nosuch'" in done.stderr and "simulated" in done.stderr


def test_a_secret_key_readable_by_others_is_warned_about_naming_the_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, secret = keys.generate(tmp_path, "rig-a")
    with caplog.at_level("WARNING", logger="cloop.keys"):
        keys.load_pair(secret)
    assert not caplog.records  # mode 600: quiet
    secret.chmod(0o644)
    with caplog.at_level("WARNING", logger="cloop.keys"):
        pair = keys.load_pair(secret)
    assert pair.secret and [r.getMessage() for r in caplog.records] == [
        f"secret key file {secret} has mode 644: other users can read it and impersonate this machine; "
        f"run `chmod 600 {secret}`"]
    # the rig command shows it before anything else goes wrong (here: no orchestrator.key)
    done = _cloop("rig", "--connect", "tcp://10.1.2.3:5555", "--adapter", "rig_adapters.simulated:NullAdapter",
                  "--keys", str(tmp_path), "--name", "rig-a")
    assert done.returncode == 2 and f"secret key file {secret} has mode 644" in done.stderr, done.stderr
    assert "orchestrator.key not found" in done.stderr
