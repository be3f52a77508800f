"""Per-rank, per-job state shared by every strategy: device copies, time embeddings, K/V buffers, the
sampler, and the last layer's update of one patch."""
from __future__ import annotations

import torch

from ..attention import StaleKV
from ..models import flux
from ..sampling.samplers import flow_denoised, make_sampler


class JobRuntime:
    """What one rank holds while it samples one job.

    ``model`` may hold only some modules (the rest on the meta device): ``first`` says whether this rank
    embeds the text (and image), ``last`` whether it owns the sampler and the latent.
    """

    def __init__(self, model, problem, dtype: torch.dtype, device: torch.device, first: bool, last: bool) -> None:
        self.model, self.problem, self.dtype, self.device = model, problem, dtype, device
        self.first, self.last = first, last
        self.sigmas = problem.sigmas
        self.steps = len(problem.sigmas) - 1
        b = problem.batch
        self.pooled = problem.pooled.to(device, dtype)
        self.guidance = problem.guidance.to(device) if problem.guidance is not None else None
        txt = problem.txt.to(device, dtype) if first else None
        self.emb = flux.Embeddings(model, txt, problem.txt_ids.to(device), problem.img_ids.to(device))
        self.x = problem.x0.to(device).clone() if last else None  # [B, S_img, 64] float32
        self.sampler = make_sampler(problem.spec.sampler, problem.sigmas) if last else None
        self._temb: dict[int, torch.Tensor] = {}
        self._sigma_b = [torch.full((b,), float(s), device=device) for s in problem.sigmas]

    def temb(self, t: int) -> torch.Tensor:
        """Step t's conditioning vector for every block's AdaLN (computed once per step)."""
        if t not in self._temb:
            self._temb = {t: flux.time_embedding(self.model, self._sigma_b[t], self.pooled, self.guidance,
                                                 self.dtype)}
        return self._temb[t]

    def kv_buffers(self, blocks: list, cls=StaleKV, n_img: int | None = None, **kw) -> list:
        cfg = self.model.config
        return [cls(self.problem.batch, cfg.num_attention_heads, self.problem.n_txt,
                    self.problem.n_img if n_img is None else n_img, cfg.attention_head_dim,
                    self.dtype, self.device, **kw) for _ in blocks]

    def embed_image(self, x_patch: torch.Tensor) -> torch.Tensor:
        return self.model.x_embedder(x_patch.to(self.dtype))  # [B, L, D]

    def update(self, t: int, i0: int, i1: int, img: torch.Tensor) -> torch.Tensor:
        """Last layer + sampler step on image tokens [i0, i1); returns the patch's new latent."""
        v = flux.final_layer(self.model, img, self.temb(t)).float()  # [B, L, 64]
        x = self.x[:, i0:i1]
        new = self.sampler.step(t, slice(i0, i1), x, flow_denoised(x, v, float(self.sigmas[t])))
        self.x[:, i0:i1] = new
        return new


def gather_bands(comm, x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor | None:
    """Collect every rank's image-token range of ``x`` on rank 0; returns the full latent there."""
    if comm.rank != 0:
        i0, i1 = ranges[comm.rank]
        comm.isend(x[:, i0:i1].clone(), 0).wait()
        return None
    for r, (i0, i1) in enumerate(ranges[1:], start=1):
        x[:, i0:i1] = comm.irecv(torch.empty_like(x[:, i0:i1]), r).wait()
    return x


class JobCancelled(Exception):
    """The job was cancelled; every rank stopped at the same step boundary and the group is usable."""


class Control:
    """A job's hooks on one rank: progress after each step, and the cancel decision.

    Only rank 0 hears the user; ``cancelled`` is its flag. Strategies whose ranks run in lockstep share it
    with ``agree_stop`` (a one-element broadcast per step, not counted as traffic); PipeFusion sends the
    decision down the pipe with the data instead, so the pipeline never drains at a step boundary.
    """

    def __init__(self, on_step=None, cancelled=None) -> None:
        self._on_step = on_step
        self._cancelled = cancelled

    def step_done(self, t: int) -> None:
        if self._on_step is not None:
            self._on_step(t)

    def cancelled(self) -> bool:
        return bool(self._cancelled and self._cancelled())

    def agree_stop(self, comm) -> bool:
        if comm.world_size == 1 or not torch.distributed.is_initialized():
            return self.cancelled()
        flag = torch.tensor([1.0 if comm.rank == 0 and self.cancelled() else 0.0], device=comm.device)
        torch.distributed.broadcast(flag, 0, group=comm.group)
        return bool(flag.item())
