"""DistriFusion: displaced patch parallelism.

Every rank holds the whole model and owns one band of the joint sequence: band r of the text tokens and
band r of the image rows. At each attention layer a rank writes its fresh K/V into the layer's buffer and
attends over the whole sequence, the other bands holding what the other ranks computed one step earlier;
the exchange of this step's K/V (all_gather, asynchronous) overlaps the rest of the step and is waited
for at the same layer one step later. Warm-up steps gather synchronously, which makes them exact.
"""
from __future__ import annotations

import torch

from ..attention import DisplacedKV
from ..errors import JobCancelled
from ..patches import displaced_spans
from .lanes import OneLane
from .runtime import Control, JobRuntime, gather_bands


def run_distrifusion(model, blocks: list, problem, cfg, comm, dtype: torch.dtype, device: torch.device,
                     control: Control | None = None, lanes=None, whole=None) -> torch.Tensor | None:
    """This rank's band. Returns the final latent [B, S_img, 64] on rank 0, else None.

    ``lanes`` (``lanes.Lanes``): Ulysses inside each band; ``comm`` is then this rank's lane across the bands
    (the gathers of its heads' K/V), ``whole`` the group that agrees to stop and collects the final latent."""
    lanes, whole = lanes or OneLane(), whole or comm
    spans = displaced_spans(problem.rows, problem.cols, problem.n_span_txt, comm.world_size)
    sp = lanes.enter(spans[comm.rank])  # this lane's part of the band, the same at every step
    control = control or Control()
    rt = JobRuntime(model, problem, dtype, device, first=True, last=True, preview=control.preview)
    kvs = lanes.kv_buffers(rt, blocks, DisplacedKV, spans=spans, rank=comm.rank, comm=comm)
    txt = rt.span_txt(sp)
    items = rt.schedule(sp, warmup_steps=cfg.warmup_steps)  # one item per evaluation: this rank's band
    for item in control.track(items):
        t = item.eval
        if item.step_boundary and control.agree_stop(whole):
            _finish(kvs)  # every rank started the same gathers: they complete
            raise JobCancelled(f"cancelled before step {item.step + 1}")
        for kv in _every(kvs):
            kv.set_mode(sync=item.warmup, exchange=t < items.evals - 1)
        _, img = rt.run_blocks(blocks, kvs, sp, txt, rt.embed_image(rt.x[:, sp.i0:sp.i1], sp, t), t)
        rt.update(t, sp.i0, sp.i1, img)
        if item.closes_step:
            control.step_done(item.step)
    _finish(kvs)
    return gather_bands(whole, rt.x, lanes.ranges(spans))


def _every(kvs: list) -> list:
    """Every buffer of every block (a block may hold several, e.g. SD3.5's second, image-only attention)."""
    return [kv for block in kvs for kv in block]


def _finish(kvs: list) -> None:
    for kv in _every(kvs):
        kv.finish()
