"""CFG parallelism: the positive and the negative branch of classifier-free guidance on two halves of the
group.

Rank r of a group of N belongs to branch r // (N/2) (0: positive, 1: negative) and is rank r % (N/2) of
its half, which runs the rest of the plan (serial on one rank, or pipefusion, distrifusion, ulysses) on its
branch's conditioning alone: half the model batch per rank. Where a rank turns the model's output into
the denoised latent (every rank of a lockstep strategy, PipeFusion's last stage), it exchanges its output
for the same tokens with its peer in the other branch (an all_gather over the pair, once per evaluation)
and both apply the guidance ``negative + cfg * (positive - negative)`` and the sampler step to the same
numbers, so the two halves keep the same latent, exactly as the serial [positive; negative] batch does.

Cancel: only rank 0 hears the user. The branch leaders (local rank 0 of each half, the ranks that ask
``Control.cancelled`` at every step boundary in every strategy) share rank 0's answer with a one-byte
broadcast on their own control group, so both halves stop before the same evaluation.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .groups import plan_groups
from .runtime import Control


class Branch:
    """This rank's branch of a CFG job: ``both`` turns this branch's model output for some tokens into the
    [positive; negative] batch, with the other branch's output for the same tokens."""

    def __init__(self, comm, pair, index: int) -> None:
        self.comm, self.pair, self.index = comm, pair, index

    def both(self, out: torch.Tensor) -> torch.Tensor:
        """[B, L, C] of this branch -> [2B, L, C], positive first (one all_gather over the pair)."""
        buf = torch.empty((2, *out.shape), dtype=out.dtype, device=out.device)
        self.comm.all_gather_into(buf, out[None], ch=self.pair)
        return buf.flatten(0, 1)


class BranchControl(Control):
    """A job's control as a branch sees it: progress goes to the job's own hooks; the cancel decision is
    rank 0's, broadcast to the other branch's leader."""

    def __init__(self, control: Control, comm, leaders) -> None:
        # each rank previews the tokens it samples, as without CFG; the bench's timeline records the branch's items
        super().__init__(preview=control.preview, trace=control.trace)
        self.inner, self.comm, self.leaders = control, comm, leaders

    def step_done(self, t: int) -> None:
        self.inner.step_done(t)  # publishes the preview too

    def cancelled(self) -> bool:
        flag = self.inner.cancelled() if self.comm.rank == 0 else False
        if self.leaders is None:  # not a leader: never asked (lockstep strategies ask local rank 0 only)
            return flag
        t = torch.tensor([int(flag)], dtype=torch.uint8)
        return bool(self.comm._broadcast(t, 0, self.leaders)[0])


def branch_problem(problem, index: int, branch: Branch):
    """The job as one branch runs it: its own conditioning and reference latents (the model batch is the images
    alone)."""
    if problem.branches != 2:
        raise ValueError(f"CFG parallelism needs a true-CFG job of two branches (cfg != 1, with a negative "
                         f"conditioning); this one has {problem.branches}")
    b = problem.batch
    rows = slice(index * b, (index + 1) * b)
    return replace(problem, txt=problem.txt[rows], branch=branch,
                   pooled=None if problem.pooled is None else problem.pooled[rows],
                   guidance=None if problem.guidance is None else problem.guidance[rows],
                   refs=tuple(r[rows] for r in problem.refs))  # reference latents (Kontext): [MB, C, h, w] too


def run_cfg(model, blocks: list, problem, cfg, comm, dtype: torch.dtype, device: torch.device,
            control: Control | None = None) -> torch.Tensor | None:
    """This rank's part of a CFG plan; returns the final latent [B, S_img, C] on rank 0, else None."""
    from . import strategy_fn
    from .serial import run_serial

    groups = plan_groups(comm, cfg)
    index = cfg.coords(comm.rank)[0]
    half = branch_problem(problem, index, Branch(comm, groups.pair, index))
    ctrl = BranchControl(control or Control(), comm, groups.leaders)
    inner = cfg.branch()
    if inner.strategy == "serial":
        x = run_serial(model, half, dtype, device, ctrl)
    else:
        x = strategy_fn(inner.strategy)(model, blocks, half, inner, groups.branch, dtype, device, ctrl)
    return x if comm.rank == 0 else None
