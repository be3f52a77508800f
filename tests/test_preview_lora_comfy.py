"""Issue 12 on a real ComfyUI server: live previews of our KSampler as of the stock one (binary websocket
frames, one per step, with ``--preview-method latent2rgb``; none without a preview method).

The model is the SD3.5-medium-like parity model of tests/test_parity_comfy.py (width 192: ComfyUI's own
detection loads it with the stock UNETLoader, and it is cheap on the CPU).
"""
from __future__ import annotations

import struct

import pytest
import torch

from comfy_pipefusion.models import family, sd3
from comfy_pipefusion.models.checkpoint_write import write_checkpoint

from comfy_helpers import run_prompt, start_server
from test_parity_comfy import SD3_CONFIG

SD3_FILE = "preview-sd35m.safetensors"
STEPS = 3
COND = {"tokens": 8, "width": 4096, "pooled_width": 2048, "guidance": 3.5, "seed": 0}


def _server(tmp_path_factory, name: str, args: tuple):
    base = tmp_path_factory.mktemp(name)
    run_dir = tmp_path_factory.mktemp("run")
    run_dir.chmod(0o700)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    model = sd3.build_meta(SD3_CONFIG)
    sd3.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
    write_checkpoint(base / "models" / "diffusion_models" / SD3_FILE, model.state_dict(), sd3.NAME,
                     dict(model.config), dtype=torch.float32)
    return start_server(base, run_dir, args=args)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _server(tmp_path_factory, "preview", ("--preview-method", "latent2rgb"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def quiet_server(tmp_path_factory):
    srv = _server(tmp_path_factory, "nopreview", ("--preview-method", "none"))
    yield srv
    srv.stop()


def sampler_prompt(ours: bool, seed: int = 7) -> dict:
    sample = {"seed": seed, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
              "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}
    if ours:
        model = {"class_type": "PipeFusionDiTLoader",
                 "inputs": {"unet_name": SD3_FILE, "weight_dtype": "float32", "devices": "cpu:2",
                            "strategy": "pipefusion", "patches": 2, "warmup_steps": 1}}
        sampler = {"class_type": "PipeFusionKSampler", "inputs": {"pipefusion_model": ["1", 0], **sample}}
    else:
        model = {"class_type": "UNETLoader", "inputs": {"unet_name": SD3_FILE, "weight_dtype": "default"}}
        sampler = {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sample}}
    return {"1": model, "3": {"class_type": "PipeFusionTestConditioning", "inputs": COND},
            "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
            "6": sampler,
            "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/pv"}}}


def previews(srv, ours: bool) -> list[bytes]:
    """The preview images (JPEG) the websocket carried while the prompt ran; every binary frame must be one."""
    frames: list = []
    status, msgs = run_prompt(srv, sampler_prompt(ours), timeout=300, frames=frames)
    assert status == "execution_success", (msgs[-1]["data"], srv.log_tail(40))
    images = []
    for f in frames:
        kind, fmt = struct.unpack(">II", f[:8])
        assert (kind, fmt) == (1, 1), f"binary frame of event {kind}, format {fmt}: not a JPEG preview"
        assert f[8:10] == b"\xff\xd8"  # JPEG start of image
        images.append(bytes(f[8:]))
    return images


def test_preview_one_image_per_step_like_stock_ksampler(server):
    stock, ours = previews(server, ours=False), previews(server, ours=True)
    assert len(stock) == STEPS, f"the stock KSampler sent {len(stock)} previews for {STEPS} steps"
    assert len(ours) == len(stock), f"PipeFusion KSampler sent {len(ours)} previews, the stock one {len(stock)}"
    assert len(set(ours)) > 1  # the image forms: not one picture repeated


@pytest.mark.slow  # a server of its own (~40 s idle) for what every other server test already runs without
def test_preview_none_without_a_preview_method(quiet_server):
    assert previews(quiet_server, ours=False) == []
    assert previews(quiet_server, ours=True) == []
