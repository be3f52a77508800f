"""Ulysses inside a patch method: ``ulysses+pipefusion`` and ``ulysses+distrifusion``.

Each PipeFusion stage (or DistriFusion band) runs on u ranks, its *lanes*. Every item's span (a patch, the
whole image of a warm-up step, a band) is cut into u consecutive parts (``patches.lane_spans``): lane j runs
every block on part j alone, and at each attention layer the lanes of a stage trade tokens for heads (the
all_to_all of ``ulysses.Exchange``). Lane j then holds q, k, v of the whole span for its share of the heads
(H/u; where u does not divide H, the first H mod u lanes one more), and the patch method's own buffer for
those heads: the K/V of the whole sequence, per head shard (PipeFusion's stale buffer, DistriFusion's
displaced one, whose gathers run between the lanes j of every band: the same share on each). That is
what keeps the hybrid as exact as its patch method: at full warm-up every buffer holds every token's fresh
K/V for its heads, as serial's does.

Hops run between corresponding lanes: lane j of stage s sends its part's activations to lane j of stage
s + 1 (the same tokens), so the activations cross each link once, as in PipeFusion alone, and no rank
gathers a stage's output. PipeFusion's last stage gathers the model's output of the span over its lanes
(C channels per token, far fewer than the activations' D) and every lane applies the sampler to the whole
span: the lanes keep the same latent and the same sampler state, so the next item's parts, which differ
when a warm-up step is followed by patches, are ready on every lane; lane j sends its part of the next
item back to lane j of stage 0. DistriFusion's parts never change, so each lane samples its own.
"""
from __future__ import annotations

import torch

from ..models import family
from ..patches import Span, lane_spans
from .cfg import BranchControl
from .groups import plan_groups
from .runtime import Control
from .ulysses import Exchange, join, split


class OneLane:
    """A patch method alone: every span is the rank's own, nothing is shared (the default of the runners)."""

    index, count = 0, 1

    def part(self, span: Span) -> Span:
        return span

    def enter(self, span: Span) -> Span:
        return span

    def kv_buffers(self, rt, blocks: list, cls, **kw) -> list:
        return rt.kv_buffers(blocks, cls, **kw)

    def whole_output(self, out: torch.Tensor, span: Span) -> torch.Tensor:
        return out

    def ranges(self, spans: list[Span]) -> list[tuple[int, int]]:
        """Image-token range of every rank of the group, in rank order, given each stage's (band's) span."""
        return [(s.i0, s.i1) for s in spans]


class Lanes(OneLane):
    """This rank's lane: ``index`` of ``count`` lanes sharing each span of its stage (or band)."""

    def __init__(self, index: int, count: int, exchange: Exchange) -> None:
        self.index, self.count, self.exchange = index, count, exchange
        self.current: Span | None = None  # the span of the item the blocks run now (``enter``)

    def parts(self, span: Span) -> list[Span]:
        return lane_spans(span, self.count)

    def part(self, span: Span) -> Span:
        """This lane's part of ``span``."""
        return self.parts(span)[self.index]

    def enter(self, span: Span) -> Span:
        """The blocks run ``span`` next: the attention layers cut it into the lanes' parts. Returns this lane's."""
        self.current = span
        return self.part(span)

    def kv_buffers(self, rt, blocks: list, cls, **kw) -> list:
        """The patch method's buffers (``cls``) for this lane's heads, behind the exchange over the lanes."""
        return rt.kv_buffers(blocks, LaneAttention, lanes=self, inner=cls, **kw)

    def whole_output(self, out: torch.Tensor, span: Span) -> torch.Tensor:
        """The model's output for this lane's part of ``span`` [MB, n, C] -> for the whole span [MB, n_img, C]
        (one all_gather over the stage's lanes, padded to the longest part)."""
        parts = self.parts(span)
        longest = max(p.n_img for p in parts)
        mine = out.new_zeros((1, out.shape[0], longest, out.shape[2]))
        mine[0, :, :out.shape[1]] = out
        every = out.new_empty((self.count, *mine.shape[1:]))
        self.exchange.comm.all_gather_into(every, mine)
        return torch.cat([every[j, :, :p.n_img] for j, p in enumerate(parts)], 1)

    def ranges(self, spans: list[Span]) -> list[tuple[int, int]]:
        return [(p.i0, p.i1) for s in spans for p in self.parts(s)]


class LaneAttention:
    """One attention layer of a lane: this lane's part of the tokens for every head in, the patch method's
    buffer (``inner``, of this lane's heads) over the whole span, this lane's part for every head out."""

    def __init__(self, batch: int, heads: int, n_txt: int, n_img: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, lanes: Lanes, inner, **inner_kw) -> None:
        self.inner = inner(batch, lanes.exchange.local_heads, n_txt, n_img, head_dim, dtype, device, **inner_kw)
        self.lanes, self.with_text, self.head_dim = lanes, n_txt > 0, head_dim

    def __getattr__(self, name: str):  # the inner buffer's own controls (DistriFusion's set_mode, finish)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def attend(self, span: Span, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, L, H, Dh] of this lane's part (text first). Returns [B, L, H * Dh]."""
        whole = self.lanes.current
        if not self.with_text:  # an image-only attention (SD3.5's second, PixArt's): the spans without text
            whole = Span(0, 0, whole.i0, whole.i1)
        parts = self.lanes.parts(whole)
        if parts[self.lanes.index] != span:
            raise ValueError(f"lane {self.lanes.index} attends {span}, its part of {whole} is "
                             f"{parts[self.lanes.index]}")
        lens = [p.n_txt + p.n_img for p in parts]
        ex = self.lanes.exchange
        full = join(parts, ex.to_heads(lens, q, k, v))  # the whole span, this lane's heads: [B, S, h, Dh]
        out = self.inner.attend(whole, *full).unflatten(2, (-1, self.head_dim))  # [B, S, h, Dh]
        return ex.to_tokens(lens, split(parts, out))


def run_lanes(model, blocks: list, problem, cfg, comm, dtype: torch.dtype, device: torch.device,
              control: Control | None = None) -> torch.Tensor | None:
    """This rank's lane of a ``ulysses+pipefusion`` or ``ulysses+distrifusion`` plan (``cfg`` without CFG, on
    ``comm``: the group, or one CFG branch). Returns the final latent [B, S_img, C] on rank 0, else None."""
    from .distrifusion import run_distrifusion
    from .pipefusion import run_pipefusion

    g = plan_groups(comm, cfg).lanes
    lanes = Lanes(g.index, cfg.ulysses_degree,
                  Exchange(g.stage, problem.model_batch, *family.attention_shape(model), dtype, device))
    control = control or Control()
    if cfg.patch_method == "pipefusion":  # stage 0 of every lane hears rank 0's decision, and tells its lane
        x = run_pipefusion(model, blocks, problem, cfg, g.lane, dtype, device,
                           BranchControl(control, comm, g.leaders), lanes=lanes)
    else:  # lockstep: the decision is the group's (agree_stop), the final bands go to the group's rank 0
        x = run_distrifusion(model, blocks, problem, cfg, g.lane, dtype, device, control, lanes=lanes, whole=comm)
    return x if comm.rank == 0 else None
