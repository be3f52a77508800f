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
    T * e * 4 * B * (D / N) * (N - 1) * (L * Lmax + L' * Lmax'),  Lmax, Lmax' as DistriFusion's (where N does
    not divide the H heads, each chunk is padded to the largest share: D / N becomes ceil(H / N) * D / H);
plus, for r > 0, its band of the final latent: 4 * b * C * S_i,r (b: the images, B/2 with true CFG).
ulysses+pipefusion (u lanes per stage, rank r = stage s * u + lane j; each item's span, W' warm-up items of
the whole sequence then M patches per evaluation, cut into u parts P_j, ``patches.lane_spans``): stage s < N - 1
sends its part's activations to lane j of stage s + 1, sum over items of e * B * D * |P_j|; every stage, per
item and per attention layer of its blocks (L_s joint, L'_s image-only), the two all_to_alls of Ulysses over
its u lanes, 4 * e * B * (D / u) * (u - 1) * max_j |P_j| (image tokens only for L'_s); the last stage gathers
the model's output of the span over its lanes, per item 4 * B * C * (u - 1) * max_j |P_j|_img, and sends its
part of every item after the first evaluation back to stage 0, 4 * b * C * |P_j|_img, and lane 0 the final
latent, 4 * b * C * S_i.
ulysses+distrifusion (rank r = band * u + lane j, P_j lane j's part of its band): at every evaluation and
layer, Ulysses' all_to_alls over the band's lanes as above; DistriFusion's gathers over the N bands of lane
j for its D / u heads (the formula above with D / u, N bands; where u does not divide the heads, lane j's own
share of them: ``split_even(H, u)``); and, for r > 0, its part of the final latent.
cfg+X (B: the model batch 2b of true CFG), rank r = rank r' = r mod N/2 of its branch: X's bytes for r' on
N/2 ranks at batch b, plus the exchange of its predictions with the other branch at every evaluation for
the tokens whose latent it updates (all of them for one rank per branch, PipeFusion's last stage, the band
of a DistriFusion or Ulysses rank): 4 * b * C * T * S_i,r'.
"""
from __future__ import annotations

from ..patches import displaced_spans, full_span, lane_spans, pipefusion_spans, split_even


def expected_bytes(strategy: str, *, rank: int, world: int, batch: int, width: int, n_txt: int, rows: int,
                   cols: int, steps: int, warmup: int, patches: int, layers: int, elem: int,
                   text_stream: str = "last_patch", channels: int = 64, image_layers: int = 0,
                   images: int | None = None, ulysses: int = 1,
                   stage_layers: tuple[tuple[int, int], ...] | None = None, heads: int = 0) -> int:
    """``batch``: the model batch (2x the images with true CFG); ``images``: the latent's batch (default:
    ``batch``), what the final latent carries; ``ulysses``: the Ulysses degree inside a patch method;
    ``stage_layers``: (joint, image-only) attention layers of each PipeFusion stage (ulysses+pipefusion);
    ``heads``: the model's attention heads (0: as many as Ulysses' degree divides evenly)."""
    n_img = rows * cols
    images = batch if images is None else images
    dims = dict(batch=batch, images=images, width=width, n_txt=n_txt, rows=rows, cols=cols, steps=steps, warmup=warmup,
                patches=patches, layers=layers, elem=elem, text_stream=text_stream, channels=channels,
                image_layers=image_layers, heads=heads)
    if strategy.split("+")[0] == "cfg":
        return _cfg_bytes(strategy, rank, world, dims, ulysses, stage_layers)
    if strategy == "serial":
        return 0
    if strategy in ("ulysses+pipefusion", "ulysses+distrifusion"):
        return _lanes_bytes(strategy, rank, world, ulysses, stage_layers, dims)
    if strategy == "ulysses":
        spans = displaced_spans(rows, cols, n_txt, world)
        lmax, lmax_img = max(s.n_txt + s.n_img for s in spans), max(s.n_img for s in spans)
        a2a = (steps * elem * 4 * batch * chunk(width, heads, world) * (world - 1)
               * (layers * lmax + image_layers * lmax_img))
        return a2a + (4 * images * channels * spans[rank].n_img if rank else 0)
    if strategy == "pipefusion":
        if rank == world - 1:
            return 4 * images * channels * n_img * steps  # the sampled latent, one image per branch batch
        w = min(warmup, steps)
        k = patches if text_stream == "every_patch" else 1
        return elem * batch * width * (steps * n_img + n_txt * (w + (steps - w) * k))
    if strategy == "distrifusion":
        spans = displaced_spans(rows, cols, n_txt, world)
        lmax = max(s.n_txt + s.n_img for s in spans)
        lmax_img = max(s.n_img for s in spans)
        gathers = steps if warmup >= steps else steps - 1
        kv = gathers * elem * 2 * batch * width * (world - 1) * (layers * lmax + image_layers * lmax_img)
        return kv + (4 * images * channels * spans[rank].n_img if rank else 0)
    if strategy == "naive_patch":
        r0, r1 = split_even(rows, world)[rank]
        return 4 * images * channels * (r1 - r0) * cols if rank else 0
    raise ValueError(f"unknown strategy {strategy!r}")


def chunk(width: int, heads: int, ranks: int) -> int:
    """Elements per token of one chunk of Ulysses' exchange over ``ranks``: the largest share of the heads
    (the others are padded to it), ``width // ranks`` when they split evenly or ``heads`` is 0."""
    return width // ranks if not heads else width // heads * -(-heads // ranks)


def _cfg_bytes(strategy: str, rank: int, world: int, dims: dict, u: int, stage_layers) -> int:
    half, inner = world // 2, "+".join(strategy.split("+")[1:]) or "serial"
    local, b = rank % half, dims["batch"] // 2
    own = expected_bytes(inner, rank=local, world=half, **{**dims, "batch": b, "images": b}, ulysses=u,
                         stage_layers=stage_layers)
    rows, cols = dims["rows"], dims["cols"]
    if inner == "serial":
        tokens = rows * cols
    elif inner == "pipefusion":
        tokens = rows * cols if local == half - 1 else 0
    elif inner == "ulysses+pipefusion":  # every lane of the last stage samples every token
        tokens = rows * cols if local // u == half // u - 1 else 0
    elif inner == "ulysses+distrifusion":  # lane j of a band its part
        band = displaced_spans(rows, cols, dims["n_txt"], half // u)[local // u]
        tokens = lane_spans(band, u)[local % u].n_img
    else:  # one band per rank: distrifusion, ulysses
        tokens = displaced_spans(rows, cols, dims["n_txt"], half)[local].n_img
    return own + 4 * b * dims["channels"] * dims["steps"] * tokens


def _lanes_bytes(strategy: str, rank: int, world: int, u: int, stage_layers, d: dict) -> int:
    """Ulysses inside PipeFusion's stages or DistriFusion's bands (the formulas in the module docstring)."""
    n, (s, j) = world // u, divmod(rank, u)
    e, mb, c, width = d["elem"], d["batch"], d["channels"], d["width"]
    n_img, n_txt = d["rows"] * d["cols"], d["n_txt"]

    def a2a(span, joint: int, image: int) -> int:  # Ulysses' two all_to_alls at every layer, one item
        parts = lane_spans(span, u)
        longest = max(p.n_txt + p.n_img for p in parts), max(p.n_img for p in parts)
        return 4 * e * mb * chunk(width, d["heads"], u) * (u - 1) * (joint * longest[0] + image * longest[1])
    if strategy == "ulysses+distrifusion":
        spans = displaced_spans(d["rows"], d["cols"], n_txt, n)
        mine = lane_spans(spans[s], u)[j]
        gathers = d["steps"] if d["warmup"] >= d["steps"] else d["steps"] - 1
        lmax, lmax_img = max(p.n_txt + p.n_img for p in spans), max(p.n_img for p in spans)
        share = (width // u if not d["heads"] else
                 width // d["heads"] * len(range(*split_even(d["heads"], u)[j])))  # lane j's heads
        kv = gathers * e * 2 * mb * share * (n - 1) * (d["layers"] * lmax + d["image_layers"] * lmax_img)
        return (d["steps"] * a2a(spans[s], d["layers"], d["image_layers"]) + kv
                + (4 * d["images"] * c * mine.n_img if rank else 0))
    if stage_layers is None or len(stage_layers) != n:
        raise ValueError(f"ulysses+pipefusion's bytes need the attention layers of each of its {n} stages")
    w = min(d["warmup"], d["steps"])
    patches = pipefusion_spans(d["rows"], d["cols"], n_txt, d["patches"], d["text_stream"])
    items = [full_span(n_txt, n_img)] * w + patches * (d["steps"] - w)
    total = sum(a2a(span, *stage_layers[s]) for span in items)
    if s < n - 1:
        return total + sum(e * mb * width * (p.n_txt + p.n_img) for p in (lane_spans(i, u)[j] for i in items))
    gather = sum(4 * mb * c * (u - 1) * max(p.n_img for p in lane_spans(i, u)) for i in items)
    # every item after the first evaluation (one warm-up item: warm-up >= 1) comes back to stage 0 once
    ring = sum(4 * d["images"] * c * lane_spans(i, u)[j].n_img for i in items[1:])
    return total + gather + ring + (4 * d["images"] * c * n_img if j == 0 else 0)
