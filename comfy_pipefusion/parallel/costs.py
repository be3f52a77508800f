"""Analytic communication volume of each strategy: the bytes each rank sends in one job.

Control traffic (the control plane: cancel decisions, votes, statistics) is not counted.

Notation: B batch, D model width, S_t text tokens (0 for cross-attention families), S_i image tokens,
C latent channels per token (64 for Flux/SD3, 16 for PixArt; sent as float32), e bytes per activation
element, T model evaluations (steps, or more for samplers that evaluate twice per step), W synchronous
(warm-up) evaluations, M patches, N ranks, L attention layers.

PipeFusion, stage s < N - 1: every item's activations go to s + 1 once: all image tokens every step, and
the text with one patch per step (M patches with 'every_patch'; the warm-up step's single patch carries it):
    e * B * D * (T * S_i + S_t * (W' + (T - W') * k)),  W' = min(W, T), k = M or 1.
PipeFusion, last stage: each step's new latent goes back to stage 0 (T - 1 times), the final one to rank 0:
    4 * B * C * S_i * T.
DistriFusion, rank r: at every attention layer of every step that exchanges K/V, its padded band's K and V
go to each of the N - 1 others; a step exchanges when it is a warm-up step or not the last one:
    G * e * 2 * B * D * (N - 1) * (L * Lmax + L' * Lmax'),  G = T if W >= T else T - 1,
    Lmax = max_r(S_t,r + S_i,r) over L joint layers, Lmax' = max_r(S_i,r) over L' image-only layers
    (SD3.5's second attention);
plus, for r > 0, its band of the final latent: 4 * B * C * S_i,r.
naive_patch: only the final latent band of each rank r > 0.
"""
from __future__ import annotations

from ..patches import displaced_spans, split_even


def expected_bytes(strategy: str, *, rank: int, world: int, batch: int, width: int, n_txt: int, rows: int,
                   cols: int, steps: int, warmup: int, patches: int, layers: int, elem: int,
                   text_stream: str = "last_patch", channels: int = 64, image_layers: int = 0) -> int:
    n_img = rows * cols
    if strategy == "serial":
        return 0
    if strategy == "pipefusion":
        if rank == world - 1:
            return 4 * batch * channels * n_img * steps
        w = min(warmup, steps)
        k = patches if text_stream == "every_patch" else 1
        return elem * batch * width * (steps * n_img + n_txt * (w + (steps - w) * k))
    if strategy == "distrifusion":
        spans = displaced_spans(rows, cols, n_txt, world)
        lmax = max(s.n_txt + s.n_img for s in spans)
        lmax_img = max(s.n_img for s in spans)
        gathers = steps if warmup >= steps else steps - 1
        kv = gathers * elem * 2 * batch * width * (world - 1) * (layers * lmax + image_layers * lmax_img)
        return kv + (4 * batch * channels * spans[rank].n_img if rank else 0)
    if strategy == "naive_patch":
        r0, r1 = split_even(rows, world)[rank]
        return 4 * batch * channels * (r1 - r0) * cols if rank else 0
    raise ValueError(f"unknown strategy {strategy!r}")
