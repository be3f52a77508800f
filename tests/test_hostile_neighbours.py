"""Hostile neighbours (issue 15): other users and other containers on the same machine.

The machine runs the suite as root, which may unlink anything; the neighbours' cases matter to an
unprivileged user, so the victim here is ``nobody`` (``setpriv``), starting a real worker group, and the
neighbour is root (another user) or a process in its own pid namespace (a container sharing /dev/shm).
"""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import psutil
import pytest

from comfy_pipefusion import transport
from launcher.sweep import sweep

ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")

# Run by nobody: start a real one-rank worker group in the run root, stop it, say what is left.
START = """
import json, sys
from pathlib import Path
from comfy_pipefusion import transport
from launcher import GroupPlan
from launcher.group import WorkerGroup
mine = sys.argv[1]
(Path("/dev/shm") / mine).write_bytes(b"left by a dead owner")
root = transport.run_root()
group = WorkerGroup(GroupPlan(world_size=1), root, startup_timeout=120)
group.stop()
print(json.dumps({"root": str(root), "mine_left": (Path("/dev/shm") / mine).exists(),
                  "groups_left": [str(p) for p in root.glob("group-*")]}))
"""


def _python_for_nobody() -> str:
    """An interpreter of this Python version that nobody can run (this venv's may live under /root)."""
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (sys.executable, shutil.which(want, path="/usr/local/bin:/usr/bin:/bin")):
        check = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'pass'], check=True)"  # torchrun's way
        if cand and subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", cand, "-c",
                                    check], capture_output=True).returncode == 0:
            return cand
    pytest.skip(f"no {want} that the user nobody may run")


@pytest.fixture(scope="module")
def nobody():
    if os.getuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as the unprivileged user nobody")
    uid = pwd.getpwnam("nobody").pw_uid
    py = _python_for_nobody()
    site = sysconfig.get_paths()["purelib"]

    def run(code: str, *args: str, env: dict, timeout: float = 180) -> dict:
        full = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": f"{ROOT}:{site}",
                "PYTHONDONTWRITEBYTECODE": "1", **env}
        out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", py, "-c", code,
                              *args], env=full, cwd="/tmp", capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])
    run.uid = uid
    return run


def _dead_pid() -> int:
    """A pid that no process has now."""
    pid = min(int(Path("/proc/sys/kernel/pid_max").read_text()), 4_000_000) - 100
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


@pytest.fixture
def nobody_dir():
    """A directory nobody owns (mode 0700), removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="pf-nb-"))
    os.chown(path, pwd.getpwnam("nobody").pw_uid, -1)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_hostile_another_users_segments_never_stop_a_start(nobody, nobody_dir):
    dead = _dead_pid()
    foreign = [SHM / f"pf_{dead}_{secrets.token_hex(16)}",  # the format before pid namespaces
               SHM / f"pf_{dead}_{transport.pid_namespace()}_{secrets.token_hex(16)}"]
    mine = SHM / f"pf_{dead}_{transport.pid_namespace()}_{secrets.token_hex(16)}"
    try:
        for f in foreign:  # root's files in the sticky /dev/shm: nobody may not unlink them
            f.write_bytes(b"another user's")
        got = nobody(START, mine.name, env={"PIPEFUSION_RUN_DIR": str(nobody_dir)})
        assert got["mine_left"] is False  # nobody's own dead segment is swept
        assert got["groups_left"] == []
        assert all(f.exists() for f in foreign)  # another user's files are left alone
    finally:
        for f in foreign + [mine]:
            f.unlink(missing_ok=True)


def test_hostile_a_containers_live_segment_is_not_swept(tmp_path):
    if os.getuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to make a pid namespace")
    pid = _dead_pid()  # the container's process gets this pid in its namespace: no process has it here
    code = ("import sys; from comfy_pipefusion.transport import ShmTensor; s = ShmTensor.create((4,)); "
            "print(s.shm.name, flush=True); sys.stdin.read(); s.close()")
    child = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
         f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid && {sys.executable} -c '{code}'; :"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ours = SHM / f"pf_{_dead_pid()}_{transport.pid_namespace()}_{secrets.token_hex(16)}"
    try:
        name = child.stdout.readline().strip()
        assert name.startswith(f"pf_{pid}_"), name
        assert not psutil.pid_exists(pid)
        ours.write_bytes(b"a dead owner's")
        run_root = tmp_path / "run"
        run_root.mkdir(mode=0o700)
        sweep(run_root)
        assert (SHM / name).exists()  # alive in its own namespace
        assert not ours.exists()  # ours, and its owner is dead
    finally:
        child.stdin.close()
        child.wait(30)
        ours.unlink(missing_ok=True)
    assert not (SHM / name).exists()  # its owner unlinked it


def test_hostile_a_squatted_tmp_run_dir_falls_back_to_a_private_one(nobody, nobody_dir):
    tmp = nobody_dir.parent / f"pf-tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    tmp.chmod(0o1777)  # like /tmp
    mine = SHM / f"pf_{_dead_pid()}_{transport.pid_namespace()}_{secrets.token_hex(16)}"
    try:
        squat = tmp / f"comfy-pipefusion-{nobody.uid}"
        squat.mkdir(mode=0o755)  # root got there first
        got = nobody(START, mine.name, env={"TMPDIR": str(tmp)})
        root = Path(got["root"])
        assert root.parent == tmp and root.name.startswith(f"comfy-pipefusion-{nobody.uid}-")
        st = root.lstat()
        assert st.st_uid == nobody.uid and st.st_mode & 0o777 == 0o700
        assert got["groups_left"] == [] and list(squat.iterdir()) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        mine.unlink(missing_ok=True)


def test_hostile_a_dead_owners_group_in_an_old_fallback_run_dir_is_swept(tmp_path):
    """A run dir made beside a squatted one lives only as long as its process knows it; the next start of
    any of this user's processes finds a dead owner's group there and removes it."""
    stable = tmp_path / f"comfy-pipefusion-{os.getuid()}"
    stable.mkdir(mode=0o700)
    old = Path(tempfile.mkdtemp(prefix=f"comfy-pipefusion-{os.getuid()}-", dir=tmp_path))
    group = old / "group-dead"
    group.mkdir(mode=0o700)
    (group / "owner").write_text(json.dumps({"pid": _dead_pid(), "create_time": 1.0}))
    (group / "pids").write_text("[]")
    other = tmp_path / "comfy-pipefusion-99999-x"  # another uid's name: not ours to judge
    (other / "group-dead").mkdir(parents=True)
    assert sweep(stable) == [group]
    assert not group.exists() and (other / "group-dead").exists()
