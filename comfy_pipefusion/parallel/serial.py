"""The references: diffusers' own forward over the whole image (``serial``), and our patch-wise blocks run
on one span covering a whole image or one band of it (``run_local``, which the naive patch baseline uses
per band)."""
from __future__ import annotations

import torch

from ..patches import Span, full_span
from ..errors import JobCancelled
from .runtime import Control, JobRuntime, reference_inputs


def run_serial(model, problem, dtype: torch.dtype, device: torch.device,
               control: Control | None = None) -> torch.Tensor:
    """Sample with the family's diffusers forward at every evaluation; returns [B, S_img, C]."""
    control = control or Control()
    rt = JobRuntime(model, problem, dtype, device, first=True, last=True, preview=control.preview)
    txt = problem.txt.to(device, dtype)
    refs = reference_inputs(problem)
    if refs:
        refs["refs"] = tuple(r.to(device, dtype) for r in refs["refs"])
    for item in control.track(rt.schedule(full_span(problem.n_span_txt, problem.n_img))):
        k = item.eval
        if item.step_boundary and control.cancelled():
            raise JobCancelled(f"cancelled before step {item.step + 1}")
        x_in = rt.x if problem.inpaint is None else problem.inpaint.model_input(rt.ms, rt.evals[k], rt.x, slice(None))
        x_in = rt.ms.calculate_input(rt.evals[k], x_in)
        if problem.cfg:
            x_in = torch.cat([x_in] * problem.branches)
        out = rt.fam.forward(model, x_in.to(dtype), rt.timestep(k), txt, rt.pooled, rt.guidance, problem.rows,
                             problem.cols, **refs).float()
        rt.x = rt.sampler.step(k, slice(None), rt.x, rt.denoised(k, rt.x, out, slice(None)))
        if item.closes_step:
            control.step_done(item.step)
    return rt.x


def run_local(model, problem, dtype: torch.dtype, device: torch.device, control: Control | None = None,
              comm=None, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Our blocks on one span covering the token rows ``rows`` (default: all) as if they were the whole
    image (no other rank involved; the band keeps its true positions). Returns the band's latent.

    With ``comm``, the ranks running their own ``run_local`` agree on cancel at every step boundary."""
    r0, r1 = rows or (0, problem.rows)
    i0, i1 = r0 * problem.cols, r1 * problem.cols
    control = control or Control()
    rt = JobRuntime(model, problem, dtype, device, first=True, last=True, preview=control.preview)
    blocks = rt.fam.blocks_of(model)
    kvs = rt.kv_buffers(blocks, n_img=i1 - i0)
    local = full_span(problem.n_span_txt, i1 - i0)  # positions in this band's buffers
    where = Span(0, problem.n_span_txt, i0, i1)  # positions in the image
    for item in control.track(rt.schedule(where)):
        k = item.eval
        if item.step_boundary and (control.agree_stop(comm) if comm else control.cancelled()):
            raise JobCancelled(f"cancelled before step {item.step + 1}")
        _, img = rt.run_blocks(blocks, kvs, local, rt.span_txt(local), rt.embed_image(rt.x[:, i0:i1], where, k),
                               k, where)
        rt.update(k, i0, i1, img)
        if item.closes_step:
            control.step_done(item.step)
    return rt.x[:, i0:i1]
