"""PipeFusion: patch-level pipeline parallelism over a ring of stages.

Stage s holds a contiguous range of blocks. Work is a sequence of *items* (step, patch): the warm-up steps
are one item each covering the whole image, so they run synchronously and fill every K/V buffer; each
later step is M items, one per band of token rows. Stage s receives an item's activations from s - 1,
runs its blocks (attention over its stale K/V buffers), and sends the result to s + 1. The last stage
applies the sampler to the patch and sends the new latent patch back to stage 0, so step t + 1 starts
while step t is still in flight: no drain between steps. Every receive is posted one item ahead.

Text tokens (Flux's text stream) are computed with one patch per step and ride along with it; the other
patches read the text K/V that patch left in the buffers. ``text_stream`` picks which patch:
``last_patch`` (default: text sees a fully fresh image, other patches use last step's text K/V),
``first_patch`` (xDiT's choice: text sees mostly stale image K/V), or ``every_patch`` (recompute the text
with every patch: freshest, and M times the text work and traffic).
"""
from __future__ import annotations

from collections import deque

import torch

from ..models import flux
from ..patches import full_span, pipefusion_spans
from .runtime import JobRuntime


def schedule(problem, patches: int, warmup: int, text_stream: str) -> list[tuple[int, object]]:
    """Items (step, Span) in the order every stage processes them."""
    steps = len(problem.sigmas) - 1
    full = full_span(problem.n_txt, problem.n_img)
    bands = pipefusion_spans(problem.rows, problem.cols, problem.n_txt, patches, text_stream)
    return [(t, full) for t in range(min(warmup, steps))] + \
           [(t, sp) for t in range(warmup, steps) for sp in bands]


class _Sends:
    """Sends in flight: completed ones are dropped as we go; past ``cap`` the oldest is waited for."""

    def __init__(self, cap: int) -> None:
        self.cap, self.q = cap, deque()

    def add(self, pending) -> None:
        self.q.append(pending)
        while self.q and (len(self.q) > self.cap or self.q[0].work.is_completed()):
            self.q.popleft().wait()

    def drain(self) -> None:
        while self.q:
            self.q.popleft().wait()


def run_pipefusion(model, blocks: list, problem, cfg, comm, dtype: torch.dtype, device: torch.device,
                   on_step=None) -> torch.Tensor | None:
    """This rank's stage of the ring. Returns the final latent [B, S_img, 64] on rank 0, else None."""
    s, n = comm.rank, comm.world_size
    first, last = s == 0, s == n - 1
    rt = JobRuntime(model, problem, dtype, device, first, last)
    kvs = rt.kv_buffers(blocks)
    items = schedule(problem, cfg.num_patches, cfg.warmup_steps, cfg.text_stream)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    b = problem.batch

    def post_recv(i: int):
        if i >= len(items):
            return None
        t, sp = items[i]
        if not first:  # activations of item i from the previous stage, text first
            return comm.irecv(torch.empty(b, sp.n_txt + sp.n_img, width, dtype=dtype, device=device), s - 1)
        if t > 0:  # the latent patch the last stage produced at step t - 1
            return comm.irecv(torch.empty(b, sp.n_img, problem.x0.shape[2], device=device), n - 1)
        return None

    sends = _Sends(cap=2 * (len(items) // max(1, rt.steps) + n) + 2)
    ring_next = next((i for i, (t, _) in enumerate(items) if t > 0), len(items))
    nxt = post_recv(0)
    for i, (t, sp) in enumerate(items):
        cur, nxt = nxt, post_recv(i + 1)
        if first:
            x_in = problem.x0[:, sp.i0:sp.i1].to(device) if cur is None else cur.wait()
            txt, img = (rt.emb.txt if sp.n_txt else None), rt.embed_image(x_in)
        else:
            h = cur.wait()  # [B, n_txt + n_img, D]
            txt, img = (h[:, :sp.n_txt] if sp.n_txt else None), h[:, sp.n_txt:]
        txt, img = flux.run_blocks(model, blocks, kvs, sp, txt, img, rt.temb(t), rt.emb.rope_for(sp))
        if not last:
            sends.add(comm.isend(img if txt is None else torch.cat([txt, img], 1), s + 1))
        else:
            rt.update(t, sp.i0, sp.i1, img)
            # Ring: every patch of step t + 1 whose rows are now all updated goes back to stage 0.
            while ring_next < len(items) and items[ring_next][0] == t + 1 and items[ring_next][1].i1 <= sp.i1:
                r = items[ring_next][1]
                sends.add(comm.isend(rt.x[:, r.i0:r.i1].clone(), 0))
                ring_next += 1
        if on_step and (i + 1 == len(items) or items[i + 1][0] != t):
            on_step(t)
    sends.drain()
    if last:
        comm.isend(rt.x, 0).wait()
        return None
    if first:
        return comm.irecv(torch.empty_like(problem.x0, device=device), n - 1).wait()
    return None
