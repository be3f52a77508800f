"""Ulysses: sequence parallelism, exact, with an all-to-all over heads at every attention.

Every rank holds the whole model and owns one band of the joint sequence (text band r and image rows band
r, as DistriFusion's bands): everything but attention is per token, so each rank runs every block on its
band alone. At each attention layer the ranks trade tokens for heads (one all_to_all): rank r receives
every rank's q, k and v for its H/N heads, attends over the whole sequence with them, and a second
all_to_all sends each rank its own tokens' outputs for every head. Positions (RoPE, position embeddings)
are applied per token before the exchange, and the gathered keys are put in serial's order ([text; image]),
so attention sums in the same order as serial's. The text stream (Flux's double blocks, SD3's joint
blocks) stays exact: each rank carries its band of the text tokens through the blocks and every query,
text or image, sees every key. Bands of different lengths are padded to the longest for the exchange.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import JobCancelled
from ..models import family
from ..patches import Span, displaced_spans, split_even
from .runtime import Control, JobRuntime, gather_bands


class Exchange:
    """The fixed buffers of the two all_to_alls, shared by every attention layer of a job: one set per band
    length (the joint sequence's, and the image tokens' of image-only attentions such as SD3.5's second).

    Rank j takes heads ``heads_of[j]`` (``patches.split_even``: consecutive, the first H mod N ranks one more
    when N does not divide H, e.g. 38 heads over 4 ranks as 10, 10, 9, 9); the chunks are padded to the
    largest share, so the exchange sends ceil(H / N) heads per chunk and each rank attends with its own."""

    def __init__(self, comm, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        n = comm.world_size
        if heads < n:
            raise ValueError(f"ulysses splits {heads} heads over {n} ranks: fewer heads than ranks")
        self.comm, self.n, self.heads_of = comm, n, split_even(heads, n)
        self.local_heads = len(range(*self.heads_of[comm.rank]))
        self.chunk_heads = -(-heads // n)
        self.batch, self.head_dim, self.dtype, self.device = batch, head_dim, dtype, device
        self._sets: dict[int, tuple[torch.Tensor, ...]] = {}

    def buffers(self, max_len: int) -> tuple[torch.Tensor, ...]:
        """(send, recv [N, 3, B, max_len, ceil(H/N), Dh]; out_send, out_recv [N, B, max_len, ceil(H/N), Dh]):
        chunk j of a send goes to rank j, chunk j of a receive comes from rank j (heads past a rank's share
        stay zero)."""
        if max_len not in self._sets:
            shape = (self.n, 3, self.batch, max_len, self.chunk_heads, self.head_dim)
            make = lambda s: torch.zeros(s, dtype=self.dtype, device=self.device)  # noqa: E731
            self._sets[max_len] = (make(shape), make(shape), make(shape[:1] + shape[2:]), make(shape[:1] + shape[2:]))
        return self._sets[max_len]

    def to_heads(self, lens: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[tuple]:
        """This rank's tokens for every head -> every rank's tokens for this rank's heads (one all_to_all).

        q, k, v: [B, lens[rank], H, Dh]. Returns, per rank j, its (q, k, v) [B, lens[j], h, Dh] (h: this
        rank's share of the heads)."""
        send, recv, _, _ = self.buffers(max(lens))
        length = q.shape[1]
        if length != lens[self.comm.rank]:
            raise ValueError(f"rank {self.comm.rank} attends {length} tokens, its band has {lens[self.comm.rank]}")
        for i, t in enumerate((q, k, v)):  # chunk j: rank j's heads of this rank's tokens
            for j, (h0, h1) in enumerate(self.heads_of):
                send[j, i, :, :length, :h1 - h0] = t[:, :, h0:h1]
        self.comm.all_to_all(recv, send)
        h = self.local_heads
        return [tuple(recv[j, i, :, :n, :h] for i in range(3)) for j, n in enumerate(lens)]

    def to_tokens(self, lens: list[int], outs: list[torch.Tensor]) -> torch.Tensor:
        """The inverse exchange: per rank j, the outputs [B, lens[j], h, Dh] of its tokens for this rank's
        heads -> this rank's tokens for every head, [B, lens[rank], H * Dh]."""
        _, _, out_send, out_recv = self.buffers(max(lens))
        for j, out in enumerate(outs):
            out_send[j, :, :lens[j], :self.local_heads] = out
        self.comm.all_to_all(out_recv, out_send)
        mine = lens[self.comm.rank]  # chunk j holds rank j's heads of this rank's tokens
        return torch.cat([out_recv[j, :, :mine, :h1 - h0] for j, (h0, h1) in enumerate(self.heads_of)], 2).flatten(2)


def join(spans: list[Span], parts: list[tuple]) -> list[torch.Tensor]:
    """Every rank's (q, k, v) [B, L_j, h, Dh] of its ``spans[j]`` -> q, k, v of the whole span in its order:
    [text of every rank; image of every rank] (the ranks' spans are consecutive parts of it)."""
    return [torch.cat([p[i][:, :s.n_txt] for s, p in zip(spans, parts)] +
                      [p[i][:, s.n_txt:] for s, p in zip(spans, parts)], 1) for i in range(3)]


def split(spans: list[Span], out: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of ``join``: the whole span's output [B, L, h, Dh] -> each rank's tokens, text first."""
    t_at, i_at, outs = 0, sum(s.n_txt for s in spans), []
    for s in spans:
        outs.append(torch.cat([out[:, t_at:t_at + s.n_txt], out[:, i_at:i_at + s.n_img]], 1))
        t_at, i_at = t_at + s.n_txt, i_at + s.n_img
    return outs


class UlyssesAttention:
    """One attention layer under Ulysses (in place of a K/V buffer: ``attend`` is all it needs)."""

    def __init__(self, batch: int, heads: int, n_txt: int, n_img: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, spans: list[Span], exchange: Exchange) -> None:
        self.spans = spans  # every rank's text and image tokens at this layer
        self.lens = [s.n_txt + s.n_img for s in spans]
        self.ex = exchange

    def attend(self, span: Span, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, L, H, Dh] of this rank's band (text first). Returns [B, L, H * Dh]."""
        # the whole sequence in serial's order, [text of every rank; image of every rank]: [B, S, H/N, Dh]
        full = join(self.spans, self.ex.to_heads(self.lens, q, k, v))
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in full)).transpose(1, 2)
        return self.ex.to_tokens(self.lens, split(self.spans, out))


def run_ulysses(model, blocks: list, problem, cfg, comm, dtype: torch.dtype, device: torch.device,
                control: Control | None = None) -> torch.Tensor | None:
    """This rank's band. Returns the final latent [B, S_img, C] on rank 0, else None."""
    spans = displaced_spans(problem.rows, problem.cols, problem.n_span_txt, comm.world_size)
    sp = spans[comm.rank]
    control = control or Control()
    rt = JobRuntime(model, problem, dtype, device, first=True, last=True, preview=control.preview)
    exchange = Exchange(comm, problem.model_batch, *family.attention_shape(model), dtype, device)
    layers = rt.kv_buffers(blocks, UlyssesAttention, spans=spans, exchange=exchange)
    txt = rt.span_txt(sp)
    for item in control.track(rt.schedule(sp)):  # exact every evaluation: one item each, this rank's band
        t = item.eval
        if item.step_boundary and control.agree_stop(comm):
            raise JobCancelled(f"cancelled before step {item.step + 1}")
        _, img = rt.run_blocks(blocks, layers, sp, txt, rt.embed_image(rt.x[:, sp.i0:sp.i1], sp, t), t)
        rt.update(t, sp.i0, sp.i1, img)
        if item.closes_step:
            control.step_done(item.step)
    return gather_bands(comm, rt.x, [(s.i0, s.i1) for s in spans])
