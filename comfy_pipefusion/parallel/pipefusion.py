"""PipeFusion: patch-level pipeline parallelism over a ring of stages.

Stage s holds a contiguous range of blocks. Work is a sequence of *items* (step, patch): the warm-up steps
are one item each covering the whole image, so they run synchronously and fill every K/V buffer; each
later step is M items, one per band of token rows. Stage s receives an item's activations from s - 1,
runs its blocks (attention over its stale K/V buffers), and sends the result to s + 1. The last stage
applies the sampler to the patch and sends the new latent patch back to stage 0, so step t + 1 starts
while step t is still in flight: no drain between steps. Receives are posted one item ahead (see
``run_pipefusion`` for the groups and the order that keep this correct under NCCL's rules).

Text tokens (Flux's text stream) are computed with one patch per step and ride along with it; the other
patches read the text K/V that patch left in the buffers. ``text_stream`` picks which patch:
``last_patch`` (default: text sees a fully fresh image, other patches use last step's text K/V),
``first_patch`` (xDiT's choice: text sees mostly stale image K/V), or ``every_patch`` (recompute the text
with every patch: freshest, and M times the text work and traffic).
"""
from __future__ import annotations

import logging
from collections import deque

import torch

from ..errors import JobCancelled
from ..patches import full_span, pipefusion_spans
from .runtime import Control, JobRuntime

log = logging.getLogger("comfy_pipefusion.pipefusion")


def schedule(problem, evals: int, sync: int, patches: int, text_stream: str) -> list[tuple[int, object]]:
    """Items (evaluation, Span) in the order every stage processes them: the first ``sync`` evaluations
    whole, the rest as bands."""
    full = full_span(problem.n_span_txt, problem.n_img)
    bands = pipefusion_spans(problem.rows, problem.cols, problem.n_span_txt, patches, text_stream)
    return [(t, full) for t in range(min(sync, evals))] + \
           [(t, sp) for t in range(sync, evals) for sp in bands]


class _Buffers:
    """Fixed-shape message buffers of one job, reused: a buffer is taken from the pool, and goes back once
    its contents are consumed (a receive) or its send has completed (never overwritten in flight)."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device, self.free = dtype, device, {}
        self.allocated = 0

    def take(self, shape: tuple) -> torch.Tensor:
        free = self.free.get(shape)
        if free:
            return free.pop()
        self.allocated += 1
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def give(self, t: torch.Tensor) -> None:
        self.free.setdefault(tuple(t.shape), []).append(t)


class _Sends:
    """Sends in flight: completed ones are dropped as we go (their buffers back to their pool); past
    ``cap`` the oldest is waited for."""

    def __init__(self, cap: int) -> None:
        self.cap, self.q = cap, deque()

    def add(self, pending, pool: _Buffers | None = None) -> None:
        self.q.append((pending, pool))
        while self.q and (len(self.q) > self.cap or self.q[0][0].is_completed()):
            self._retire()

    def _retire(self) -> None:
        pending, pool = self.q.popleft()
        buf = pending.wait()
        if pool is not None:
            pool.give(buf)

    def drain(self) -> None:
        while self.q:
            self._retire()


class _Decisions:
    """Stage 0's cancel decision at every evaluation boundary, told to the other stages on the control
    plane: stage 0 sends one byte per stage per boundary and runs on; every other stage has the receive
    for the next boundary posted a whole evaluation ahead, so it finds the decision there when it arrives."""

    def __init__(self, comm, control: Control, evals: int) -> None:
        self.comm, self.control, self.evals = comm, control, evals
        self.sent = _Sends(cap=4 * comm.world_size)
        self.next = self._post(1)

    def _post(self, t: int):
        if self.comm.rank == 0 or t >= self.evals:
            return None
        return self.comm.irecv(torch.zeros(1, dtype=torch.uint8), 0, self.comm.control)

    def stop_before(self, t: int) -> bool:
        """Whether to stop before evaluation t (the same answer on every stage)."""
        comm = self.comm
        if comm.rank == 0:
            stop = self.control.cancelled()
            for r in range(1, comm.world_size):
                self.sent.add(comm.isend(torch.tensor([int(stop)], dtype=torch.uint8), r, comm.control))
            return stop
        stop = bool(self.next.wait()[0])  # a CPU tensor: no device sync
        self.next = None if stop else self._post(t + 1)
        return stop

    def finish(self) -> None:
        self.sent.drain()


def run_pipefusion(model, blocks: list, problem, cfg, comm, dtype: torch.dtype, device: torch.device,
                   control: Control | None = None) -> torch.Tensor | None:
    """This rank's stage of the ring. Returns the final latent [B, S_img, 64] on rank 0, else None.

    Groups: activations go s -> s + 1 on hop group s, latent patches N - 1 -> 0 on the ring group; each
    carries one direction only, so under NCCL's in-order streams no receive can sit in front of a send
    its peer needs first. Stage 0 posts its ring receives one item ahead; the other stages post one item
    ahead within an evaluation, and the first item of the next evaluation once stage 0's decision for it
    is known (``_Decisions``): on cancel no stage has a receive posted that nobody will answer, stage 0
    takes in the ring patches still coming, and every rank raises ``JobCancelled`` with nothing in flight.
    """
    control = control or Control()
    s, n = comm.rank, comm.world_size
    first, last = s == 0, s == n - 1
    rt = JobRuntime(model, problem, dtype, device, first, last, preview=control.preview)
    kvs = rt.kv_buffers(blocks)
    items = schedule(problem, len(rt.evals), rt.sync_evals(cfg.warmup_steps), cfg.num_patches, cfg.text_stream)
    width = rt.width
    b, mb, chans = problem.batch, problem.model_batch, problem.x0.shape[2]
    hop_in, hop_out = (None if first else comm.hop(s - 1)), (None if last else comm.hop(s))
    ring = comm.ring if first or last else None
    acts, lats = _Buffers(dtype, device), _Buffers(torch.float32, device)
    decisions = _Decisions(comm, control, len(rt.evals))

    def opens(i: int) -> bool:  # item i is the first of its evaluation
        return i == 0 or items[i - 1][0] != items[i][0]

    def post_recv(i: int):
        if i >= len(items):
            return None
        t, sp = items[i]
        if not first:  # activations of item i from the previous stage, text first
            return comm.irecv(acts.take((mb, sp.n_txt + sp.n_img, width)), s - 1, hop_in)
        if t > 0:  # the latent patch the last stage produced at evaluation t - 1
            return comm.irecv(lats.take((b, sp.n_img, chans)), n - 1, ring)
        return None

    def stop(i: int, pending) -> None:
        """Stop before item i (the first of its evaluation): take in what the ring still brings, raise."""
        if first:  # the ring brings every patch of this evaluation: the last stage made them all
            t = items[i][0]
            if pending is not None:
                pending.wait()
            for j in range(i + 1, len(items)):
                if items[j][0] == t:
                    post_recv(j).wait()
        sends.drain()
        decisions.finish()
        raise JobCancelled(f"cancelled at step {rt.step_of(items[i][0]) + 1}")

    sends = _Sends(cap=2 * (len(items) // max(1, len(rt.evals)) + n) + 2)
    ring_next = next((i for i, (t, _) in enumerate(items) if t > 0), len(items))
    x0 = problem.x0.to(device) if first else None
    nxt = post_recv(0)
    for i, (t, sp) in enumerate(items):
        if t > 0 and opens(i):
            if decisions.stop_before(t):
                stop(i, nxt)
            if not first:
                nxt = post_recv(i)
        cur = nxt
        nxt = post_recv(i + 1) if first or (i + 1 < len(items) and not opens(i + 1)) else None
        if first:
            x_in = x0[:, sp.i0:sp.i1] if cur is None else cur.wait()
            txt, img = rt.span_txt(sp), rt.embed_image(x_in, sp, t)
            if cur is not None:
                lats.give(x_in)
        else:
            h = cur.wait()  # [MB, n_txt + n_img, D]
            txt, img = (h[:, :sp.n_txt] if sp.n_txt else None), h[:, sp.n_txt:]
        txt, img = rt.run_blocks(blocks, kvs, sp, txt, img, t)
        if not last:
            msg = acts.take((mb, sp.n_txt + sp.n_img, width))
            if txt is not None:
                msg[:, :sp.n_txt] = txt
            msg[:, sp.n_txt:] = img
            sends.add(comm.isend(msg, s + 1, hop_out), acts)
        else:
            rt.update(t, sp.i0, sp.i1, img)
            # Ring: every patch of step t + 1 whose rows are now all updated goes back to stage 0.
            while ring_next < len(items) and items[ring_next][0] == t + 1 and items[ring_next][1].i1 <= sp.i1:
                r = items[ring_next][1]
                buf = lats.take((b, r.n_img, chans))
                buf.copy_(rt.x[:, r.i0:r.i1])
                sends.add(comm.isend(buf, 0, ring), lats)
                ring_next += 1
        if not first:
            acts.give(h)
        if i + 1 == len(items) or rt.step_of(items[i + 1][0]) != rt.step_of(t):
            control.step_done(rt.step_of(t))
    sends.drain()
    decisions.finish()
    log.debug("stage %d: %d items through %d activation and %d latent buffers", s, len(items), acts.allocated,
              lats.allocated)
    if last:
        comm.isend(rt.x, 0, ring).wait()
        return None
    if first:
        return comm.irecv(torch.empty_like(problem.x0, device=device), n - 1, ring).wait()
    return None
