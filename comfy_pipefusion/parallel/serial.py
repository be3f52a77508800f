"""The references: diffusers' own forward over the whole image (``serial``), and our patch-wise blocks run
on one span covering a whole (sub-)image (``run_local``, which the naive patch baseline uses per band)."""
from __future__ import annotations

import torch

from ..models import flux
from ..patches import full_span
from ..sampling.samplers import flow_denoised, make_sampler
from .runtime import Control, JobCancelled, JobRuntime


def run_serial(model, problem, dtype: torch.dtype, device: torch.device, control: Control | None = None,
               comm=None) -> torch.Tensor:
    """Sample with diffusers' FluxTransformer2DModel.forward at every step; returns [B, S_img, 64]."""
    b = problem.batch
    x = problem.x0.to(device).clone()
    sampler = make_sampler(problem.spec.sampler, problem.sigmas)
    txt, pooled = problem.txt.to(device, dtype), problem.pooled.to(device, dtype)
    guidance = problem.guidance.to(device) if model.config.guidance_embeds else None
    img_ids, txt_ids = problem.img_ids.to(device), problem.txt_ids.to(device)
    control = control or Control()
    for t in range(len(problem.sigmas) - 1):
        if t and control.cancelled():
            raise JobCancelled(f"cancelled before step {t + 1}")
        sigma = float(problem.sigmas[t])
        v = model(hidden_states=x.to(dtype), encoder_hidden_states=txt, pooled_projections=pooled,
                  timestep=torch.full((b,), sigma, device=device), img_ids=img_ids, txt_ids=txt_ids,
                  guidance=guidance, return_dict=False)[0].float()
        x = sampler.step(t, slice(None), x, flow_denoised(x, v, sigma))
        control.step_done(t)
    return x


def run_local(model, problem, dtype: torch.dtype, device: torch.device, control: Control | None = None,
              comm=None) -> torch.Tensor:
    """Our blocks on one span covering all of ``problem``'s tokens (no other rank involved).

    With ``comm``, the ranks running their own ``run_local`` agree on cancel at every step boundary."""
    rt = JobRuntime(model, problem, dtype, device, first=True, last=True)
    blocks = flux.blocks_of(model)
    kvs = rt.kv_buffers(blocks)
    span = full_span(problem.n_txt, problem.n_img)
    rope = rt.emb.rope_for(span)
    control = control or Control()
    for t in range(rt.steps):
        if t and (control.agree_stop(comm) if comm else control.cancelled()):
            raise JobCancelled(f"cancelled before step {t + 1}")
        _, img = flux.run_blocks(model, blocks, kvs, span, rt.emb.txt, rt.embed_image(rt.x), rt.temb(t), rope)
        rt.update(t, 0, problem.n_img, img)
        control.step_done(t)
    return rt.x
