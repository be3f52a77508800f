"""/dev/shm filling up between two jobs on a real ComfyUI server (issue 6's faults; the rest are in
test_faults.py): the server runs in a mount namespace of its own with a real 256 KiB tmpfs on /dev/shm."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_pipefusion.models.checkpoint import save_checkpoint

from comfy_helpers import error_message, run_prompt, start_server, worker_pids
from test_faults import UNET, ok, prompt, report


def shm_namespace_python(tmp: Path) -> str | None:
    """A python that runs in a mount namespace of its own with a 256 KiB tmpfs on /dev/shm (root, or
    unprivileged user namespaces), or None where the system allows neither."""
    unshare = ["unshare", "-m", "--propagation", "private"] if os.geteuid() == 0 else ["unshare", "-Urm"]
    probe = subprocess.run([*unshare, "sh", "-c", "mount -t tmpfs -o size=256k tmpfs /dev/shm"],
                           capture_output=True)
    if probe.returncode:
        return None
    wrapper = tmp / "python-small-shm"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(unshare) + " sh -c 'mount -t tmpfs -o size=256k tmpfs "
                       "/dev/shm && exec \"$0\" \"$@\"' " + sys.executable + ' "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.mark.slow
def test_shm_full_is_a_clear_error_and_the_group_survives(tmp_path_factory, serial_model):
    """/dev/shm (a real 256 KiB tmpfs in the server's own mount namespace) filled up between two jobs:
    the prompt fails saying so (before the fix, ComfyUI died of SIGBUS); once room is made, the same
    warm group runs the next prompt."""
    base = tmp_path_factory.mktemp("comfy-shm")
    python = shm_namespace_python(base)
    if python is None:
        pytest.skip("needs a mount namespace (root or unprivileged user namespaces) for a small /dev/shm")
    run_dir = tmp_path_factory.mktemp("run-shm")
    run_dir.chmod(0o700)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    save_checkpoint(serial_model, base / "models" / "diffusion_models" / UNET)
    srv = start_server(base, run_dir, python=python)
    try:
        shm = Path(f"/proc/{srv.pid}/root/dev/shm")
        assert os.statvfs(shm).f_blocks * os.statvfs(shm).f_frsize <= 256 * 1024
        ok(srv)
        pids = worker_pids(srv.pid)
        # the first job's segments may still be closing under load: fill only once they are gone, or the space
        # they free afterwards lets the next job through
        deadline = time.monotonic() + 30
        while any(shm.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(shm.iterdir()), [p.name for p in shm.iterdir()]
        filler = shm / "filler"
        with open(filler, "wb", buffering=0) as fh:  # fill it to the last page
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        t0 = time.monotonic()
        status, msgs = run_prompt(srv, prompt(seed=90))
        msg = error_message(msgs)
        report("/dev/shm full (256 KiB tmpfs)", time.monotonic() - t0, msg)
        assert status == "execution_error" and "shared memory is full" in msg and "--shm-size" in msg, msg
        assert srv.alive() and worker_pids(srv.pid) == pids
        assert [p.name for p in shm.iterdir()] == ["filler"]  # no segment left behind
        filler.unlink()
        ok(srv, prompt(seed=91))
        assert worker_pids(srv.pid) == pids
    finally:
        srv.stop()
