"""Shared-memory tensors and the private run directory, with real processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_pipefusion import transport

ROOT = Path(__file__).resolve().parent.parent


def test_segment_is_shared_without_copies_and_unlinked_by_its_owner():
    seg = transport.ShmTensor.from_tensor(torch.arange(12, dtype=torch.float32).view(3, 4))
    name = seg.describe()["name"]
    assert name in transport.shm_segments(os.getpid())
    code = ("import json, sys; from comfy_pipefusion import transport; "
            "s = transport.ShmTensor.attach(json.loads(sys.argv[1])); s.tensor.mul_(2); s.close()")
    subprocess.run([sys.executable, "-c", code, json.dumps(seg.describe())], check=True, cwd=ROOT)
    assert seg.tensor.tolist() == [[2.0 * (4 * r + c) for c in range(4)] for r in range(3)]
    assert name in transport.shm_segments(os.getpid())  # the attaching process did not unlink it
    seg.close()
    seg.close()  # idempotent
    assert name not in transport.shm_segments()
    assert not Path("/dev/shm", name).exists()


def test_segment_names_are_unguessable_and_checked():
    a, b = transport.ShmTensor.create((2,)), transport.ShmTensor.create((2,))
    try:
        assert a.shm.name != b.shm.name and len(a.shm.name.split("_")[-1]) == 32
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError, match="not a comfy-pipefusion segment"):
        transport.ShmTensor.attach({"name": "psm_1234", "shape": [1], "dtype": "float32"})


def test_run_root_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPEFUSION_RUN_DIR", str(tmp_path))
    root = transport.run_root()
    assert root.stat().st_mode & 0o777 == 0o700
    root.chmod(0o755)
    with pytest.raises(PermissionError, match="mode 0700"):
        transport.run_root()


def test_control_messages_are_json_only(tmp_path):
    import threading
    path = Path("/tmp") / f"pf-test-{os.getpid()}.sock"
    try:
        listener = transport.listen(path, b"k" * 32)
        got = []
        t = threading.Thread(target=lambda: got.append(transport.recv(listener.accept())))
        t.start()
        conn = transport.connect(path, b"k" * 32)
        transport.send(conn, "hello", value=[1, 2])
        t.join(10)
        assert got == [{"type": "hello", "value": [1, 2]}]
        conn.close()
        listener.close()
    finally:
        path.unlink(missing_ok=True)


def test_control_socket_refuses_a_client_without_the_key():
    import threading
    from multiprocessing import AuthenticationError
    path = Path("/tmp") / f"pf-auth-{os.getpid()}.sock"
    try:
        listener = transport.listen(path, b"right" * 8)
        server_side = []

        def accept():
            try:
                server_side.append(listener.accept())
            except Exception as exc:  # the listener refuses before reading any message
                server_side.append(exc)
        t = threading.Thread(target=accept)
        t.start()
        with pytest.raises(AuthenticationError):
            transport.connect(path, b"wrong" * 8)
        t.join(10)
        assert isinstance(server_side[0], AuthenticationError)
        listener.close()
    finally:
        path.unlink(missing_ok=True)
