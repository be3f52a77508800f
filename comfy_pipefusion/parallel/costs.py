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
Ulysses, rank r: at every attention layer of every evaluation, two all_to_alls over its N - 1 peers: q, k, v
of its padded band for their heads, then the outputs of their bands for its heads:
    T * e * 4 * B * (D / N) * (N - 1) * (L * Lmax + L' * Lmax'),  Lmax, Lmax' as DistriFusion's;
plus, for r > 0, its band of the final latent: 4 * b * C * S_i,r (b: the images, B/2 with true CFG).
cfg+X (B: the model batch 2b of true CFG), rank r = rank r' = r mod N/2 of its branch: X's bytes for r' on
N/2 ranks at batch b, plus the exchange of its predictions with the other branch at every evaluation for
the tokens whose latent it updates (all of them for one rank per branch, PipeFusion's last stage, the band
of a DistriFusion or Ulysses rank): 4 * b * C * T * S_i,r'.
"""
from __future__ import annotations

from ..patches import displaced_spans, split_even


def expected_bytes(strategy: str, *, rank: int, world: int, batch: int, width: int, n_txt: int, rows: int,
                   cols: int, steps: int, warmup: int, patches: int, layers: int, elem: int,
                   text_stream: str = "last_patch", channels: int = 64, image_layers: int = 0,
                   images: int | None = None) -> int:
    """``batch``: the model batch (2x the images with true CFG); ``images``: the latent's batch (default:
    ``batch``), what the final latent carries."""
    n_img = rows * cols
    images = batch if images is None else images
    dims = dict(batch=batch, images=images, width=width, n_txt=n_txt, rows=rows, cols=cols, steps=steps, warmup=warmup,
                patches=patches, layers=layers, elem=elem, text_stream=text_stream, channels=channels,
                image_layers=image_layers)
    if strategy.split("+")[0] == "cfg":
        return _cfg_bytes(strategy, rank, world, dims)
    if strategy == "serial":
        return 0
    if strategy == "ulysses":
        spans = displaced_spans(rows, cols, n_txt, world)
        lmax, lmax_img = max(s.n_txt + s.n_img for s in spans), max(s.n_img for s in spans)
        a2a = steps * elem * 4 * batch * (width // world) * (world - 1) * (layers * lmax + image_layers * lmax_img)
        return a2a + (4 * images * channels * spans[rank].n_img if rank else 0)
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


def _cfg_bytes(strategy: str, rank: int, world: int, dims: dict) -> int:
    half, inner = world // 2, "+".join(strategy.split("+")[1:]) or "serial"
    local, b = rank % half, dims["batch"] // 2
    own = expected_bytes(inner, rank=local, world=half, **{**dims, "batch": b, "images": b})
    rows, cols = dims["rows"], dims["cols"]
    if inner == "serial":
        tokens = rows * cols
    elif inner == "pipefusion":
        tokens = rows * cols if local == half - 1 else 0
    else:  # one band per rank: distrifusion, ulysses
        tokens = displaced_spans(rows, cols, dims["n_txt"], half)[local].n_img
    return own + 4 * b * dims["channels"] * dims["steps"] * tokens
