"""The launcher and the warm worker group: real torchrun groups, real shared memory, real sockets."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from comfy_pipefusion import transport
from comfy_pipefusion.config import ParallelConfig, SampleSpec
from comfy_pipefusion.job import make_problem, synthetic_conditioning
from comfy_pipefusion.models import flux
from comfy_pipefusion.models.checkpoint import save_checkpoint
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.parallel.serial import run_serial
from launcher import GroupError, GroupPlan, JobCancelled, Launcher

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, serial_model):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-flux.safetensors"
    save_checkpoint(serial_model, path)
    return str(path)


@pytest.fixture
def run_root():
    """A short private root: AF_UNIX socket paths must stay under 108 bytes."""
    root = Path(tempfile.mkdtemp(prefix="pf-"))
    root.chmod(0o700)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def inputs(steps: int, seed: int = 5):
    cfg = flux.PRESETS["tiny"]["config"]
    txt, pooled = synthetic_conditioning(cfg, 8, 1, seed)
    spec = SampleSpec(height=128, width=128, steps=steps, seed=seed)
    latent = torch.zeros(1, 16, 16, 16)
    from comfy_pipefusion.sampling.noise import comfy_noise
    noise = comfy_noise((1, 16, 16, 16), seed)
    return spec, {"txt": txt, "pooled": pooled, "latent": latent, "noise": noise}


def job(ckpt: str, spec: SampleSpec, strategy: str = "pipefusion", warmup: int | None = None) -> dict:
    return {"model": {"checkpoint": ckpt},
            "parallel": {"strategy": strategy, "warmup_steps": warmup or spec.steps},
            "sample": {"height": spec.height, "width": spec.width, "steps": spec.steps, "seed": spec.seed}}


def serial_latent(ckpt: str, spec: SampleSpec, t: dict) -> torch.Tensor:
    model, _ = load_rank_model(ModelSource(checkpoint=ckpt), ParallelConfig("serial", 1), 0, torch.device("cpu"),
                               torch.float32)
    problem = make_problem(spec, t["txt"], t["pooled"], t["latent"], t["noise"])
    with torch.inference_mode():
        return problem.finish(run_serial(model, problem, torch.float32, torch.device("cpu")))


def gone(pids, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.2)
    return False


def assert_fresh_group_serves(launcher: Launcher, plan: GroupPlan, ckpt: str, old_pids: list[int]) -> None:
    """After a failure, the next job runs on a new group (none of ``old_pids``) and equals serial."""
    small, st = inputs(steps=2)
    out, reply = launcher.run(plan, job(ckpt, small), st, (1, 16, 16, 16))
    assert set(reply["pids"]).isdisjoint(old_pids)
    assert float((out - serial_latent(ckpt, small, st)).abs().max()) <= 1e-5


def test_warm_group_runs_jobs_reports_progress_and_cancels(ckpt, run_root):
    launcher = Launcher(run_root)
    plan = GroupPlan(world_size=2, key="a")
    spec, t = inputs(steps=4)
    steps_seen = []
    try:
        out, reply = launcher.run(plan, job(ckpt, spec), t, (1, 16, 16, 16), on_progress=lambda s, n: steps_seen.append((s, n)))
        assert float((out - serial_latent(ckpt, spec, t)).abs().max()) <= 1e-5
        assert steps_seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
        group = launcher.group
        pids = list(group.worker_pids)
        assert len(pids) == 2 and reply["pids"] == pids

        # the directory is private; once rank 0 is connected the socket takes no one else
        assert stat.S_IMODE(group.dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((group.dir / "authkey").stat().st_mode) == 0o600
        with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
            transport.connect(group.dir / "control.sock", (group.dir / "authkey").read_bytes())

        # cancel in the middle of a long job, for both strategies; the same group then works on
        for strategy in ("pipefusion", "distrifusion"):
            long_spec, lt = inputs(steps=300)
            flag = threading.Event()
            with pytest.raises(JobCancelled):
                launcher.run(plan, job(ckpt, long_spec, strategy, warmup=1), lt, (1, 16, 16, 16),
                             on_progress=lambda s, n: s >= 3 and flag.set(), cancelled=flag.is_set)
            assert launcher.state == "ready"
        out2, reply2 = launcher.run(plan, job(ckpt, spec), t, (1, 16, 16, 16))
        assert reply2["pids"] == pids  # no restart
        assert torch.equal(out2, out)
        assert transport.shm_segments(os.getpid()) == []  # every job's segments unlinked

        # another plan restarts the group
        launcher.run(GroupPlan(world_size=2, key="b"), job(ckpt, spec, "distrifusion"), t, (1, 16, 16, 16))
        assert launcher.group.worker_pids != pids and gone(pids)
    finally:
        group_dir = launcher.group.dir if launcher.group else None
        pids = launcher.group.worker_pids + [launcher.group.proc.pid] if launcher.group else []
        launcher.stop()
    assert gone(pids) and (group_dir is None or not group_dir.exists())
    assert launcher.state == "stopped"


def test_killed_rank_fails_the_job_fast_and_next_job_gets_a_fresh_group(ckpt, run_root):
    launcher = Launcher(run_root)
    plan = GroupPlan(world_size=2)
    spec, t = inputs(steps=300)
    started, killed_at = threading.Event(), []
    try:
        launcher.ensure(plan)
        victim = launcher.group.worker_pids[1]
        first_pids = list(launcher.group.worker_pids)

        def kill_when_running():
            started.wait(120)
            killed_at.append(time.monotonic())
            os.kill(victim, signal.SIGKILL)
        threading.Thread(target=kill_when_running, daemon=True).start()
        with pytest.raises(GroupError) as err:
            launcher.run(plan, job(ckpt, spec, warmup=1), t, (1, 16, 16, 16),
                         on_progress=lambda s, n: started.set())
        elapsed = time.monotonic() - killed_at[0]
        assert elapsed < 10, elapsed
        assert "died" in str(err.value) and "worker log" in str(err.value)
        assert (launcher.state, launcher.detail[:8]) == ("stopped", "failed: ") and gone(first_pids)
        assert_fresh_group_serves(launcher, plan, ckpt, first_pids)
    finally:
        launcher.stop()


def test_group_of_a_killed_owner_is_swept(ckpt, run_root):
    """A ComfyUI that dies by SIGKILL leaves nothing running: its group dies with it, and the next start
    removes what is left in the run directory."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; from launcher import Launcher, GroupPlan; "
            f"l = Launcher(Path({str(run_root)!r})); g = l.ensure(GroupPlan(world_size=2)); "
            "print(' '.join(map(str, g.worker_pids + [g.proc.pid])), flush=True); import time; time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 3
        owner.kill()
        owner.wait()
        assert gone(pids, timeout=15)
        assert len(list(run_root.glob("group-*"))) == 1  # the dead owner's directory is still there...
        launcher = Launcher(run_root)
        spec, t = inputs(steps=2)
        launcher.run(GroupPlan(world_size=2), job(ckpt, spec), t, (1, 16, 16, 16))
        assert len(list(run_root.glob("group-*"))) == 1  # ...until the next start sweeps it
        launcher.stop()
        assert list(run_root.glob("group-*")) == []
    finally:
        if owner.poll() is None:
            owner.kill()


def test_bad_job_is_refused_and_the_group_stays(ckpt, run_root):
    launcher = Launcher(run_root)
    plan = GroupPlan(world_size=2)
    spec, t = inputs(steps=2)
    try:
        bad = job(ckpt, spec)
        bad["parallel"]["patches"] = 99
        from launcher import JobError
        with pytest.raises(JobError, match=r"99 patches .* only 8 \(height/16\)"):
            launcher.run(plan, bad, t, (1, 16, 16, 16))
        pids = launcher.group.worker_pids
        _, reply = launcher.run(plan, job(ckpt, spec), t, (1, 16, 16, 16))
        assert reply["pids"] == pids
    finally:
        launcher.stop()


def test_a_stall_with_every_rank_alive_stops_the_group_and_names_the_setting(ckpt, run_root):
    """The stall watchdog: every rank alive and sending heartbeats, but no step finishes within the stall
    timeout (PIPEFUSION_STALL_S; here 0.3 s, against 1024x1024 steps that take longer). The group is
    stopped, the message says where it stood and which setting to raise, and the next job gets a fresh
    group."""
    launcher = Launcher(run_root, stall_timeout=0.3)
    plan = GroupPlan(world_size=2)
    cfg = flux.PRESETS["tiny"]["config"]
    txt, pooled = synthetic_conditioning(cfg, 8, 1, 3)
    from comfy_pipefusion.sampling.noise import comfy_noise
    big = SampleSpec(height=1024, width=1024, steps=50, seed=3)
    tensors = {"txt": txt, "pooled": pooled, "latent": torch.zeros(1, 16, 128, 128),
               "noise": comfy_noise((1, 16, 128, 128), 3)}
    try:
        launcher.ensure(plan)
        pids = list(launcher.group.worker_pids) + [launcher.group.proc.pid]
        started = time.monotonic()
        with pytest.raises(GroupError, match=r"no progress at step \d+/50 for 0.3 s although every rank is "
                                             r"alive \(last finished step per rank: rank 0: \d+, rank 1: \d+; "
                                             r"env PIPEFUSION_STALL_S\)"):
            launcher.run(plan, job(ckpt, big, warmup=1), tensors, (1, 16, 128, 128))
        assert time.monotonic() - started < 30
        assert (launcher.state, launcher.detail[:8]) == ("stopped", "failed: ") and gone(pids)
        assert_fresh_group_serves(launcher, plan, ckpt, pids)
    finally:
        launcher.stop()
