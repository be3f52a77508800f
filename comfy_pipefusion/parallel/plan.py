"""Which rank holds which part of the model: the stage split and per-rank materialisation."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..config import ParallelConfig
from ..models import checkpoint, family


def balanced_split(costs: list[float], stages: int, pace: tuple[float, ...] = ()) -> tuple[int, ...]:
    """Blocks per stage, contiguous, minimising the most expensive stage (ties: earlier stages lighter);
    ``pace``: each stage's time per unit of cost (its device's speed: a stage on a card twice as fast, 0.5,
    takes twice the blocks); empty: every stage alike.

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
                v = max(best[s - 1][j], (prefix[i] - prefix[j]) * (pace[s - 1] if pace else 1.0))
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
    return balanced_split([fam.block_cost(model, b, cfg.balance) for b in blocks], cfg.stages)


def rank_blocks(fam, model, cfg: ParallelConfig, rank: int) -> list[family.Block]:
    """The blocks this rank runs: its stage's under pipefusion (alone or in a hybrid), all of them otherwise."""
    blocks = fam.blocks_of(model)
    if cfg.patch_method != "pipefusion":
        return blocks
    sizes, stage = stage_split(fam, model, cfg), cfg.stage_of(rank)
    start = sum(sizes[:stage])
    return blocks[start:start + sizes[stage]]


def rank_modules(fam, model, cfg: ParallelConfig, rank: int) -> list[str]:
    """Names of the submodules (or root parameters) this rank materialises."""
    if cfg.patch_method != "pipefusion":
        return family.all_names(model)
    blocks, stage = rank_blocks(fam, model, cfg, rank), cfg.stage_of(rank)
    names = list(fam.shared_modules(blocks) if hasattr(fam, "shared_modules") else fam.SHARED_MODULES)
    if stage == 0:
        names += [n for n in fam.FIRST_MODULES if n not in names]
    if stage == cfg.stages - 1:
        names += [n for n in fam.LAST_MODULES if n not in names]
    return [n for n in names if family.holds(model, n)] + [b.prefix for b in blocks]


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
        d = self.open(meta=False)
        return d.fam, d.config

    def open(self, meta: bool = True) -> "Described":
        """This source's structure, for a rank to keep: a checkpoint's header is read (once), not its data;
        with ``meta`` the whole model is built on the meta device."""
        if self.preset is not None:
            fam, preset = family.find_preset(self.preset)
            info, config = None, preset["config"]
        else:
            info = checkpoint.open_checkpoint(self.checkpoint)
            fam, config = family.get(info.family), info.config
        return Described(fam, config, fam.build_meta(config) if meta else None, info)

    def fill(self, fam, model, names: list[str], device: torch.device, dtype: torch.dtype, progress=None,
             info: checkpoint.CheckpointInfo | None = None) -> None:
        """Fill ``names`` of the meta ``model``; ``progress(i, n)`` before each tensor read from a checkpoint;
        ``info``: the checkpoint's header already read (``open``), else it is read here."""
        if self.preset is not None:
            fam.materialize(model, names, device, dtype, self.seed)
            rate = family.find_preset(self.preset)[1].get("smooth_time")
            if rate is not None:
                family.smooth_time(fam, model, names, rate)
        else:  # fp8 weights stay 8-bit (computed in ``dtype``): never cast the loaded model afterwards
            checkpoint.load_modules(model, info or checkpoint.open_checkpoint(self.checkpoint), names, device,
                                    dtype, progress)


@dataclass(frozen=True)
class Described:
    """A source's structure as a rank keeps it between jobs (``ModelSource.open``)."""

    fam: object
    """The family module."""
    config: dict
    """The diffusers config."""
    meta: torch.nn.Module | None
    """The whole model on the meta device (structure only): a load fills a copy of it."""
    info: checkpoint.CheckpointInfo | None = None
    """A checkpoint's header (None for a preset)."""


def load_rank_model(source: ModelSource, cfg: ParallelConfig, rank: int, device: torch.device,
                    dtype: torch.dtype, progress=None, described: Described | None = None):
    """Build on the meta device (or copy ``described.meta``, the source's structure already read) and fill
    only this rank's part; returns (model, its blocks). ``progress``: see ``checkpoint.load_modules`` (it may
    raise to abandon the load)."""
    described = described if described is not None and described.meta is not None else source.open()
    fam, model = described.fam, copy.deepcopy(described.meta)  # a copy: the structure stays pure meta
    cfg.check_model(len(fam.blocks_of(model)), family.attention_shape(model)[0])
    source.fill(fam, model, rank_modules(fam, model, cfg, rank), device, dtype, progress, described.info)
    model.eval().requires_grad_(False)
    return model, rank_blocks(fam, model, cfg, rank)


def stage_layers(fam, model, cfg: ParallelConfig) -> tuple[tuple[int, int], ...]:
    """(joint, image-only) attention layers of each PipeFusion stage: what the Ulysses exchanges of a stage's
    lanes count (``costs.expected_bytes`` of ulysses+pipefusion)."""
    blocks, out, start = fam.blocks_of(model), [], 0
    for size in stage_split(fam, model, cfg):
        kinds = [k for b in blocks[start:start + size] for k in fam.kv_buffers(model, b, lambda kind: kind)]
        out.append((kinds.count("joint"), kinds.count("image")))
        start += size
    return tuple(out)
