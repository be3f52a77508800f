"""The naive patch baseline: each rank samples its band of rows as if it were the whole image (full text,
its own positions), with no attention across bands. Only a quality yardstick for the stale strategies."""
from __future__ import annotations

import torch

from ..patches import split_even
from .runtime import gather_bands
from .serial import run_local


def run_naive_patch(model, blocks: list, problem, cfg, comm, dtype: torch.dtype, device: torch.device,
                    control=None) -> torch.Tensor | None:
    rows = split_even(problem.rows, comm.world_size)
    r0, r1 = rows[comm.rank]
    x = problem.x0.to(device).clone()
    x[:, r0 * problem.cols:r1 * problem.cols] = run_local(model, problem, dtype, device, control, comm, (r0, r1))
    return gather_bands(comm, x, [(a * problem.cols, b * problem.cols) for a, b in rows])
