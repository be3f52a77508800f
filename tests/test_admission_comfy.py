"""Memory admission and the loader's stage inputs on a real ComfyUI server (issue 10 §4-5, issue 15's
first two items): a workflow asking for more ranks than cores, more pixels or a bigger batch than the
memory holds is refused before any worker starts, with the numbers and what would make it fit.

The big model is a checkpoint in Flux.1's diffusers layout at Flux's width (3072, 24 heads of 128), with one
double and two single blocks (more on a machine with much RAM), written sparse: its header is real, its data a hole on disk. The loader and
the sampler read only the header, so a refused job proves nothing was loaded.
"""
from __future__ import annotations

import json
import struct
import time

import pytest

from comfy_pipefusion import memory, transport
from comfy_pipefusion.models import flux

from comfy_helpers import (error_message, flux_prompt, run_prompt, saved_latent, serial_latent, start_model_server,
                           worker_pids)

UNET = "tiny-flux.safetensors"
WIDE = "wide-flux.safetensors"
WIDE_CONFIG = dict(num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))


def write_sparse_checkpoint(meta, path, dtype: str = "BF16", elem: int = 2) -> int:
    """A safetensors file with ``meta``'s state dict keys and shapes whose data is a hole; returns its size."""
    header, off = {}, 0
    for key, t in meta.state_dict().items():
        header[key] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [off, off + t.numel() * elem]}
        off += t.numel() * elem
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + off)
    return 8 + len(raw) + off


def wide_config() -> dict:
    """WIDE_CONFIG with enough single blocks that a 8192² job needs more than 1.5x this machine's RAM (its
    weights stay a small part of it), so that the refusal never depends on the machine running the suite."""
    import psutil

    from comfy_pipefusion.config import ParallelConfig

    config, ram = dict(WIDE_CONFIG), psutil.virtual_memory().total
    while True:
        ranks = memory.estimate(flux, flux.build_meta(config), ParallelConfig("pipefusion", 2),
                                memory.JobSize(512, 512, 8, 4096, dtype="bfloat16"))
        if sum(r.total for r in ranks) > 1.5 * ram:
            return config
        config["num_single_layers"] *= 2


@pytest.fixture(scope="module")
def server(tmp_path_factory, serial_model):
    srv = start_model_server(tmp_path_factory, serial_model, UNET, name="admission")
    write_sparse_checkpoint(flux.build_meta(wide_config()), srv.ckpt.parent / WIDE)
    yield srv
    srv.stop()


def wide(size=128, batch=1, devices="cpu:2", strategy="pipefusion") -> dict:
    p = flux_prompt(WIDE, steps=2, seed=1, devices=devices, strategy=strategy, width=4096, pooled=768)
    p["1"]["inputs"]["weight_dtype"] = "bfloat16"
    p["3"]["inputs"].update(width=size, height=size, batch_size=batch)
    return p


def refused(server, prompt: dict) -> str:
    t0 = time.monotonic()
    status, msgs = run_prompt(server, prompt)
    took = time.monotonic() - t0
    msg = error_message(msgs)
    print(f"\nREFUSED in {took:.2f} s: {msg}")
    assert status == "execution_error", msg
    assert worker_pids(server.pid) == [] and worker_pids(server.pid, agent=True) == []  # no group started
    assert transport.shm_segments(server.pid) == []
    assert took < 20, took
    return msg


def test_hostile_cpu_ranks_beyond_the_cores_are_refused(server):
    p = flux_prompt(UNET, steps=2, seed=1, devices="cpu:500", strategy="distrifusion")
    msg = refused(server, p)
    cores = memory.usable_cores()
    assert f"500 CPU ranks need 500 cores" in msg and f"use at most cpu:{cores}" in msg, msg


def test_hostile_8192_square_is_refused_before_anything_starts(server):
    msg = refused(server, wide(size=8192))
    assert "PipeFusion KSampler: this job does not fit in memory: pipefusion on 2 CPU ranks, 8192x8192" in msg
    assert "K/V buffers" in msg and "GiB of RAM is available" in msg
    assert "to fit: fewer pixels (at most about" in msg and "smaller batch" not in msg, msg


def test_hostile_batch_4096_is_refused_before_anything_starts(server):
    msg = refused(server, wide(size=128, batch=4096))
    assert "128x128, batch 4096" in msg and "a smaller batch (at most" in msg, msg


def test_hostile_distrifusion_replicas_beyond_the_memory_are_refused(server):
    """Ranks x bytes with the cores allowed: each distrifusion rank holds the whole model, its K/V buffers
    and the gathered copies of the other ranks' bands, all counted against the RAM the ranks share."""
    msg = refused(server, wide(size=8192, strategy="distrifusion"))
    assert "distrifusion on 2 CPU ranks" in msg and "gathered K/V" in msg, msg


def test_hostile_model_beyond_the_ram_is_refused_by_the_loader(server):
    """A header whose weights alone exceed this machine's RAM (sparse: nothing on disk) is refused by the
    loader, before any image size is known and before any worker starts."""
    import psutil

    block = 12 * 6144 ** 2 * 2  # a single block at width 6144 in bfloat16, about 0.9 GB
    blocks = int(psutil.virtual_memory().total // block) + 2
    config = dict(WIDE_CONFIG, num_attention_heads=48, num_single_layers=blocks)
    write_sparse_checkpoint(flux.build_meta(config), server.ckpt.parent / "huge-flux.safetensors")
    p = flux_prompt("huge-flux.safetensors", steps=2, seed=1, width=4096, pooled=768)
    p["1"]["inputs"]["weight_dtype"] = "bfloat16"
    msg = refused(server, p)
    assert "PipeFusion DiT Loader: this job does not fit in memory: pipefusion on 2 CPU ranks, its weights and " \
           "processes alone: rank" in msg and "GiB of RAM is available" in msg, msg


def test_loader_stage_split_and_balance_reach_the_group(server):
    """A hand-made split runs (6 blocks as 4 + 2) and, every step synchronous, equals the serial reference;
    a split that does not cover the model is refused by the loader with the numbers."""
    p = flux_prompt(UNET, steps=2, seed=3, warmup=2, prefix="latents/split")
    p["1"]["inputs"].update(stage_split="4,2", balance="memory")
    status, msgs = run_prompt(server, p)
    assert status == "execution_success", error_message(msgs)
    got, want = saved_latent(server, "latents/split"), serial_latent(server.ckpt, steps=2, seed=3)
    assert (got - want).abs().max() <= 1e-5
    p["1"]["inputs"].update(stage_split="3,4")
    status, msgs = run_prompt(server, p)
    assert status == "execution_error"
    assert "stage_split [3, 4] covers 7 blocks, the model has 6" in error_message(msgs)
