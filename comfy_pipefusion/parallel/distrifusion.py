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
from ..models import flux
from ..patches import displaced_spans
from .runtime import Control, JobCancelled, JobRuntime, gather_bands


def run_distrifusion(model, blocks: list, problem, cfg, comm, dtype: torch.dtype, device: torch.device,
                     control: Control | None = None) -> torch.Tensor | None:
    """This rank's band. Returns the final latent [B, S_img, 64] on rank 0, else None."""
    spans = displaced_spans(problem.rows, problem.cols, problem.n_txt, comm.world_size)
    sp = spans[comm.rank]
    rt = JobRuntime(model, problem, dtype, device, first=True, last=True)
    kvs = rt.kv_buffers(blocks, DisplacedKV, spans=spans, rank=comm.rank, comm=comm)
    rope = rt.emb.rope_for(sp)
    txt = rt.emb.txt[:, sp.t0:sp.t1] if sp.n_txt else None
    control = control or Control()
    for t in range(rt.steps):
        if t and control.agree_stop(comm):
            for kv in kvs:
                kv.finish()  # every rank started the same gathers: they complete
            raise JobCancelled(f"cancelled before step {t + 1}")
        for kv in kvs:
            kv.set_mode(sync=t < cfg.warmup_steps, exchange=t < rt.steps - 1)
        _, img = flux.run_blocks(model, blocks, kvs, sp, txt, rt.embed_image(rt.x[:, sp.i0:sp.i1]),
                                 rt.temb(t), rope)
        rt.update(t, sp.i0, sp.i1, img)
        control.step_done(t)
    for kv in kvs:
        kv.finish()
    return gather_bands(comm, rt.x, [(s.i0, s.i1) for s in spans])
