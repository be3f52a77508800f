"""Memory admission: each rank's bytes for a job, estimated before anything is allocated.

A job that cannot fit is refused with the numbers (GiB needed per rank, GiB available) and only the changes
that would make it fit (each suggestion is the same estimate run again with that change). What a rank holds:

- weights: its stage's parameters and buffers (all of them for distrifusion, serial, naive_patch), in the
  compute dtype, float8 Linear weights of an fp8 checkpoint kept 8-bit;
- K/V buffers: per attention layer of its blocks, K and V over the whole sequence ``[text; image]`` for the
  model batch (2x the images with true CFG); DistriFusion adds the gathered copies, one band per rank;
- activations of the largest span it runs (a warm-up step is the whole image under PipeFusion, the rank's
  band under DistriFusion): ``ACT_WIDTHS`` live ``[MB, L, width]`` tensors at a block's peak, the attention
  kernel's working set (``math`` materialises the scores; flash and memory-efficient kernels do not), the
  stage messages in flight (PipeFusion), one fp8 weight cast per call (when no upcast copy is kept);
- allocator slack: ``SLACK_WIDTHS`` more ``[MB, L, width]`` of that span, the freed activations a caching
  allocator keeps (glibc's heap on CPU, cached blocks on GPU): part of the need, not of the live bytes;
- fp8 upcast copy: with ``upcast``, every 8-bit Linear weight once more in the compute dtype (``fp8_compute``
  keeps that copy when the job still fits with it);
- latent and sampler state: float32 latents, noise and sampler history, text states, the position table.

Where the memory comes from: on CPU every rank of the machine shares the available RAM (psutil), so the
ranks' sum is compared with it; on GPU each rank compares with its own device's free memory
(``torch.cuda.mem_get_info``). Processes not yet started add ``CPU_PROCESS_BYTES`` (interpreter, torch,
diffusers) or ``CUDA_CONTEXT_BYTES`` each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .config import ParallelConfig
from .models import family
from .parallel.plan import rank_blocks, rank_modules
from .patches import displaced_spans

GiB = 2 ** 30
ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}
ACT_WIDTHS = 16  # live [MB, L, width] tensors at a block's peak (x, norm, q/k/v, 4x MLP and its activation, the
#                 5x concat), measured on CPU with every tensor its own mapping: tests/test_memory.py
SLACK_WIDTHS = 16  # what a caching allocator keeps besides (glibc's heap, CUDA's cached blocks): freed
#                   activations not yet reused; with glibc's defaults a CPU rank measured up to this much more
LATENT_COPIES = 8  # float32 [B, S_img, C]: x0, x, noise, denoised, sampler history, model output, ...
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
    """Text tokens of the conditioning, and the reference latents' tokens that ride with them (Kontext)."""
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
class RankBytes:
    """One rank's estimated bytes for a job, by what holds them."""

    weights: int
    kv: int
    gathered: int
    activations: int
    latent: int
    upcast: int = 0
    """The compute-dtype copy of an fp8 stage's Linear weights (models/fp8.py), when it keeps one."""
    slack: int = 0
    """What the allocator may keep besides the live bytes (``SLACK_WIDTHS``): part of the need, not held."""

    @property
    def live(self) -> int:
        """The bytes the rank's tensors hold at its peak."""
        return self.weights + self.kv + self.gathered + self.activations + self.latent + self.upcast

    @property
    def total(self) -> int:
        return self.live + self.slack

    def describe(self) -> str:
        parts = [("weights", self.weights), ("K/V buffers", self.kv), ("gathered K/V", self.gathered),
                 ("activations", self.activations), ("latents", self.latent), ("fp8 upcast copy", self.upcast),
                 ("allocator slack", self.slack)]
        shown = ", ".join(f"{n} {gib(b)}" for n, b in parts if b >= 2 ** 20)
        return f"{gib(self.total)} ({shown})" if shown else gib(self.total)


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.0f} MiB"


def attention_kernel(device_type: str, dtype: str, head_dim: int) -> str:
    """The scaled_dot_product_attention kernel torch picks for our calls (no mask, no dropout): 'flash'
    (CUDA fp16/bf16, and torch's CPU kernel), 'efficient' (CUDA float32), else 'math'."""
    if device_type == "cpu":
        return "flash"
    if device_type == "cuda" and head_dim <= 256:
        return "flash" if dtype in ("bfloat16", "float16") else "efficient"
    return "math"


def _attention_bytes(kernel: str, mb: int, heads: int, queries: int, keys: int) -> int:
    if kernel == "math":  # scores and their softmax, [MB, H, L, S] in the compute dtype (counted as float32)
        return 2 * mb * heads * queries * keys * 4
    return mb * heads * queries * 4 * 2  # log-sum-exp and row maxima


def _names_bytes(meta, names: list[str], elem: int, fp8: bool) -> tuple[int, int, int]:
    """(bytes, largest Linear weight's elements, all Linear weights' elements) of the parameters and
    buffers under ``names``."""
    total, biggest, linear = 0, 0, 0
    for name in names:
        obj = getattr(meta, name, None)
        if isinstance(obj, torch.nn.Parameter):
            total += obj.numel() * elem
            continue
        for mod in meta.get_submodule(name).modules():
            for attr, p in list(mod._parameters.items()) + list(mod._buffers.items()):
                if p is None:
                    continue
                linear_w = attr == "weight" and isinstance(mod, torch.nn.Linear)
                total += p.numel() * (1 if fp8 and linear_w else elem)
                if linear_w:
                    biggest, linear = max(biggest, p.numel()), linear + p.numel()
    return total, biggest, linear


def _buffer_kinds(fam, meta, blocks: list) -> list[str]:
    kinds = []
    for b in blocks:
        kinds += fam.kv_buffers(meta, b, lambda kind: kind)
    return kinds


def _spans(fam, cfg: ParallelConfig, size: JobSize, rank: int) -> tuple[int, int, int]:
    """(largest span's tokens this rank runs, image tokens in its K/V buffers, DistriFusion's gather band)."""
    n_txt = family.sequence_text(fam, size.n_txt)
    full = n_txt + size.n_img
    if cfg.strategy == "pipefusion":
        return full, size.n_img, 0  # warm-up steps run the whole image as one item
    if cfg.strategy == "serial":
        return full, 0, 0  # diffusers' own forward, no buffers
    spans = displaced_spans(size.rows, size.cols, n_txt, cfg.world_size)
    band = spans[rank].n_txt + spans[rank].n_img
    if cfg.strategy == "naive_patch":
        return band, spans[rank].n_img, 0
    return band, size.n_img, max(s.n_txt + s.n_img for s in spans)


def rank_bytes(fam, meta, cfg: ParallelConfig, size: JobSize, rank: int, device_type: str = "cpu",
               fp8: bool = False, upcast: bool = False) -> RankBytes:
    """Rank ``rank``'s estimated bytes for a job of ``size`` under ``cfg`` (see the module docstring);
    ``upcast``: an fp8 stage keeps a compute-dtype copy of its Linear weights."""
    if cfg.cfg_degree == 2:  # one branch: the model batch of the images alone, on half the ranks
        return rank_bytes(fam, meta, cfg.branch(), replace(size, cfg=False), rank % (cfg.world_size // 2),
                          device_type, fp8, upcast)
    if "ulysses" in cfg.methods and cfg.patch_method != "serial":  # Ulysses inside the stages (bands)
        return _lanes_bytes(fam, meta, cfg, size, rank, device_type, fp8, upcast)
    if "ulysses" in cfg.methods:  # the whole model, a band of the tokens, no buffers; the exchange buffers
        return _ulysses_bytes(fam, meta, cfg, size, rank, device_type, fp8, upcast)
    heads, head_dim = family.attention_shape(meta)
    width, elem, mb = heads * head_dim, ELEM[size.dtype], size.model_batch
    weights, biggest, linear = _names_bytes(meta, rank_modules(fam, meta, cfg, rank), elem, fp8)
    n_txt = family.sequence_text(fam, size.n_txt)
    largest, kv_img, band = _spans(fam, cfg, size, rank)
    kinds = _buffer_kinds(fam, meta, rank_blocks(fam, meta, cfg, rank))
    kv = gathered = 0
    if kv_img:
        for kind in kinds:
            seq = (n_txt if kind == "joint" else 0) + kv_img
            kv += 2 * mb * seq * width * elem
            if band:  # one [2, MB, band, H, Dh] chunk per rank, plus the packed local one
                chunk = band if kind == "joint" else band - math.ceil(n_txt / cfg.world_size)
                gathered += (cfg.world_size + 1) * 2 * mb * max(chunk, 1) * width * elem
    keys = largest if cfg.strategy == "serial" else (n_txt + kv_img)
    kernel = attention_kernel(device_type, size.dtype, head_dim)
    act = mb * largest * width * elem * ACT_WIDTHS + _attention_bytes(kernel, mb, heads, largest, keys)
    slack = mb * largest * width * elem * SLACK_WIDTHS
    if not fam.JOINT_TEXT:  # cross-attention to the caption
        act += _attention_bytes(kernel, mb, heads, largest, size.n_txt)
    if cfg.strategy == "pipefusion" and cfg.world_size > 1:  # a receive posted ahead and sends in flight
        act += 3 * mb * (largest + 1) * width * elem
    copy = linear * elem if fp8 and upcast else 0
    if fp8 and not upcast:
        act += biggest * elem  # one Linear weight cast at a time
    latent = LATENT_COPIES * size.batch * size.n_img * size.channels * 4
    latent += mb * size.n_txt * (size.txt_dim * 4 + width * elem) + 2 * (n_txt + size.n_img) * head_dim * 4
    return RankBytes(weights, kv, gathered, act, latent, copy, slack)


def _ulysses_bytes(fam, meta, cfg: ParallelConfig, size: JobSize, rank: int, device_type: str, fp8: bool,
                   upcast: bool) -> RankBytes:
    """Ulysses: DistriFusion's bands and weights without its K/V buffers and gathers; the all-to-all buffers
    (q, k, v of every rank's band for this rank's heads, sent and received, and the outputs back)."""
    like = rank_bytes(fam, meta, replace(cfg, strategy="distrifusion", ulysses=0), size, rank, device_type, fp8,
                      upcast)
    heads, head_dim = family.attention_shape(meta)
    width, elem = heads * head_dim, ELEM[size.dtype]
    n_txt = size.n_txt if fam.JOINT_TEXT else 0
    band = max(s.n_txt + s.n_img for s in displaced_spans(size.rows, size.cols, n_txt, cfg.world_size))
    exchange = 8 * size.model_batch * band * width * elem
    return RankBytes(like.weights, 0, exchange, like.activations, like.latent, like.upcast)


def _lanes_bytes(fam, meta, cfg: ParallelConfig, size: JobSize, rank: int, device_type: str, fp8: bool,
                 upcast: bool) -> RankBytes:
    """Ulysses inside a patch method: what the rank's stage (band) holds under the patch method alone, its
    K/V buffers and gathers for 1/u of the heads, and the all-to-all buffers of the largest item's parts
    (the activations are counted for the whole item: an over-estimate by at most the lanes' share)."""
    u = cfg.ulysses_degree
    like = rank_bytes(fam, meta, replace(cfg, strategy=cfg.patch_method, world_size=cfg.stages, ulysses=0), size,
                      rank // u, device_type, fp8, upcast)
    heads, head_dim = family.attention_shape(meta)
    tokens = family.sequence_text(fam, size.n_txt) + size.n_img
    exchange = 8 * size.model_batch * math.ceil(tokens / u) * heads * head_dim * ELEM[size.dtype]
    return replace(like, kv=like.kv // u, gathered=like.gathered // u + exchange)


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


def estimate(fam, meta, cfg: ParallelConfig, size: JobSize, device_type: str = "cpu",
             fp8: bool = False, upcast: bool = False) -> list[RankBytes]:
    if cfg.strategy == "auto":  # auto runs a plan that fits, if one does: the one needing least is PipeFusion's
        cfg = replace(cfg, strategy="pipefusion" if cfg.world_size > 1 else "serial", patches=0)
    return [rank_bytes(fam, meta, cfg, size, r, device_type, fp8, upcast) for r in range(cfg.world_size)]


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
            c.check_image(s.rows)
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
    return JobSize(problem.rows, problem.cols, problem.n_txt + problem.n_ref, problem.txt.shape[-1], problem.batch,
                   problem.cfg, problem.branches == 3, problem.x0.shape[-1], problem.spec.dtype)


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
