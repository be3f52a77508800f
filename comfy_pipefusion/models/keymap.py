"""Key adapters as data: each diffusers tensor is a concatenation, along dim 0, of row ranges of stored tensors.

Every conversion the original single-file layouts need is of this form: a fused qkv split into q, k, v (equal
row ranges), Flux's single-block ``linear1`` split into q, k, v and the MLP input, a shift/scale swap (the two
halves in the other order), a straight rename (the whole tensor). Written as data, one map serves the loader
(which reads each range straight from the file) and its inverse, the writer the tests use.
"""
from __future__ import annotations

import torch

Piece = tuple[str, int, int | None]  # (stored key, first row, end row or None for the whole tensor)
KeyMap = dict[str, tuple[Piece, ...]]  # diffusers key -> pieces, concatenated along dim 0


def rename(out: KeyMap, target: str, source: str, bias: bool = True) -> None:
    """``target.weight`` (and ``.bias``) is ``source.weight`` (and ``.bias``) unchanged."""
    for end in ("weight", "bias") if bias else ("weight",):
        out[f"{target}.{end}"] = ((f"{source}.{end}", 0, None),)


def split(out: KeyMap, targets: list[str], source: str, sizes: list[int], bias: bool = True) -> None:
    """``targets[i]`` is rows ``[sum(sizes[:i]), sum(sizes[:i+1]))`` of the fused ``source`` (weight and bias)."""
    for end in ("weight", "bias") if bias else ("weight",):
        start = 0
        for target, n in zip(targets, sizes):
            out[f"{target}.{end}"] = ((f"{source}.{end}", start, start + n),)
            start += n


def swap_halves(out: KeyMap, target: str, source: str, half: int) -> None:
    """AdaLN (shift, scale) stored, diffusers wants (scale, shift): the two halves of ``half`` rows swapped."""
    for end in ("weight", "bias"):
        out[f"{target}.{end}"] = ((f"{source}.{end}", half, 2 * half), (f"{source}.{end}", 0, half))


def sources(kmap: KeyMap) -> set[str]:
    """Stored keys a map reads."""
    return {key for pieces in kmap.values() for key, _, _ in pieces}


def for_module(kmap: KeyMap, name: str) -> KeyMap:
    """The part of ``kmap`` that fills module (or root tensor) ``name``, e.g. ``transformer_blocks.3``."""
    return {k: v for k, v in kmap.items() if k == name or k.startswith(name + ".")}


def invert(state_dict: dict[str, torch.Tensor], kmap: KeyMap) -> dict[str, torch.Tensor]:
    """The stored tensors a map reads, assembled from a diffusers state dict (the writer of the tests)."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for target, pieces in kmap.items():
        tensor, row = state_dict[target], 0
        for key, start, stop in pieces:
            if stop is None:
                parts.setdefault(key, []).append((0, tensor))
                continue
            parts.setdefault(key, []).append((start, tensor[row:row + stop - start]))
            row += stop - start
    out = {}
    for key, chunks in parts.items():
        chunks.sort(key=lambda c: c[0])
        out[key] = chunks[0][1] if len(chunks) == 1 else torch.cat([c for _, c in chunks])
    return out
