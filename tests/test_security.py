"""Security properties of a real worker group (see SECURITY.md): private directories, an authenticated
control socket that never deserialises a stranger's bytes, nothing listening beyond loopback, and
unguessable shared memory names."""
from __future__ import annotations

import os
import pickle
import socket
import stat
import struct
import tempfile
import threading
import time
from multiprocessing import AuthenticationError
from pathlib import Path

import psutil
import pytest

from comfy_pipefusion import transport
from launcher import GroupPlan, Launcher


class _Marker:
    """Unpickling this creates a file: proof that a payload was deserialised."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def run_root():
    root = Path(tempfile.mkdtemp(prefix="pf-sec-"))
    root.chmod(0o700)
    yield root
    import shutil
    shutil.rmtree(root, ignore_errors=True)


def test_strangers_on_the_control_socket_are_refused_unread_and_the_group_starts(run_root, tmp_path):
    marker = tmp_path / "unpickled"
    results: dict = {}

    def intrude():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            socks = list(run_root.glob("group-*/control.sock"))
            if socks:
                break
            time.sleep(0.005)
        else:
            return
        # 1. a client with the wrong authkey
        try:
            transport.connect(socks[0], b"not the key")
            results["wrong_key"] = "accepted"
        except AuthenticationError:
            results["wrong_key"] = "refused"
        except OSError as exc:  # rank 0 was faster and the socket is gone: try again on the next group
            results["wrong_key"] = f"late: {exc}"
        # 2. raw bytes: a pickle that would create `marker` if anything unpickled it
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(socks[0]))
            payload = pickle.dumps(_Marker(str(marker)))
            s.sendall(struct.pack("!i", len(payload)) + payload)
            results["raw"] = s.recv(64)
            s.close()
        except OSError as exc:
            results["raw"] = f"late: {exc}"
        # 3. a client that reads the challenge and hangs up without answering (EOF mid-handshake)
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(socks[0]))
            results["hangup"] = s.recv(64)
            s.close()
        except OSError as exc:
            results["hangup"] = f"late: {exc}"

    t = threading.Thread(target=intrude, daemon=True)
    t.start()
    launcher = Launcher(run_root)
    try:
        group = launcher.ensure(GroupPlan(world_size=2))
        t.join(30)
        assert group.alive() and launcher.state == "ready"
        assert results.get("wrong_key") == "refused", results
        assert not marker.exists()  # nothing of the stranger's was unpickled
        assert b"#CHALLENGE#" in results.get("raw", b""), results  # it was challenged, never read as a message
        assert b"#CHALLENGE#" in results.get("hangup", b""), results  # it hung up, and the group still started
        # once rank 0 is connected, the socket file is gone: nobody else can even try
        assert not (group.dir / "control.sock").exists()
    finally:
        launcher.stop()


def test_nothing_listens_beyond_loopback_and_files_are_private(run_root):
    launcher = Launcher(run_root)
    try:
        group = launcher.ensure(GroupPlan(world_size=2))
        procs = [psutil.Process(group.proc.pid)] + [psutil.Process(p) for p in group.worker_pids]
        listening = [(p.pid, c.laddr) for p in procs for c in p.net_connections("inet") if c.status == "LISTEN"]
        print("\nSECURITY listening sockets of the group:", listening)
        for pid, addr in listening:
            assert addr.ip in ("127.0.0.1", "::1"), (pid, addr)  # torchrun --standalone bound '::' here
        assert not [1 for p in procs[:1] for c in p.net_connections("inet") if c.status == "LISTEN"]  # agent: none
        for d in (run_root, group.dir):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700 and d.stat().st_uid == os.getuid()
        assert stat.S_IMODE((group.dir / "authkey").stat().st_mode) == 0o600
        assert "authkey" not in " ".join(" ".join(p.cmdline()) for p in procs)  # never on a command line
    finally:
        launcher.stop()


def test_run_root_refuses_a_directory_others_can_enter(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEFUSION_RUN_DIR", str(tmp_path))
    root = tmp_path / f"comfy-pipefusion-{os.getuid()}"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    with pytest.raises(PermissionError, match="mode 0700"):
        transport.run_root()


def test_segment_names_are_unguessable_and_private():
    a, b = transport.ShmTensor.create((4,)), transport.ShmTensor.create((4,))
    try:
        for seg in (a, b):
            name = seg.describe()["name"]
            prefix, pid, ns, token = name.split("_")
            assert prefix == "pf" and int(pid) == os.getpid() and len(token) == 32  # 128 random bits
            assert ns == transport.pid_namespace()  # a pid names a process only within its namespace
            assert stat.S_IMODE(os.stat(f"/dev/shm/{name}").st_mode) == 0o600
        assert a.describe()["name"] != b.describe()["name"]
        with pytest.raises(ValueError, match="not a comfy-pipefusion segment"):
            transport.ShmTensor.attach({"name": "psm_other", "shape": [4], "dtype": "float32"})
    finally:
        a.close()
        b.close()
