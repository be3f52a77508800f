"""Each rank's bytes for a job under a plan, estimated before anything is allocated (memory.py admits or
refuses the job with them). What a rank holds:

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .config import ParallelConfig
from .models import family
from .parallel.plan import rank_blocks, rank_modules
from .parallel.costs import chunk
from .patches import displaced_spans, split_even

if TYPE_CHECKING:
    from .memory import JobSize

GiB = 2 ** 30
ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}
ACT_WIDTHS = 16  # live [MB, L, width] tensors at a block's peak (x, norm, q/k/v, 4x MLP and its activation, the
#                 5x concat), measured on CPU with every tensor its own mapping: tests/test_memory.py
SLACK_WIDTHS = 16  # what a caching allocator keeps besides (glibc's heap, CUDA's cached blocks): freed
#                   activations not yet reused; with glibc's defaults a CPU rank measured up to this much more
LATENT_COPIES = 8  # float32 [B, S_img, C]: x0, x, noise, denoised, sampler history, model output, ...


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
    n_txt = family.sequence_text(fam, size.n_txt, size.n_ref)
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
    n_txt = family.sequence_text(fam, size.n_txt, size.n_ref)
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
    latent += mb * max(n_txt, size.n_txt) * (size.txt_dim * 4 + width * elem) + 2 * (n_txt + size.n_img) * head_dim * 4
    return RankBytes(weights, kv, gathered, act, latent, copy, slack)


def _ulysses_bytes(fam, meta, cfg: ParallelConfig, size: JobSize, rank: int, device_type: str, fp8: bool,
                   upcast: bool) -> RankBytes:
    """Ulysses: DistriFusion's bands and weights without its K/V buffers and gathers; the all-to-all buffers
    (q, k, v of every rank's band for this rank's heads, sent and received, and the outputs back)."""
    like = rank_bytes(fam, meta, replace(cfg, strategy="distrifusion", ulysses=0), size, rank, device_type, fp8,
                      upcast)
    heads, head_dim = family.attention_shape(meta)
    width, elem = heads * head_dim, ELEM[size.dtype]
    n_txt = family.sequence_text(fam, size.n_txt, size.n_ref)
    band = max(s.n_txt + s.n_img for s in displaced_spans(size.rows, size.cols, n_txt, cfg.world_size))
    exchange = 8 * size.model_batch * band * chunk(width, heads, cfg.world_size) * cfg.world_size * elem
    return RankBytes(like.weights, 0, exchange, like.activations, like.latent, like.upcast)


def _lanes_bytes(fam, meta, cfg: ParallelConfig, size: JobSize, rank: int, device_type: str, fp8: bool,
                 upcast: bool) -> RankBytes:
    """Ulysses inside a patch method: what the rank's stage (band) holds under the patch method alone, its
    K/V buffers and gathers for its lane's share of the heads, and the all-to-all buffers of the largest
    item's parts (the activations are counted for the whole item: an over-estimate by at most the lanes'
    share)."""
    u = cfg.ulysses_degree
    like = rank_bytes(fam, meta, replace(cfg, strategy=cfg.patch_method, world_size=cfg.stages, ulysses=0), size,
                      rank // u, device_type, fp8, upcast)
    heads, head_dim = family.attention_shape(meta)
    tokens = family.sequence_text(fam, size.n_txt, size.n_ref) + size.n_img
    exchange = 8 * size.model_batch * math.ceil(tokens / u) * chunk(heads * head_dim, heads, u) * u * ELEM[size.dtype]
    mine = len(range(*split_even(heads, u)[rank % u]))  # this lane's heads
    return replace(like, kv=like.kv * mine // heads, gathered=like.gathered * mine // heads + exchange)


def estimate(fam, meta, cfg: ParallelConfig, size: JobSize, device_type: str = "cpu",
             fp8: bool = False, upcast: bool = False) -> list[RankBytes]:
    if cfg.strategy == "auto":  # auto runs a plan that fits, if one does: the one needing least is PipeFusion's
        cfg = replace(cfg, strategy="pipefusion" if cfg.world_size > 1 else "serial", patches=0)
    return [rank_bytes(fam, meta, cfg, size, r, device_type, fp8, upcast) for r in range(cfg.world_size)]
