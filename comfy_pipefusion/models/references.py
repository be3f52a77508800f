"""Reference latents: ComfyUI's ReferenceLatent conditioning (Flux.1 Kontext, Qwen-Image-Edit, Flux.2 edits).

Each reference is a LATENT of its own size; its 2x2-packed tokens join the attention sequence after the
image with positions of their own, and go through the image stream's weights. ComfyUI places them with
one of three methods (``reference_latents_method`` in the conditioning):

- ``offset`` (Flux.1's default): time index 1; each further reference continues beside the previous ones,
  to the right when that keeps the area more square, else below;
- ``index`` (Flux.2's default): time index 1, 2, ... (times ``index_scale``), every reference at row/col 0;
- ``uxo``: time index 0, every reference placed past the image's own rows and columns.

Reference tokens evolve block by block like text and every image patch attends to all of them, so the
engine carries them with the text stream: the joint sequence is ``[text; references; image]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .family import pack_latent

METHODS = ("offset", "index", "uxo")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"reference latents method {method!r} is unknown: choose one of {', '.join(METHODS)}")
    return method


def token_grid(ref: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of a reference latent [B, C, h, w] once padded to whole 2x2 patches."""
    return (ref.shape[-2] + 1) // 2, (ref.shape[-1] + 1) // 2


def count(refs) -> int:
    """Tokens all references add to the sequence."""
    return sum(r * c for r, c in map(token_grid, refs))


def pack(ref: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, rows * cols, 4C]; an odd side is padded circularly, as ComfyUI pads to its patch size."""
    h, w = ref.shape[-2:]
    if h % 2 or w % 2:
        ref = F.pad(ref, (0, w % 2, 0, h % 2), mode="circular")
    return pack_latent(ref)


def tokens(refs) -> torch.Tensor:
    """Every reference's tokens in order, [B, count(refs), 4C]."""
    return torch.cat([pack(r) for r in refs], 1)


def _grid_ids(rows: int, cols: int, index: float, row0: int, col0: int, axes: int, centred: bool) -> torch.Tensor:
    ids = torch.zeros(rows, cols, axes)  # [rows, cols, axes]
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows, dtype=torch.float32)[:, None] + row0 - (rows // 2 if centred else 0)
    ids[..., 2] = torch.arange(cols, dtype=torch.float32)[None, :] + col0 - (cols // 2 if centred else 0)
    return ids.reshape(rows * cols, axes)


def positions(refs, method: str, rows: int, cols: int, axes: int = 3, index_scale: float = 1.0,
              centred: bool = False) -> torch.Tensor:
    """RoPE ids of every reference token, [count(refs), axes], for an image of ``rows`` x ``cols`` tokens.
    Offsets are counted in latent pixels and rounded to tokens, as ComfyUI does. ``centred``: each grid's
    rows and columns count from minus half its own size (Qwen-Image centres every image on its middle)."""
    check_method(method)
    out, h, w, index = [], 0, 0, 0.0
    for ref in refs:
        rh, rw = ref.shape[-2:]
        if method == "index":
            index, h_off, w_off = index + index_scale, 0, 0
        elif method == "uxo":
            index, h_off, w_off = 0.0, rows * 2 + h, cols * 2 + w
            h, w = h + rh, w + rw
        else:
            index, h_off, w_off = 1.0, 0, 0
            if rh + h > rw + w:
                w_off = w
            else:
                h_off = h
            h, w = max(h, rh + h_off), max(w, rw + w_off)
        out.append(_grid_ids(*token_grid(ref), index, (h_off + 1) // 2, (w_off + 1) // 2, axes, centred))
    return torch.cat(out) if out else torch.zeros(0, axes)


def batched(refs, batch: int, what: str = "reference latent") -> tuple[torch.Tensor, ...]:
    """Each reference cut or repeated to ``batch``, as ComfyUI fits a list condition to the batch size."""
    out = []
    for i, r in enumerate(refs):
        if r.ndim != 4 or r.shape[0] < 1:
            raise ValueError(f"{what} {i} has shape {tuple(r.shape)}; a LATENT is [batch, channels, h, w]")
        reps = -(-batch // r.shape[0])
        out.append(r.repeat(reps, 1, 1, 1)[:batch] if reps > 1 else r[:batch])
    return tuple(out)


def listed(tensors: dict, prefix: str) -> list:
    """A job's tensors ``prefix0, prefix1, ...`` in order (how references travel to the workers)."""
    out = []
    while f"{prefix}{len(out)}" in tensors:
        out.append(tensors[f"{prefix}{len(out)}"])
    return out
