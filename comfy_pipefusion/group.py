"""Run a list of jobs on a one-shot worker group and read the results (used by the benchmark and tests).

World size 1 runs the worker as a plain process (no process group at all); more ranks run it under
torchrun. The group runs in a session of its own and is killed whole on timeout or interrupt.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


class GroupError(RuntimeError):
    """The worker group failed; the message carries the tail of its output."""


def worker_command(world_size: int, jobs: Path, out: Path, threads: int) -> list[str]:
    tail = ["-m", "comfy_pipefusion.worker", "--jobs", str(jobs), "--out", str(out), "--threads", str(threads)]
    if world_size == 1:
        return [sys.executable, *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
            "--max_restarts=0", *tail]


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)  # never inherit a cudaMallocAsync setting
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_jobs(preset: str, seed: int, jobs: list[dict], world_size: int, threads: int = 1,
             timeout: float = 600.0) -> dict[str, tuple[torch.Tensor, dict]]:
    """Run ``jobs`` (worker job dicts) on a fresh group; returns {name: (samples, metrics)}."""
    with tempfile.TemporaryDirectory(prefix="pipefusion-") as tmp:
        tmp = Path(tmp)
        spec = tmp / "jobs.json"
        spec.write_text(json.dumps({"model": {"preset": preset, "seed": seed}, "jobs": jobs}))
        log = tmp / "worker.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(worker_command(world_size, spec, tmp / "out", threads), stdout=fh,
                                    stderr=subprocess.STDOUT, env=worker_env(threads), start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        if rc != 0:
            tail = log.read_text(errors="replace")[-4000:]
            raise GroupError(f"worker group of {world_size} exited with code {rc}:\n{tail}")
        return {j["name"]: (load_file(str(tmp / "out" / f"{j['name']}.safetensors"))["samples"],
                            json.loads((tmp / "out" / f"{j['name']}.json").read_text())) for j in jobs}
