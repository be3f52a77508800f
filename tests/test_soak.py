"""Load on a real ComfyUI server (issue 6): 100 prompts in a row on one warm group, and prompts queued
while another is cancelled. Every result is compared with the serial reference (warm-up >= steps makes
every strategy exact)."""
from __future__ import annotations

import json
import time

import psutil
import pytest

from comfy_pipefusion import transport

from comfy_helpers import (END, error_message, flux_prompt, recv_or_none, run_prompt, saved_latent, serial_latent,
                           start_model_server, worker_pids)

UNET = "tiny-flux.safetensors"
PROMPTS = 100


@pytest.fixture(scope="module")
def server(tmp_path_factory, serial_model):
    srv = start_model_server(tmp_path_factory, serial_model, UNET)
    yield srv
    srv.stop()


def footprint(pids: list[int]) -> dict[int, tuple[int, int]]:
    """{pid: (resident bytes, open file descriptors)}."""
    return {p: (psutil.Process(p).memory_info().rss, psutil.Process(p).num_fds()) for p in pids}


@pytest.mark.slow
def test_hundred_prompts_on_one_warm_group(server):
    refs, first, pids = {}, None, None
    t0 = time.monotonic()
    for i in range(PROMPTS):
        size, seed = (128, 64)[i % 2], 1000 + i
        status, msgs = run_prompt(server, flux_prompt(UNET, steps=2, seed=seed, warmup=2, size=size,
                                                      patches=(2, 3)[i % 3 == 0], prefix=f"latents/soak{i}"))
        assert status == "execution_success", (i, error_message(msgs))
        if (size, seed) not in refs:
            refs[size, seed] = serial_latent(server.ckpt, 2, seed, size)
        out = saved_latent(server, f"latents/soak{i}")
        assert float((out - refs[size, seed]).abs().max()) <= 1e-5, i
        assert transport.shm_segments(server.pid) == [], i
        if i == 0:
            pids = worker_pids(server.pid)
        assert worker_pids(server.pid) == pids, i  # one warm group throughout
        if i == 9:
            first = footprint([server.pid, *pids])
    last = footprint([server.pid, *pids])
    wall = time.monotonic() - t0
    print(f"\nSOAK {PROMPTS} prompts in {wall:.1f} s ({wall / PROMPTS:.2f} s each)")
    for pid in first:
        who = "ComfyUI" if pid == server.pid else f"worker {pid}"
        growth = last[pid][0] / first[pid][0] - 1
        print(f"SOAK {who}: RSS {first[pid][0] / 2**20:.1f} -> {last[pid][0] / 2**20:.1f} MiB "
              f"({growth * 100:+.2f}%), fds {first[pid][1]} -> {last[pid][1]}")
        assert growth < 0.05, (who, first[pid], last[pid])
        assert last[pid][1] <= first[pid][1], (who, first[pid], last[pid])


def test_two_prompts_queued_while_a_third_is_cancelled(server):
    """Queued back to back: a long prompt (cancelled once it runs) and two short ones. The short ones
    get exactly their own results: nothing of the cancelled job, or of each other, leaks into them."""
    client = "soak-queue"
    ws = server.ws_connect(client)
    ws.settimeout(1.0)
    try:
        long_id = server.queue_prompt(flux_prompt(UNET, steps=400, seed=7, prefix="latents/q_long"), client)
        ids = {server.queue_prompt(flux_prompt(UNET, steps=2, seed=s, warmup=2, prefix=f"latents/q{s}"), client): s
               for s in (8, 9)}
        ended, interrupted = {}, False
        deadline = time.monotonic() + 300
        while len(ended) < 3 and time.monotonic() < deadline:
            raw = recv_or_none(ws)
            if not isinstance(raw, str):  # a timeout (None) or a preview frame
                continue
            m = json.loads(raw)
            d = m.get("data", {})
            if m["type"] == "progress" and d.get("prompt_id") == long_id and d["value"] >= 2 and not interrupted:
                interrupted = True
                server.interrupt()
            if m["type"] in END:
                ended[d["prompt_id"]] = m["type"]
    finally:
        ws.close()
    assert ended.get(long_id) == "execution_interrupted", ended
    for pid, seed in ids.items():
        assert ended.get(pid) == "execution_success", ended
        out = saved_latent(server, f"latents/q{seed}")
        assert float((out - serial_latent(server.ckpt, 2, seed)).abs().max()) <= 1e-5, seed
    assert not list((server.base_dir / "output").glob("latents/q_long_*"))
    assert transport.shm_segments(server.pid) == []
