"""Hostile inputs (issue 15): a shared workflow or a downloaded checkpoint, on a real ComfyUI server.

Every refusal here happens before any worker starts, with a message that names the problem and the fix,
and leaves nothing behind; the one file that is fine (a Flux file carrying VAE tensors) samples exactly
like the plain file. The checkpoints are built in the layouts real files have and edited byte by byte
where the attack is in the header.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from comfy_pipefusion import transport
from comfy_pipefusion.config import MAX_SEED
from comfy_pipefusion.models import family
from comfy_pipefusion.models.checkpoint import save_checkpoint
from comfy_pipefusion.models.checkpoint_write import write_checkpoint
from comfy_pipefusion.models.tensorfile import MAX_HEADER
from launcher.logfile import LOG_LIMIT, read_tail

from comfy_helpers import (error_message, flux_prompt, run_prompt, saved_latent, serial_latent, start_server,
                           worker_pids)
from test_checkpoint import write as write_family

PLAIN = "tiny-flux.safetensors"
WITH_VAE = "tiny-flux-with-vae.safetensors"
SECRET = b"TOP SECRET: the neighbour's file"
LOAD_DELAY_S = 4.0  # the workers' weight load is made this slow (spread over its tensors): a window to cancel in


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _rewrite(src: Path, dst: Path, edit) -> None:
    """``dst`` = ``src`` with its header edited by ``edit(header)`` (the tensor bytes are kept)."""
    header, body = _header(src)
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _write_models(models: Path, plain_model, tmp: Path) -> None:
    save_checkpoint(plain_model, models / PLAIN)
    config = family.find_preset("tiny")[1]["config"]
    sd = {k: v.detach().contiguous() for k, v in plain_model.state_dict().items()}
    vae = {"vae.decoder.up.0.block.0.conv1.weight": torch.randn(4, 4, 3, 3),
           "vae.encoder.down.0.block.0.conv1.weight": torch.randn(4, 4, 3, 3),
           "vae.decoder.conv_out.bias": torch.randn(3)}
    write_checkpoint(models / WITH_VAE, sd, "flux", config, layout="original", extra=vae)
    original = write_checkpoint(tmp / "tiny-flux-original.safetensors", sd, "flux", config, layout="original")

    # a sharded set whose index names a file outside the models folder, by '../' and by absolute path
    (models.parent.parent / "secret.safetensors").write_bytes(SECRET)
    index = write_checkpoint(models / "evil.safetensors", sd, "flux", config, layout="diffusers", shards=2)
    for name, target in (("evil", "../../secret.safetensors"),
                         ("abs", str(models.parent.parent / "secret.safetensors"))):
        if name == "abs":
            for i in (1, 2):
                (models / f"abs-0000{i}-of-00002.safetensors").write_bytes(
                    (models / f"evil-0000{i}-of-00002.safetensors").read_bytes())
        text = json.loads(index.read_text())
        keys = list(text["weight_map"])
        text["weight_map"] = {k: f"{name}-0000{1 if i % 2 else 2}-of-00002.safetensors" for i, k in enumerate(keys)}
        text["weight_map"][keys[0]] = target
        (models / f"{name}.safetensors.index.json").write_text(json.dumps(text))

    # header bounds
    def negative(h):  # [-w, -c]: the product is the right byte count, the dimensions are not
        h["img_in.weight"]["shape"] = [-s for s in h["img_in.weight"]["shape"]]
    _rewrite(original, models / "negative-dims.safetensors", negative)

    pixart, _ = write_family(tmp, "pixart-alpha")
    _rewrite(pixart, models / "head-dim-zero.safetensors",
             lambda h: h["__metadata__"].update({"pipefusion.attention_head_dim": "0"}))

    def many_blocks(h):  # tens of thousands of single blocks, each an empty tensor
        begin = max(e["data_offsets"][1] for k, e in h.items() if k != "__metadata__")
        for i in range(1, 40_000):
            h[f"single_blocks.{i}.norm.query_norm.scale"] = {"dtype": "F32", "shape": [0],
                                                            "data_offsets": [begin, begin]}
    _rewrite(original, models / "many-blocks.safetensors", many_blocks)

    _rewrite(original, models / "huge-header.safetensors",
             lambda h: h["__metadata__"].update({"padding": "x" * (MAX_HEADER + 2**20)}))


@pytest.fixture(scope="module")
def server(tmp_path_factory, serial_model):
    base = tmp_path_factory.mktemp("hostile")
    run_dir = tmp_path_factory.mktemp("run")
    run_dir.chmod(0o700)
    models = base / "models" / "diffusion_models"
    models.mkdir(parents=True)
    _write_models(models, serial_model, tmp_path_factory.mktemp("files"))
    srv = start_server(base, run_dir, {"PIPEFUSION_DEBUG_LOAD_DELAY_S": str(LOAD_DELAY_S)})
    srv.models, srv.run_dir = models, run_dir
    yield srv
    srv.stop()


def _refused(srv, prompt: dict, *words: str, absent: tuple[str, ...] = ()) -> str:
    """The prompt fails with a message holding ``words`` and none of ``absent``; no worker started for it,
    no segment left."""
    before = worker_pids(srv.pid)
    status, msgs = run_prompt(srv, prompt, timeout=120)
    msg = error_message(msgs)
    assert status == "execution_error", (status, srv.log_tail(30))
    for w in words:
        assert w in msg, msg
    for w in absent:
        assert w not in msg, msg
    assert worker_pids(srv.pid) == before and transport.shm_segments(srv.pid) == []
    return msg


def _masked(p: dict, size: int = 128) -> dict:
    """``p`` with SetLatentNoiseMask on its latent (left half kept): inpainting."""
    p = {**p, "10": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": size, "height": size}},
         "11": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size // 2, "height": size}},
         "12": {"class_type": "MaskComposite", "inputs": {"destination": ["10", 0], "source": ["11", 0],
                                                          "x": 0, "y": 0, "operation": "multiply"}},
         "13": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["3", 0], "mask": ["12", 0]}}}
    p["4"] = {**p["4"], "inputs": {**p["4"]["inputs"], "latent_image": ["13", 0], "sampler_name": "ddim"}}
    return p


# --------------------------------------------------------------------------------------- workflow inputs

def test_hostile_max_seed_with_ddim_is_refused_as_the_stock_ksampler_fails(server):
    # Stock: KSAMPLER.sample seeds ddim's inpainting noise with torch.manual_seed(seed + 1) on every ddim job,
    # which raises "Overflow when unpacking long long" at 2**64 - 1. Ours refuses it before any rank starts.
    plain = flux_prompt(PLAIN, steps=2, seed=MAX_SEED)
    plain["4"] = {**plain["4"], "inputs": {**plain["4"]["inputs"], "sampler_name": "ddim"}}
    for p in (_masked(flux_prompt(PLAIN, steps=2, seed=MAX_SEED)), plain):
        _refused(server, p, f"seed {MAX_SEED} with sampler ddim", "seed + 1", "stock KSampler",
                 f"up to {MAX_SEED - 1}")


# ------------------------------------------------------------------------------------------- checkpoints

def _load(unet: str) -> dict:
    return flux_prompt(unet, steps=1, seed=1)


@pytest.mark.parametrize("index", ["evil", "abs"])
def test_hostile_sharded_index_cannot_reach_outside_its_folder(server, index):
    size = str(len(SECRET))
    msg = _refused(server, _load(f"{index}-00001-of-00002.safetensors"), "bare *.safetensors file name",
                   "no path, no '..'", absent=(f"{size} bytes", "TOP SECRET", "not a readable safetensors"))
    assert "secret.safetensors" in msg  # the index's own text, quoted; nothing read from the file


@pytest.mark.parametrize("unet,words", [
    ("negative-dims.safetensors", ("img_in.weight", "corrupt")),
    ("head-dim-zero.safetensors", ("pipefusion.attention_head_dim", "'0'", "outside 1..1024")),
    ("many-blocks.safetensors", ("single_blocks", "40000 blocks", "more than 512")),
    ("huge-header.safetensors", ("header length", str(MAX_HEADER))),
])
def test_hostile_checkpoint_header_values_are_bounded(server, unet, words):
    _refused(server, _load(unet), "PipeFusion DiT Loader", *words)


def test_hostile_flux_file_with_vae_tensors_samples_like_the_plain_file(server):
    status, msgs = run_prompt(server, flux_prompt(WITH_VAE, steps=2, seed=5, warmup=2, prefix="latents/vae"),
                              timeout=300)
    assert status == "execution_success", (error_message(msgs), server.log_tail(30))
    want = serial_latent(server.models / PLAIN, steps=2, seed=5)
    got = saved_latent(server, "latents/vae")
    assert (got - want).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------- the worker log

def test_hostile_worker_log_is_rotated_and_bounded(server):
    """A flood of worker output (appended to the log the workers hold open, as their writes are) is cut
    to a bounded size by the next job, which still succeeds; the newest bytes stay readable."""
    p = flux_prompt(WITH_VAE, steps=2, seed=6, warmup=2, prefix="latents/log")
    logs = list(server.run_dir.glob(f"comfy-pipefusion-{os.getuid()}/group-*/worker.log"))
    if not logs:  # the group of the previous test is gone (run alone): start one
        status, msgs = run_prompt(server, p, timeout=300)
        assert status == "execution_success", error_message(msgs)
        logs = list(server.run_dir.glob(f"comfy-pipefusion-{os.getuid()}/group-*/worker.log"))
    (log,) = logs
    line = b"x" * 1023 + b"\n"
    with open(log, "ab") as f:
        for _ in range(3 * LOG_LIMIT // len(line)):
            f.write(line)
        f.write(b"the newest line before the job\n")
    status, msgs = run_prompt(server, p, timeout=300)
    assert status == "execution_success", error_message(msgs)
    kept = log.with_name("worker.log.1")
    assert log.stat().st_size <= LOG_LIMIT and kept.stat().st_size <= LOG_LIMIT
    assert b"the newest line before the job" in kept.read_bytes()[-4096:]
    assert "the newest line before the job" in read_tail(log)


# ------------------------------------------------------------------------------------- cancel while loading

def test_hostile_cancel_while_loading_stops_every_rank_within_a_second(server):
    """Cancel 1 s into a 4 s weight load: every rank stops reading (the answer needs all of them), the
    group stays, nothing is left, and the next prompt loads the whole model again and samples right."""
    p = flux_prompt(WITH_VAE, steps=2, seed=7, warmup=2, prefix="latents/cancel")
    status, msgs = run_prompt(server, p, timeout=300)
    assert status == "execution_success", error_message(msgs)
    pids = worker_pids(server.pid)
    os.utime(server.models / WITH_VAE)  # the file changed: the loader runs again, the ranks read it again
    sent: dict = {}

    def on_message(m):
        if not sent and m["type"] == "pipefusion.status" and m["data"]["state"] == "loading":
            def cancel():
                sent["at"] = time.monotonic()
                server.interrupt()
            sent["timer"] = threading.Timer(1.0, cancel)
            sent["timer"].start()
    status, msgs = run_prompt(server, {**p, "4": {**p["4"], "inputs": {**p["4"]["inputs"], "seed": 8}}},
                              on_message=on_message, timeout=300)
    took = time.monotonic() - sent["at"]
    print(f"\nFAULT cancel 1 s into a {LOAD_DELAY_S:g} s weight load: {took:.2f} s: {status}")
    assert status == "execution_interrupted", error_message(msgs)
    assert not [m for m in msgs if m["type"] == "progress" and m["data"]["node"] == "4"]  # no step ran
    assert took < 1.0
    assert worker_pids(server.pid) == pids and transport.shm_segments(server.pid) == []
    status, msgs = run_prompt(server, p, timeout=300)
    assert status == "execution_success", error_message(msgs)
    assert worker_pids(server.pid) == pids
    got = saved_latent(server, "latents/cancel")
    assert (got - serial_latent(server.models / PLAIN, steps=2, seed=7)).abs().max() <= 1e-5
