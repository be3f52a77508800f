"""Which rank holds which part of the model: the stage split and per-rank materialisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ParallelConfig
from ..models import checkpoint, family


def balanced_split(costs: list[float], stages: int) -> tuple[int, ...]:
    """Blocks per stage, contiguous, minimising the most expensive stage (ties: earlier stages lighter).

    Exact dynamic programme over (blocks, stages); a DiT has at most a few hundred blocks.
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} blocks into {stages} stages (need 1 <= stages <= {n})")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the least max-stage cost of putting the first i blocks on s stages; cut[s][i]: last cut.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i] - 1e-12:
                    best[s][i], cut[s][i] = v, j
    sizes, i = [], n
    for s in range(stages, 0, -1):
        sizes.append(i - cut[s][i])
        i = cut[s][i]
    return tuple(reversed(sizes))


def stage_split(fam, model, cfg: ParallelConfig) -> tuple[int, ...]:
    blocks = fam.blocks_of(model)
    if cfg.stage_split is not None:
        return cfg.stage_split
    return balanced_split([fam.block_cost(model, b, cfg.balance) for b in blocks], cfg.world_size)


def rank_blocks(fam, model, cfg: ParallelConfig, rank: int) -> list[family.Block]:
    """The blocks this rank runs: its stage's under pipefusion, all of them otherwise."""
    blocks = fam.blocks_of(model)
    if cfg.strategy != "pipefusion":
        return blocks
    sizes = stage_split(fam, model, cfg)
    start = sum(sizes[:rank])
    return blocks[start:start + sizes[rank]]


def rank_modules(fam, model, cfg: ParallelConfig, rank: int) -> list[str]:
    """Names of the submodules (or root parameters) this rank materialises."""
    if cfg.strategy != "pipefusion":
        return family.all_names(model)
    names = list(fam.SHARED_MODULES)
    if rank == 0:
        names += [n for n in fam.FIRST_MODULES if n not in names]
    if rank == cfg.world_size - 1:
        names += [n for n in fam.LAST_MODULES if n not in names]
    return [n for n in names if family.holds(model, n)] + [b.prefix for b in rank_blocks(fam, model, cfg, rank)]


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a built-in preset (random weights from ``seed``) or a checkpoint."""

    preset: str | None = None
    checkpoint: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("a model source is either a preset or a checkpoint path")
        if self.preset is not None:
            family.find_preset(self.preset)  # raises, listing the presets

    def describe(self) -> tuple[object, dict]:
        """(family module, diffusers config) of this source; a checkpoint's header is read, not its data."""
        if self.preset is not None:
            fam, preset = family.find_preset(self.preset)
            return fam, preset["config"]
        info = checkpoint.open_checkpoint(self.checkpoint)
        return family.get(info.family), info.config

    def fill(self, fam, model, names: list[str], device: torch.device, dtype: torch.dtype, progress=None) -> None:
        """Fill ``names`` of the meta ``model``; ``progress(i, n)`` before each tensor read from a checkpoint."""
        if self.preset is not None:
            fam.materialize(model, names, device, dtype, self.seed)
        else:  # fp8 weights stay 8-bit (computed in ``dtype``): never cast the loaded model afterwards
            checkpoint.load_modules(model, checkpoint.open_checkpoint(self.checkpoint), names, device, dtype,
                                    progress)


def load_rank_model(source: ModelSource, cfg: ParallelConfig, rank: int, device: torch.device,
                    dtype: torch.dtype, progress=None):
    """Build on the meta device and fill only this rank's part; returns (model, its blocks). ``progress``:
    see ``checkpoint.load_modules`` (it may raise to abandon the load)."""
    fam, config = source.describe()
    model = fam.build_meta(config)
    cfg.check_model(len(fam.blocks_of(model)))
    source.fill(fam, model, rank_modules(fam, model, cfg, rank), device, dtype, progress)
    model.eval().requires_grad_(False)
    return model, rank_blocks(fam, model, cfg, rank)
