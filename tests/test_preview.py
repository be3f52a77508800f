"""Live previews through the launcher: a real torchrun group (2 CPU ranks), real shared memory. Every step's
x0 reaches ``on_preview`` once, in order, for PipeFusion (written by the last stage), DistriFusion and Ulysses
(each rank writes its band); with no ``on_preview`` no preview segment exists. The ComfyUI side (binary websocket
frames per step, as for the stock KSampler) is tests/test_preview_lora_comfy.py."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from comfy_pipefusion import preview, transport
from comfy_pipefusion.models import flux
from comfy_pipefusion.models.checkpoint import save_checkpoint
from comfy_pipefusion.models.family import unpack_latent
from launcher import GroupPlan, Launcher

from test_launcher import inputs, job

STEPS = 4


@pytest.fixture(scope="module")
def launched(tmp_path_factory, serial_model):
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny-flux.safetensors"
    save_checkpoint(serial_model, ckpt)
    root = Path(tempfile.mkdtemp(prefix="pf-"))
    root.chmod(0o700)
    launcher = Launcher(root)
    yield launcher, str(ckpt)
    launcher.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("strategy", ["pipefusion", "distrifusion", "ulysses"])
def test_preview_every_step_once_and_the_last_is_the_result(launched, strategy):
    launcher, ckpt = launched
    spec, t = inputs(steps=STEPS)
    seen, progress = [], []
    out, _ = launcher.run(GroupPlan(world_size=2), job(ckpt, spec, strategy, warmup=1), t, (1, 16, 16, 16),
                          on_progress=lambda s, n: progress.append(s),
                          on_preview=lambda step, x0, total: seen.append((step, x0, total)))
    assert [s for s, _, _ in seen] == list(range(STEPS)) and {n for _, _, n in seen} == {STEPS}
    assert progress == list(range(1, STEPS + 1))
    for _, x0, _ in seen:
        assert x0.shape == (1, 64, 64) and torch.isfinite(x0).all()
    # the image forms: each step has its own x0 (a slot per step: none is overwritten, however late the launcher
    # reads them; it once read step 1's x0 as the last one's when the ranks had finished before its first look)
    assert all(not torch.equal(a, b) for (_, a, _), (_, b, _) in zip(seen, seen[1:]))
    # Euler's last step lands on sigma 0: the result is the last step's x0, in ComfyUI's LATENT space
    last = flux.LATENT.process_out(unpack_latent(seen[-1][1], 16, 16))
    assert float((last - out).abs().max()) <= 1e-5
    assert transport.shm_segments(os.getpid()) == []


def test_preview_reader_reports_each_step_once_from_the_slowest_writer():
    """The reader's rule on its own: the smallest stamp over the registered writers, every step once, each
    with its own x0 unless the writers lapped its slot (then the newest)."""
    segs = {k: torch.zeros(shape, dtype=getattr(torch, dtype))
            for k, (shape, dtype) in preview.shapes(4, 8, 3, steps=3).items()}
    assert segs[preview.DATA].shape[0] == 3  # slots: the job's steps, 2..8
    reader = preview.PreviewReader(segs[preview.DATA], segs[preview.STAMP])
    writers = [preview.PreviewWriter(segs[preview.DATA], segs[preview.STAMP], r) for r in (1, 2)]
    assert reader.poll() == []  # nobody registered: nothing

    def step(w, t):
        w.put(slice(0, 2) if w.rank == 1 else slice(2, 4), float(t) * torch.ones(1, 2, 8))
        w.publish(t)
    for w in writers:
        w.register()
    step(writers[0], 0)
    assert reader.poll() == []  # rank 2 has not finished step 0
    step(writers[1], 0)
    assert [(s, float(x0.mean())) for s, x0 in reader.poll()] == [(0, 0.0)]
    for t in (1, 2):  # both run ahead between polls: each step is still reported once, with its own x0
        for w in writers:
            step(w, t)
    assert [(s, float(x0.mean())) for s, x0 in reader.poll()] == [(1, 1.0), (2, 2.0)] and reader.poll() == []
    for t in (3, 4, 5):
        for w in writers:
            step(w, t)
    step(writers[0], 6)  # three slots: rank 1 wrote step 6 over step 3 and may be writing step 7 over step 4:
    assert [(s, float(x0.mean())) for s, x0 in reader.poll()] == [(3, 5.0), (4, 5.0), (5, 5.0)]  # the newest
    assert int(segs[preview.STAMP][0]) == -1  # rank 0 never wrote: it is not waited for

    # A job of 3 steps has a slot per step: a reader that first looks once every step is done (a loaded machine)
    # still gets each step's own x0 when it knows the job's steps, as the launcher does (unknown: stamp 3 may
    # mean step 3 is being written over step 0, so step 0 gets the newest)
    for steps, expected in ((3, [(0, 0.0), (1, 1.0), (2, 2.0)]), (None, [(0, 2.0), (1, 1.0), (2, 2.0)])):
        reader = preview.PreviewReader(segs[preview.DATA], segs[preview.STAMP])
        for w in writers:
            w.register()
            for t in range(3):
                step(w, t)
        assert [(s, float(x0.mean())) for s, x0 in reader.poll(steps)] == expected, steps
