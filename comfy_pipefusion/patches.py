"""Patch arithmetic: pure functions, no torch.distributed, no model.

The sequence a DiT attends over is ``[text tokens; image tokens]`` (the *joint* sequence). Image tokens are
the packed latent in row-major order, ``cols`` tokens per row. A patch is a contiguous band of token rows,
optionally with a contiguous range of text tokens; ``Span`` names both ranges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``parts`` contiguous ranges whose sizes differ by at most one.

    The first ``n % parts`` ranges are one longer. Raises when a range would be empty.
    """
    if parts < 1 or parts > n:
        raise ValueError(f"cannot split {n} rows into {parts} non-empty bands (need 1 <= bands <= {n})")
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


@dataclass(frozen=True)
class Span:
    """Token ranges of one patch: text tokens ``[t0, t1)`` and image tokens ``[i0, i1)``."""

    t0: int
    t1: int
    i0: int
    i1: int

    @property
    def n_txt(self) -> int:
        return self.t1 - self.t0

    @property
    def n_img(self) -> int:
        return self.i1 - self.i0

    def joint_index(self, n_txt_total: int) -> torch.Tensor:
        """Positions of this patch's tokens in the joint sequence, text first."""  # [n_txt + n_img]
        return torch.cat([torch.arange(self.t0, self.t1),
                          torch.arange(n_txt_total + self.i0, n_txt_total + self.i1)])


def image_bands(rows: int, cols: int, patches: int) -> list[tuple[int, int]]:
    """Image-token ranges of ``patches`` bands of whole token rows."""
    return [(r0 * cols, r1 * cols) for r0, r1 in split_even(rows, patches)]


def balanced_rows(rows: int, cols: int, extra: list[int]) -> list[tuple[int, int]]:
    """Row bands whose token counts (``cols`` per row, plus ``extra[p]`` text tokens on patch p) are as
    equal as whole rows allow: each boundary is the row nearest to its share of all tokens, and every
    band keeps at least one row."""
    m = len(extra)
    if not 1 <= m <= rows:
        raise ValueError(f"cannot split {rows} rows into {m} non-empty bands (need 1 <= bands <= {rows})")
    target = (rows * cols + sum(extra)) / m
    bounds = [0]
    for p in range(m - 1):
        ideal = round(((p + 1) * target - sum(extra[:p + 1])) / cols)
        bounds.append(min(max(ideal, bounds[-1] + 1), rows - (m - p - 1)))
    bounds.append(rows)
    return list(zip(bounds[:-1], bounds[1:]))


def pipefusion_spans(rows: int, cols: int, n_txt: int, patches: int, text_stream: str) -> list[Span]:
    """Patches of one asynchronous PipeFusion step; the text tokens ride with the text patch(es).

    Bands are balanced by tokens: a patch that carries the text gets fewer image rows, so that every
    patch costs the same and the pipeline never waits on its largest patch.
    """
    text_on = {"first_patch": {0}, "last_patch": {patches - 1}, "every_patch": set(range(patches))}[text_stream]
    extra = [n_txt if p in text_on else 0 for p in range(patches)]
    bands = balanced_rows(rows, cols, extra)
    return [Span(0, extra[p], r0 * cols, r1 * cols) for p, (r0, r1) in enumerate(bands)]


def displaced_spans(rows: int, cols: int, n_txt: int, ranks: int) -> list[Span]:
    """DistriFusion: rank r owns text band r and image band r of the joint sequence."""
    txt = split_even(n_txt, ranks) if n_txt >= ranks else [(0, n_txt)] + [(n_txt, n_txt)] * (ranks - 1)
    return [Span(t0, t1, a, b) for (t0, t1), (a, b) in zip(txt, image_bands(rows, cols, ranks))]


def full_span(n_txt: int, n_img: int) -> Span:
    return Span(0, n_txt, 0, n_img)


def lane_spans(span: Span, lanes: int) -> list[Span]:
    """Ulysses inside a patch method: the ``lanes`` ranks of one stage (or band) each take a contiguous part of
    ``span``'s text tokens and of its image tokens, in order, so that joining every lane's text, then every
    lane's image, gives the span's own ``[text; image]`` order. Text shorter than ``lanes`` goes to lane 0."""
    if span.n_img < lanes:
        raise ValueError(f"a patch of {span.n_img} image tokens cannot be split over {lanes} Ulysses ranks: use "
                         f"fewer patches, a Ulysses degree of at most {span.n_img}, or a larger image")
    if span.n_txt >= lanes:
        txt = [(span.t0 + a, span.t0 + b) for a, b in split_even(span.n_txt, lanes)]
    else:
        txt = [(span.t0, span.t1)] + [(span.t1, span.t1)] * (lanes - 1)
    img = [(span.i0 + a, span.i0 + b) for a, b in split_even(span.n_img, lanes)]
    return [Span(t0, t1, i0, i1) for (t0, t1), (i0, i1) in zip(txt, img)]
