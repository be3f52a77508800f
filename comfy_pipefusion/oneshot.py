"""Run a list of jobs on a one-shot worker group and read the results (used by the benchmark and tests).

World size 1 runs the worker as a plain process (no process group at all); more ranks run it under
torchrun. The group runs in a session of its own and is killed whole on timeout or interrupt.

A one-shot group ends with its owner however the owner ends: the process it starts (torchrun's agent or
the single worker) gets SIGKILL from the kernel when the owner dies (PR_SET_PDEATHSIG), and every rank
likewise when the agent dies. Its files live in ``pipefusion-<owner pid>-*`` under the temp directory:
removed when ``run_jobs`` returns or raises; an owner killed outright (SIGKILL) cannot remove them, so each
``run_jobs`` first removes this user's such directories whose owner is gone (``sweep_tempdirs``).
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from . import failure
from .errors import GroupError
from .multinode import Nodes, torchrun_dir


def worker_command(world_size: int, args: list[str], store_dir: Path) -> list[str]:
    """The command that starts ``world_size`` worker ranks with ``args`` (plain Python for one rank).

    Single-machine groups open no TCP port of their own: torchrun's rendezvous and the process group's
    store are files in ``store_dir`` (a private directory), where ``--standalone`` would bind a TCPStore
    on every network interface. Only the backends' own peer sockets remain, pinned to loopback by
    ``worker_env``. torchrun's own folder (``--log-dir``; by default a new ``torchelastic_*`` in the system's
    temporary folder at every start, never removed) is in ``store_dir`` too, and goes with it.
    """
    tail = ["-m", "comfy_pipefusion.worker", *args, "--store", str(Path(store_dir) / "pg.store")]
    if world_size == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={world_size}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={Path(store_dir) / 'rdzv.store'}",
            "--rdzv-conf=store_type=file", f"--rdzv-id={secrets.token_hex(8)}", "--local-addr=127.0.0.1",
            "--max_restarts=0", "--monitor_interval=0.5", torchrun_dir(store_dir), *tail]


def node_commands(world_size: int, args: list[str], link, port: int, folder: Path) -> list[list[str]]:
    """Two torchrun agents, one per namespace of ``link`` (linkns.Shaped), with torchrun's standard
    multi-node rendezvous (c10d, a TCP store on side 0's address): half the ranks each (torchrun's folders in
    ``folder``: each agent makes its own run folder there)."""
    if world_size < 2 or world_size % 2:
        raise ValueError(f"a group across a link needs an even number of ranks (half on each side), "
                         f"got {world_size}")
    run_id = secrets.token_hex(8)
    return [[*link.exec_prefix(side), *Nodes(2, side, f"{link.addrs[0]}:{port}", run_id, link.addrs[side])
             .agent_command(world_size // 2, ["-m", "comfy_pipefusion.worker", *args], folder)] for side in (0, 1)]


INHERITED_NOT = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "TORCHELASTIC_RUN_ID")
ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
ALLOC_DEFAULT = "expandable_segments:True"  # fewer fragments between jobs of different sizes
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def visible_devices(devices: tuple[int, ...], parent: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for the workers: ``devices`` are indices among the GPUs this process sees, which
    the parent's own CUDA_VISIBLE_DEVICES (indices or UUIDs, e.g. ComfyUI's --cuda-device 1) maps to the
    physical ones."""
    if parent is None or parent.strip() == "":
        if parent is not None and devices:
            raise ValueError(f"GPUs {list(devices)} asked for, but CUDA_VISIBLE_DEVICES is empty here: "
                             "this process sees no GPU; use cpu:N")
        return ",".join(map(str, devices))
    seen = [p.strip() for p in parent.split(",") if p.strip()]
    bad = [d for d in devices if not 0 <= d < len(seen)]
    if bad:
        raise ValueError(f"GPU {bad[0]} does not exist here: CUDA_VISIBLE_DEVICES={parent!r} makes "
                         f"{len(seen)} GPU(s) visible (0..{len(seen) - 1})")
    return ",".join(seen[d] for d in devices)


def allocator_env(env: dict[str, str]) -> None:
    """The workers' CUDA allocator: the user's own setting when they made one (without a cudaMallocAsync
    backend, which the workers do not support), else expandable segments."""
    for var in ALLOC_VARS:
        if var in env:
            kept = [p for p in env[var].split(",") if p.strip() and "cudamallocasync" not in p.replace(" ", "").lower()]
            if kept:
                env[var] = ",".join(kept)
            else:
                del env[var]
    if not any(var in env for var in ALLOC_VARS):
        env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_DEFAULT


def worker_env(threads: int, devices: tuple[int, ...] | None = None, cpu_only: bool = False) -> dict[str, str]:
    """A clean worker environment: the chosen GPUs (none with ``cpu_only``; ``devices`` counted among the
    GPUs this process sees), the thread count, the allocator (``allocator_env``), no inherited rendezvous
    settings, peer sockets on loopback only (gloo and NCCL would otherwise bind the address the host name
    resolves to), no shared TCP store in torchrun, and this package importable."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED_NOT}
    env.update(LOOPBACK)
    allocator_env(env)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
    elif cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


_TEMP = re.compile(r"pipefusion-(?:bench-)?(\d+)-")


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when the thread that started it ends (run in the
    child: Popen's ``preexec_fn``); a parent already gone ends it at once."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:
        os._exit(1)


def owned_tempdir(prefix: str = "pipefusion-") -> tempfile.TemporaryDirectory:
    """A temporary directory named after this process, so that ``sweep_tempdirs`` knows its owner."""
    return tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-")


def sweep_tempdirs() -> list[Path]:
    """Remove this user's ``pipefusion-<pid>-*`` temporary directories whose owner process is gone."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob("pipefusion-*"):
        m = _TEMP.match(path.name)
        try:
            if not m or path.lstat().st_uid != os.getuid() or psutil.pid_exists(int(m.group(1))):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def kill_now(procs: list) -> None:
    """SIGKILL ``procs`` (psutil processes; ones already gone are skipped) and reap what we can."""
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def end_children() -> None:
    """SIGKILL every process this one started, whole trees, sessions of their own included."""
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    kill_now(procs)


def _wait_all(procs: list, timeout: float | None) -> int:
    """Wait for every process; the first that fails ends the others (a side left waiting for its peer
    would wait forever); past ``timeout`` seconds, subprocess.TimeoutExpired."""
    if len(procs) == 1:
        return procs[0].wait(timeout=timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or all(c == 0 for c in codes):
            for p, c in zip(procs, codes):
                if c is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            return failed[0] if failed else 0
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(procs[0].args, timeout)
        time.sleep(0.1)


def run_jobs(preset: str | None, seed: int, jobs: list[dict], world_size: int, threads: int = 1,
             timeout: float | None = None, model: dict | None = None,
             worker_args: list[str] | None = None, cpu_only: bool = False,
             link=None, nodes: Nodes | None = None, rounds: int = 1,
             probe_at: list[int] | None = None) -> dict[str, tuple[torch.Tensor, dict]]:
    """Run ``jobs`` (``Job.to_wire`` forms; ``Job.from_wire`` fills what a job leaves out) on a fresh group;
    returns {name: (samples, metrics)}. The model is the built-in ``preset`` (random weights from ``seed``)
    unless ``model`` gives another source (e.g. ``{"checkpoint": PATH}``). ``timeout`` (seconds, None: no
    limit) bounds the whole group; on timeout or interrupt the group is killed. ``worker_args`` go to every
    rank (e.g. ``--turns DIR --turn-tag TAG``); ``cpu_only`` hides the GPUs from the ranks; ``link``
    (linkns.Shaped) puts half the ranks in each of its two namespaces, joined by torchrun's multi-node
    rendezvous over the shaped link; ``nodes`` makes this process one machine's part of a group across
    machines (its ``world_size // nnodes`` ranks; every machine's first rank writes the results); ``rounds``:
    the jobs run that many times over (bench/timing.py), each job's results over all its rounds; ``probe_at``:
    the indices of the jobs before which the planner probes again (besides each round's first)."""
    sweep_tempdirs()
    with owned_tempdir() as tmp:
        tmp = Path(tmp)
        spec = tmp / "jobs.json"
        source = model or {"preset": preset, "seed": seed}
        spec.write_text(json.dumps({"model": source, "jobs": jobs, **({"rounds": rounds} if rounds != 1 else {}),
                                    **({"probe_at": probe_at} if probe_at else {})}))
        log = tmp / "worker.log"
        with open(log, "wb") as fh:
            args = ["--jobs", str(spec), "--out", str(tmp / "out"), "--threads", str(threads), *(worker_args or [])]
            env = worker_env(threads, cpu_only=cpu_only)
            if nodes is not None:
                if world_size % nodes.nnodes:
                    raise ValueError(f"{world_size} ranks cannot be shared evenly by {nodes.nnodes} machines: "
                                     f"give a world size that is a multiple of {nodes.nnodes}")
                starts = [(nodes.agent_command(world_size // nodes.nnodes, ["-m", "comfy_pipefusion.worker", *args],
                                               tmp), nodes.agent_env(env))]
            elif link is None:
                starts = [(worker_command(world_size, args, tmp), env)]
            else:
                port = 20000 + secrets.randbelow(30000)
                starts = [(cmd, {**env, "GLOO_SOCKET_IFNAME": dev, "NCCL_SOCKET_IFNAME": dev})
                          for cmd, dev in zip(node_commands(world_size, args, link, port, tmp), link.devs)]
            procs = [subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=e, start_new_session=True,
                                      preexec_fn=die_with_parent) for cmd, e in starts]
            try:
                rc = _wait_all(procs, timeout)
            except BaseException:
                for proc in procs:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                raise
        if rc != 0:
            raise GroupError(failure.log_error(f"worker group of {world_size} exited with code {rc}:", log))
        return {j["name"]: (load_file(str(tmp / "out" / f"{j['name']}.safetensors"))["samples"],
                            json.loads((tmp / "out" / f"{j['name']}.json").read_text())) for j in jobs}
