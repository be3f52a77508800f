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

from ..patches import full_span, pipefusion_spans
from .runtime import Control, JobCancelled, JobRuntime


def schedule(problem, evals: int, sync: int, patches: int, text_stream: str) -> list[tuple[int, object]]:
    """Items (evaluation, Span) in the order every stage processes them: the first ``sync`` evaluations
    whole, the rest as bands."""
    full = full_span(problem.n_span_txt, problem.n_img)
    bands = pipefusion_spans(problem.rows, problem.cols, problem.n_span_txt, patches, text_stream)
    return [(t, full) for t in range(min(sync, evals))] + \
           [(t, sp) for t in range(sync, evals) for sp in bands]


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
                   control: Control | None = None) -> torch.Tensor | None:
    """This rank's stage of the ring. Returns the final latent [B, S_img, 64] on rank 0, else None.

    Stage-to-stage messages carry one extra row whose first element is the stop flag. Stage 0 checks for
    cancel before each step; on cancel it sends stop messages for the (at most two) items the next stage
    has posted receives for, drains the ring, and every stage passes the stop on the same way. Every
    rank then raises ``JobCancelled`` with no request left in flight.
    """
    control = control or Control()
    s, n = comm.rank, comm.world_size
    first, last = s == 0, s == n - 1
    rt = JobRuntime(model, problem, dtype, device, first, last)
    kvs = rt.kv_buffers(blocks)
    items = schedule(problem, len(rt.evals), rt.sync_evals(cfg.warmup_steps), cfg.num_patches, cfg.text_stream)
    width = rt.width
    b, mb, chans = problem.batch, problem.model_batch, problem.x0.shape[2]

    def message(sp) -> torch.Tensor:  # [MB, n_txt + n_img + 1, D]: tokens, then the flag row
        return torch.zeros(mb, sp.n_txt + sp.n_img + 1, width, dtype=dtype, device=device)

    def post_recv(i: int):
        if i >= len(items):
            return None
        t, sp = items[i]
        if not first:  # activations of item i from the previous stage, text first
            return comm.irecv(message(sp), s - 1)
        if t > 0:  # the latent patch the last stage produced at step t - 1
            return comm.irecv(torch.empty(b, sp.n_img, chans, device=device), n - 1)
        return None

    def stop(i: int, pending) -> None:
        """Stop at item i: collect what is still coming to us, tell the next stage, raise."""
        if first:  # the ring still brings every patch of this step
            t = items[i][0]
            if pending is not None:
                pending.wait()
            for j in range(i + 1, len(items)):
                if items[j][0] == t:
                    post_recv(j).wait()
        elif pending is not None:
            pending.wait()  # the stop message for item i + 1
        if not last:
            for j in (i, i + 1):
                if j < len(items):
                    msg = message(items[j][1])
                    msg[0, -1, 0] = 1
                    sends.add(comm.isend(msg, s + 1))
        sends.drain()
        raise JobCancelled(f"cancelled at step {rt_step(items[i][0]) + 1}")

    sends = _Sends(cap=2 * (len(items) // max(1, len(rt.evals)) + n) + 2)
    rt_step = rt.step_of
    ring_next = next((i for i, (t, _) in enumerate(items) if t > 0), len(items))
    nxt = post_recv(0)
    for i, (t, sp) in enumerate(items):
        if first and t > 0 and items[i - 1][0] != t and control.cancelled():
            stop(i, nxt)
        cur, nxt = nxt, post_recv(i + 1)
        if first:
            x_in = problem.x0[:, sp.i0:sp.i1].to(device) if cur is None else cur.wait()
            txt, img = rt.span_txt(sp), rt.embed_image(x_in, sp, t)
        else:
            h = cur.wait()  # [B, n_txt + n_img + 1, D]
            if h[0, -1, 0] != 0:
                stop(i, nxt)
            txt, img = (h[:, :sp.n_txt] if sp.n_txt else None), h[:, sp.n_txt:-1]
        txt, img = rt.run_blocks(blocks, kvs, sp, txt, img, t)
        if not last:
            msg = message(sp)
            if txt is not None:
                msg[:, :sp.n_txt] = txt
            msg[:, sp.n_txt:-1] = img
            sends.add(comm.isend(msg, s + 1))
        else:
            rt.update(t, sp.i0, sp.i1, img)
            # Ring: every patch of step t + 1 whose rows are now all updated goes back to stage 0.
            while ring_next < len(items) and items[ring_next][0] == t + 1 and items[ring_next][1].i1 <= sp.i1:
                r = items[ring_next][1]
                sends.add(comm.isend(rt.x[:, r.i0:r.i1].clone(), 0))
                ring_next += 1
        if i + 1 == len(items) or rt_step(items[i + 1][0]) != rt_step(t):
            control.step_done(rt_step(t))
    sends.drain()
    if last:
        comm.isend(rt.x, 0).wait()
        return None
    if first:
        return comm.irecv(torch.empty_like(problem.x0, device=device), n - 1).wait()
    return None
