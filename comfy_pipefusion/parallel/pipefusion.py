"""PipeFusion: patch-level pipeline parallelism over a ring of stages.

Stage s holds a contiguous range of blocks. Work is the job's schedule of *items* (``schedule.py``): the
warm-up steps are one item each covering the whole image, so they run synchronously and fill every K/V
buffer; each later step is M items, one per band of token rows. Stage s receives an item's activations from
s - 1, runs its blocks (attention over its stale K/V buffers), and sends the result to s + 1. The last stage
applies the sampler to the patch and sends the new latent patch back to stage 0, so step t + 1 starts while
step t is still in flight: no drain between steps. Receives are posted one item ahead (see
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

from ..attention import StaleKV
from ..errors import JobCancelled
from ..patches import full_span, pipefusion_spans
from .lanes import OneLane
from .runtime import Control, JobRuntime

log = logging.getLogger("comfy_pipefusion.pipefusion")


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
    ``cap`` the oldest is waited for (``send_cap`` says how large the cap must be)."""

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


def send_cap(patches: int, stages: int) -> int:
    """How many sends a stage keeps in flight before it waits for the oldest (``_Sends``), for a ring of
    ``stages`` stages whose evaluations are cut into at most ``patches`` items (M).

    The floor is set by ordering, not memory. Under NCCL a send completes only once its peer has posted
    the matching receive, and one communicator runs its operations in issue order (``rules.py``; the
    ``nccl`` mode emulates it on gloo). Waiting for a send whose receive the peer can post only after this
    stage moves on is a deadlock, and the ring closes that cycle: the last stage waits on stage 0, stage 0
    on the last stage. Receives are posted in item order, one item ahead, and no stage runs more than one
    evaluation (M items) ahead of the last stage: stage 0 needs, for each item, the ring patch the last
    stage sends once it has finished the same band of the previous evaluation (all M at once after a
    warm-up item). So at most M of a stage's sends -- activations to s + 1, or ring patches to stage 0 --
    wait for a receive not yet posted, and they are the newest: with a cap of M or more, the oldest send,
    the one a full queue waits for, always has its receive posted.

    The cap is 2 (M + n) + 2, over twice that floor, so that sends already matched but not yet seen
    complete (retired only from the head of the queue) never make a stage wait in the steady state. What
    it buys is a bound on the buffers in the pools: they grow with M and n, never with the number of steps.
    """
    return 2 * (patches + stages) + 2


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
                   control: Control | None = None, lanes=None) -> torch.Tensor | None:
    """This rank's stage of the ring. Returns the final latent [B, S_img, 64] on rank 0, else None.

    ``lanes`` (``lanes.Lanes``): Ulysses inside each stage; ``comm`` is then this rank's lane across the
    stages, each item runs on the lane's part of its span, and lane 0 brings the final latent to rank 0.

    Groups: activations go s -> s + 1 on hop group s, latent patches N - 1 -> 0 on the ring group; each
    carries one direction only, so under NCCL's in-order streams no receive can sit in front of a send
    its peer needs first. Stage 0 posts its ring receives one item ahead; the other stages post one item
    ahead within an evaluation, and the first item of the next evaluation once stage 0's decision for it
    is known (``_Decisions``): on cancel no stage has a receive posted that nobody will answer, stage 0
    takes in the ring patches still coming, and every rank raises ``JobCancelled`` with nothing in flight.
    """
    control, lanes = control or Control(), lanes or OneLane()
    s, n = comm.rank, comm.world_size
    first, last = s == 0, s == n - 1
    rt = JobRuntime(model, problem, dtype, device, first, last, preview=control.preview)
    kvs = lanes.kv_buffers(rt, blocks, StaleKV)
    items = rt.schedule(full_span(problem.n_span_txt, problem.n_img),
                        pipefusion_spans(problem.rows, problem.cols, problem.n_span_txt, cfg.num_patches,
                                         cfg.text_stream), cfg.warmup_steps)
    width = rt.width
    b, mb, chans = problem.batch, problem.model_batch, problem.x0.shape[2]
    hop_in, hop_out = (None if first else comm.hop(s - 1)), (None if last else comm.hop(s))
    ring = comm.ring if first or last else None
    acts, lats = _Buffers(dtype, device), _Buffers(torch.float32, device)
    decisions = _Decisions(comm, control, items.evals)
    sends = _Sends(cap=send_cap(items.max_patches, n))

    def post_recv(i: int):
        """Post the receive item i needs on this stage (None: item i needs none, or there is no item i)."""
        if i >= len(items):
            return None
        item = items[i]
        sp = lanes.part(item.span)
        if not first:  # activations of item i from the previous stage, text first
            return comm.irecv(acts.take((mb, sp.n_txt + sp.n_img, width)), s - 1, hop_in)
        if item.eval > 0:  # the latent patch the last stage produced at evaluation t - 1
            return comm.irecv(lats.take((b, sp.n_img, chans)), n - 1, ring)
        return None

    def stop(item, pending) -> None:
        """Stop before ``item`` (the first of its evaluation): take in what the ring still brings, raise."""
        if first:  # the ring brings every patch of this evaluation: the last stage made them all
            if pending is not None:
                pending.wait()
            for later in items.rest_of_eval(item):
                post_recv(later.index).wait()
        sends.drain()
        decisions.finish()
        raise JobCancelled(f"cancelled at step {item.step + 1}")

    ring_next = next((it.index for it in items if it.eval > 0), len(items))
    x0 = problem.x0.to(device) if first else None
    nxt = post_recv(0)
    for item in control.track(items):
        i, t = item.index, item.eval
        if item.eval_boundary:
            if decisions.stop_before(t):
                stop(item, nxt)
            if not first:
                nxt = post_recv(i)
        cur = nxt
        nxt = post_recv(i + 1) if first or not item.closes_eval else None
        sp = lanes.enter(item.span)  # this lane's part of the item (the item's own span without lanes)
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
            whole = item.span  # every lane samples the whole span: the lanes keep one latent and sampler state
            rt.step(t, whole.i0, whole.i1, lanes.whole_output(rt.output(t, img), whole))
            # Ring: every patch of step t + 1 whose rows are now all updated goes back to stage 0.
            while ring_next < len(items) and items[ring_next].eval == t + 1 and items[ring_next].span.i1 <= whole.i1:
                r = lanes.part(items[ring_next].span)
                buf = lats.take((b, r.n_img, chans))
                buf.copy_(rt.x[:, r.i0:r.i1])
                sends.add(comm.isend(buf, 0, ring), lats)
                ring_next += 1
        if not first:
            acts.give(h)
        if item.closes_step:
            control.step_done(item.step)
    sends.drain()
    decisions.finish()
    log.debug("stage %d: %d items through %d activation and %d latent buffers", s, len(items), acts.allocated,
              lats.allocated)
    if lanes.index:  # lane 0 holds the same latent
        return None
    if last:
        comm.isend(rt.x, 0, ring).wait()
        return None
    if first:
        return comm.irecv(torch.empty_like(problem.x0, device=device), n - 1, ring).wait()
    return None
