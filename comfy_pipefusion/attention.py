"""Stale K/V buffers: the attention state that lets one patch attend over the whole image.

Each attention layer owns a fixed-shape buffer with the K and V of the whole joint sequence
``[text; image]`` (post-RoPE). A patch writes its fresh K/V into its positions in place, then its queries
attend over the entire buffer: positions written this step are fresh, the rest hold the last values
written there (one step old). ``StaleKV`` is PipeFusion's buffer; ``DisplacedKV`` adds DistriFusion's
exchange of every rank's fresh K/V, gathered asynchronously into one preallocated buffer and consumed one
step later.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .patches import Span


class StaleKV:
    """K/V of the whole joint sequence for one attention layer, updated in place patch by patch."""

    def __init__(self, batch: int, heads: int, n_txt: int, n_img: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, heads, n_txt + n_img, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [B, H, S, Dh]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [B, H, S, Dh]
        self.n_txt = n_txt

    def write(self, span: Span, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a patch's fresh K/V; ``k``, ``v``: [B, n_txt + n_img, H, Dh], text first."""
        for buf, new in ((self.k, k), (self.v, v)):
            new = new.transpose(1, 2)  # [B, H, L, Dh]
            if span.n_txt:
                buf[:, :, span.t0:span.t1] = new[:, :, :span.n_txt]
            buf[:, :, self.n_txt + span.i0:self.n_txt + span.i1] = new[:, :, span.n_txt:]

    def attend(self, span: Span, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write the patch's K/V, then attend its queries over the whole buffer.

        q, k, v: [B, L, H, Dh] for the patch's tokens (text first). Returns [B, L, H * Dh].
        """
        self.write(span, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), self.k, self.v)  # [B, H, L, Dh]
        return out.transpose(1, 2).flatten(2)


class DisplacedKV(StaleKV):
    """DistriFusion's buffer: this rank's band is fresh, the other ranks' bands come from a gather.

    In a synchronous step the gather is blocking and happens before attention, so every position is
    fresh. In an asynchronous step the gather of this step's fresh K/V is started after attention and
    waited for at the same layer one step later.
    """

    def __init__(self, batch: int, heads: int, n_txt: int, n_img: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, spans: list[Span], rank: int, comm) -> None:
        super().__init__(batch, heads, n_txt, n_img, head_dim, dtype, device)
        self.spans = spans
        self.rank = rank
        self.comm = comm
        self.max_len = max(s.n_txt + s.n_img for s in spans)
        chunk = (2, batch, self.max_len, heads, head_dim)
        # every rank's packed K/V in one fixed buffer [N, 2, B, Lmax, H, Dh], reused every step
        self.gathered = torch.empty((len(spans), *chunk), dtype=dtype, device=device)
        # this rank's K/V as sent [1, 2, B, Lmax, H, Dh]; rewritten only after its last gather was waited
        self.packed = torch.zeros((1, *chunk), dtype=dtype, device=device)
        self.pending = None
        self.sync = True
        self.exchange = True

    def set_mode(self, sync: bool, exchange: bool) -> None:
        """sync: gather before attention (warm-up). exchange: in async mode, start a gather after it."""
        self.sync, self.exchange = sync, exchange

    def _pack(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """k, v [B, L, H, Dh] into the fixed send buffer (the padding rows are never read)."""
        n = k.shape[1]
        self.packed[0, 0, :, :n] = k
        self.packed[0, 1, :, :n] = v
        return self.packed

    def _fill_others(self) -> None:
        for r, (span, kv) in enumerate(zip(self.spans, self.gathered)):
            if r != self.rank:
                n = span.n_txt + span.n_img
                self.write(span, kv[0, :, :n], kv[1, :, :n])

    def finish(self) -> None:
        """Wait for a gather still in flight (end of job)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def attend(self, span: Span, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            self._fill_others()
        self.write(span, k, v)
        if self.sync:
            self.comm.all_gather_into(self.gathered, self._pack(k, v))
            self._fill_others()
        out = F.scaled_dot_product_attention(q.transpose(1, 2), self.k, self.v).transpose(1, 2).flatten(2)
        if not self.sync and self.exchange:
            self.pending = self.comm.all_gather_into(self.gathered, self._pack(k, v), async_op=True)
        return out
