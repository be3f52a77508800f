"""Live previews: the x0 prediction of the image (batch entry 0) at every step boundary, from the ranks that
compute it to the launcher, through two shared memory segments the launcher creates for a job that wants
previews (none otherwise: no preview method, no traffic).

``preview``  float32 [K, S_img, D]: K slots (2..8, up to the job's steps) of x0 in token layout; step t goes
             into slot t % K, so the reader copies finished steps while the writers fill the next ones, and
             a reader K - 1 steps behind still gets each step's own x0 (further behind: the newest). A job
             of at most 8 steps has a slot per step: nothing is overwritten, however late the reader.
``preview_stamp`` int64 [world]: per rank, -1 (this rank writes nothing), else the number of steps whose
             tokens it has written. A writer registers (0) when its sampling runtime is built.

Writers: every rank whose sampler produces x0 for some tokens (PipeFusion's last stage: all of them;
DistriFusion: each rank its band; serial: rank 0). Each keeps its tokens on its device and copies the rows
it touched into the slot once per step (one device-to-host copy per step and writer). The reader takes the
smallest stamp over the writers: every step up to it is complete in shared memory, with no message and no
gather on the data plane.
"""
from __future__ import annotations

import torch

from .jobspec import TensorKey

MAX_SLOTS = 8
DATA, STAMP = TensorKey.PREVIEW.value, TensorKey.PREVIEW_STAMP.value


def shapes(n_img: int, dim: int, world: int, steps: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of the segments for a job of ``n_img`` image tokens of width ``dim``."""
    slots = min(MAX_SLOTS, max(2, steps or MAX_SLOTS))
    return {DATA: ((slots, n_img, dim), "float32"), STAMP: ((world,), "int64")}


def token_shape(latent_shape: tuple[int, ...]) -> tuple[int, int]:
    """(image tokens, token width) of a [B, C, h, w] latent in the 2x2-packed layout every family samples in."""
    _, c, h, w = latent_shape
    return (h // 2) * (w // 2), 4 * c


class PreviewWriter:
    """One rank's side: ``put`` x0 of some tokens after each evaluation, ``publish`` at each step boundary."""

    def __init__(self, data: torch.Tensor, stamps: torch.Tensor, rank: int) -> None:
        self.data, self.stamps, self.rank = data, stamps, rank  # [2, S, D] float32, [world] int64 (shared)
        self.tokens: torch.Tensor | None = None  # [S, D] on the sampling device
        self.lo, self.hi = None, None  # the token rows written since the last publish

    def register(self) -> None:
        """This rank will write x0 (its runtime samples some tokens): the reader waits for it from now on."""
        self.stamps[self.rank] = max(0, int(self.stamps[self.rank]))

    def put(self, sl: slice, den: torch.Tensor) -> None:
        """x0 of tokens ``sl`` ([B, L, D], any device): batch entry 0 is kept."""
        if self.tokens is None:
            self.tokens = torch.zeros(self.data.shape[1:], dtype=torch.float32, device=den.device)
        i0, i1, _ = sl.indices(self.tokens.shape[0])
        self.tokens[i0:i1] = den[0]
        self.lo = i0 if self.lo is None else min(self.lo, i0)
        self.hi = i1 if self.hi is None else max(self.hi, i1)

    def publish(self, step: int) -> None:
        """Step ``step`` (0-based) is done on this rank: its tokens go into the step's slot, then the stamp."""
        if self.lo is None:
            return
        self.data[step % self.data.shape[0], self.lo:self.hi] = self.tokens[self.lo:self.hi].cpu()
        self.lo = self.hi = None
        self.stamps[self.rank] = step + 1


class PreviewReader:
    """The launcher's side: ``poll()`` returns the steps completed since the last call, each with a copy of
    its x0 ([1, S, D] tokens), or of the newest complete one when the writers have lapped its slot; every
    step is reported once, in order."""

    def __init__(self, data: torch.Tensor, stamps: torch.Tensor) -> None:
        self.data, self.stamps = data, stamps
        self.stamps.fill_(-1)
        self.delivered = 0

    def poll(self, steps: int | None = None) -> list[tuple[int, torch.Tensor]]:
        """``steps``: the job's step count when known (no writer begins a step past the last one)."""
        stamps = self.stamps.clone()
        writers = stamps[stamps >= 0]
        if not writers.numel() or int(writers.min()) <= self.delivered:
            return []
        done, ahead, slots = int(writers.min()), int(writers.max()), self.data.shape[0]
        # step s is intact while no writer has begun step s + slots: stamp s + slots means one may have, unless
        # the job has no such step (the last step is steps - 1)
        begun = ahead if steps is None else min(ahead, steps - 1)
        newest = self.data[(done - 1) % slots].clone().unsqueeze(0)
        out = [(s, self.data[s % slots].clone().unsqueeze(0) if begun < s + slots and s < done - 1 else newest)
               for s in range(self.delivered, done)]
        self.delivered = done
        return out
