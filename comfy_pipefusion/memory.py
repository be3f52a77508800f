"""Memory admission: each rank's bytes for a job (footprint.py estimates them per plan) against what the
machine has, before anything is allocated.

A job that cannot fit is refused with the numbers (GiB needed per rank, GiB available) and only the changes
that would make it fit (each suggestion is the same estimate run again with that change).

Where the memory comes from: on CPU every rank of the machine shares the available RAM (psutil), so the
ranks' sum is compared with it; on GPU each rank compares with its own device's free memory
(``torch.cuda.mem_get_info``). Processes not yet started add ``CPU_PROCESS_BYTES`` (interpreter, torch,
diffusers) or ``CUDA_CONTEXT_BYTES`` each.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import ParallelConfig
from .footprint import ELEM, RankBytes, estimate, gib

CPU_PROCESS_BYTES = 400 * 2 ** 20  # RSS of a CPU rank before its weights: python, torch, diffusers
CUDA_CONTEXT_BYTES = 600 * 2 ** 20  # a CUDA context and NCCL's buffers, per GPU rank


class AdmissionError(ValueError):
    """The job does not fit in memory; the message names the numbers and what would make it fit."""


@dataclass(frozen=True)
class JobSize:
    """What sizes a job's memory: image tokens, text tokens, batch and dtype."""

    rows: int
    """Image token rows (height / 16)."""
    cols: int
    """Image token columns (width / 16)."""
    n_txt: int
    """Text tokens of the conditioning as the text encoder gives them (the model may pad them:
    ``family.sequence_text``)."""
    txt_dim: int
    """Width of the text encoder's states."""
    batch: int = 1
    """Images per job."""
    cfg: bool = False
    """True classifier-free guidance: the model batch is twice the images."""
    middle: bool = False
    """DualCFGGuider's middle conditioning as well (with ``cfg``): the model batch is three times the images."""
    channels: int = 64
    """Channels of a packed latent token (4x the latent channels)."""
    dtype: str = "float32"
    """Compute dtype."""
    n_ref: int = 0
    """Tokens of the reference latents, which ride with the text after its padding (Kontext, Flux.2 editing)."""

    def __post_init__(self) -> None:
        for name in ("rows", "cols", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"JobSize.{name} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in ELEM:
            raise ValueError(f"dtype {self.dtype!r} unknown: choose one of {', '.join(ELEM)}")

    @property
    def model_batch(self) -> int:
        return self.batch * (1 + self.cfg + (self.cfg and self.middle))

    @property
    def n_img(self) -> int:
        return self.rows * self.cols

    def pixels(self) -> str:
        return f"{self.cols * 16}x{self.rows * 16}"


@dataclass(frozen=True)
class Budget:
    """Where the ranks' memory comes from."""

    device_type: str
    """'cpu': every rank shares ``available[0]``; 'cuda': rank r has ``available[r]``."""
    available: tuple[int, ...]
    """Bytes free now (RAM available, or each GPU's free memory)."""
    started: bool = False
    """The ranks' processes already run (their interpreter or CUDA context is not part of the need)."""
    weights_loaded: bool = False
    """The ranks already hold this model's weights (a warm group of the same plan)."""
    local: tuple[int, ...] | None = None
    """The ranks that draw on this budget (the ranks of this machine, or this rank's GPU); None: all."""
    freed: int = 0
    """Bytes the ranks will free before they allocate (another model they hold now)."""

    def __post_init__(self) -> None:
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type {self.device_type!r}: 'cpu' or 'cuda'")
        if not self.available:
            raise ValueError("Budget.available: give the free bytes (one value for CPU, one per GPU rank)")

    def need(self, r: RankBytes) -> int:
        extra = 0 if self.started else (CPU_PROCESS_BYTES if self.device_type == "cpu" else CUDA_CONTEXT_BYTES)
        return r.total - (r.weights if self.weights_loaded else 0) + extra


    def ranks(self, world: int) -> list[int]:
        return list(range(world)) if self.local is None else [r for r in self.local if r < world]


def fits(ranks: list[RankBytes], budget: Budget) -> bool:
    needs = [budget.need(ranks[r]) for r in budget.ranks(len(ranks))]
    if budget.device_type == "cpu":
        return sum(needs) <= budget.available[0] + budget.freed
    return all(n <= a + budget.freed for n, a in zip(needs, _per_rank(budget, len(needs))))


def _per_rank(budget: Budget, n: int) -> list[int]:
    a = list(budget.available)
    return a + [min(a)] * (n - len(a))  # more GPUs than measured: assume them like the tightest one


def admit(fam, meta, cfg: ParallelConfig, size: JobSize, budget: Budget, fp8: bool = False,
          label: str | None = None) -> list[RankBytes]:
    """The job's bytes per rank, or AdmissionError naming the numbers and what would make it fit.
    ``label`` replaces the image size in the message (e.g. a check of the weights alone)."""
    ranks = estimate(fam, meta, cfg, size, budget.device_type, fp8)
    if fits(ranks, budget):
        return ranks
    mine = budget.ranks(len(ranks))
    worst = max(mine, key=lambda r: budget.need(ranks[r]))
    what = f"{cfg.strategy} on {cfg.world_size} {'CPU rank' if budget.device_type == 'cpu' else 'GPU'}" \
           f"{'s' if cfg.world_size > 1 else ''}, " + \
           (label or f"{size.pixels()}, batch {size.batch}" + (" with cfg" if size.cfg else ""))
    if budget.device_type == "cpu":
        total = sum(budget.need(ranks[r]) for r in mine)
        have = f"{gib(total)} for the {len(mine)} rank(s) on this machine, but only " \
               f"{gib(budget.available[0] + budget.freed)} of RAM is available"
    else:
        have = f"its GPU has {gib(_per_rank(budget, len(mine))[mine.index(worst)] + budget.freed)} free"
    tips = suggestions(fam, meta, cfg, size, budget, fp8)
    fix = "; to fit: " + "; or ".join(tips) if tips else \
        "; none of fewer pixels, a smaller batch, more devices or fp8 weights would make it fit on this machine"
    process = budget.need(ranks[worst]) - ranks[worst].total + (ranks[worst].weights if budget.weights_loaded else 0)
    extra = f" + {gib(process)} for its process" if process else ""
    loaded = " (its weights are loaded already)" if budget.weights_loaded else ""
    raise AdmissionError(f"this job does not fit in memory: {what}: rank {worst} needs {ranks[worst].describe()}"
                         f"{extra}{loaded}; {have}{fix}")


def fp8_compute(fam, meta, cfg: ParallelConfig, size: JobSize, budget: Budget, scaled_mm: bool) -> str:
    """How an fp8 stage computes this job (models/fp8.py): ``upcast`` when the job still fits with the
    copy counted, else ``scaled_mm`` where ``scaled_mm`` (the device has one and the user asked), else
    ``cast``. CPU ranks decide for their whole machine alike (the budget of all its ranks)."""
    if budget.device_type == "cpu" and not budget.local:  # a machine's later ranks: same sum as its first
        budget = replace(budget, local=None)
    if fits(estimate(fam, meta, cfg, size, budget.device_type, True, True), budget):
        return "upcast"
    return "scaled_mm" if scaled_mm else "cast"


def suggestions(fam, meta, cfg: ParallelConfig, size: JobSize, budget: Budget, fp8: bool) -> list[str]:
    """The changes that make the job fit, each checked with the same estimate."""
    def ok(c: ParallelConfig, s: JobSize, f8: bool = fp8, b: Budget = budget) -> bool:
        try:
            c.check_image(s.rows, s.cols)
            c.check_model(len(fam.blocks_of(meta)))
        except ValueError:
            return False
        return fits(estimate(fam, meta, c, s, b.device_type, f8), b)

    out = []
    for scale in (0.75, 0.5, 0.35, 0.25, 0.125, 0.0625):
        s = replace(size, rows=max(1, int(size.rows * scale)), cols=max(1, int(size.cols * scale)))
        if (s.rows, s.cols) != (size.rows, size.cols) and ok(cfg, s):
            out.append(f"fewer pixels (at most about {s.pixels()} instead of {size.pixels()})")
            break
    b = size.batch // 2
    while b >= 1 and not ok(cfg, replace(size, batch=b)):
        b //= 2
    if b >= 1:
        out.append(f"a smaller batch (at most {b} instead of {size.batch})")
    if cfg.strategy == "distrifusion" and ok(replace(cfg, strategy="pipefusion", patches=0), size):
        out.append("pipefusion instead of distrifusion (each rank holds only its stage)")
    try:  # twice the GPUs with the same method ('cfg' alone becomes cfg+pipefusion)
        more = replace(cfg, world_size=cfg.world_size * 2, strategy={"serial": "pipefusion", "cfg": "cfg+pipefusion"}
                       .get(cfg.strategy, cfg.strategy), stage_split=None, ulysses=0)
    except ValueError:
        more = None
    if budget.device_type == "cuda" and more is not None and ok(more, size):
        out.append(f"more GPUs ({more.world_size} with {more.strategy})")
    if cfg.strategy == "pipefusion" and ok(replace(cfg, patches=cfg.num_patches * 2), size):
        out.append(f"more patches ({cfg.num_patches * 2})")
    if not fp8 and ok(cfg, size, True):
        out.append("float8 weights (an fp8_e4m3fn checkpoint; Linear weights stay 8-bit)")
    return out


def available_ram() -> int:
    import psutil

    return psutil.virtual_memory().available


def free_gpu_bytes(devices: list[int]) -> tuple[int, ...]:
    """Each GPU's free memory, in this process's device numbering."""
    return tuple(torch.cuda.mem_get_info(d)[0] for d in devices)


def usable_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_cpu_ranks(ranks: int) -> None:
    """``cpu:N`` is bounded by this machine's cores: more ranks than cores only wait on each other."""
    cores = usable_cores()
    if ranks > cores:
        raise AdmissionError(f"{ranks} CPU ranks need {ranks} cores, this machine gives this process {cores}; "
                             f"use at most cpu:{cores}")


def job_size(problem) -> JobSize:
    """The JobSize of a ``job.Problem``."""
    return JobSize(problem.rows, problem.cols, problem.n_txt, problem.txt.shape[-1], problem.batch,
                   problem.cfg, problem.branches == 3, problem.x0.shape[-1], problem.spec.dtype, n_ref=problem.n_ref)


def stored_fp8(checkpoint_path: str | None) -> bool:
    """Whether a checkpoint keeps its Linear weights in float8 (they stay 8-bit when loaded)."""
    if not checkpoint_path:
        return False
    from .models import checkpoint, fp8

    return checkpoint.open_checkpoint(checkpoint_path).dtype in fp8.FP8


def rank_budget(device: torch.device, rank: int, world: int, weights_loaded: bool, freed: int) -> Budget:
    """What a running rank draws on: its GPU's free memory, or the RAM its machine's ranks share (checked
    by the machine's first rank for all of them)."""
    import os

    if device.type == "cuda":
        return Budget("cuda", free_gpu_bytes([device.index or 0]), True, weights_loaded, (rank,), freed)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    node = rank // per_node
    # one check per machine, by its first rank, for all of its ranks (the others would see its load begin)
    local = tuple(range(node * per_node, min(world, (node + 1) * per_node))) if rank % per_node == 0 else ()
    return Budget("cpu", (available_ram(),), True, weights_loaded, local, freed * per_node)
