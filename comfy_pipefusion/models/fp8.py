"""8-bit float weights kept as stored, computed in the activations' dtype.

A checkpoint in float8_e4m3fn holds half the bytes of bf16; a stage keeps its Linear weights in that form and
casts each one to the input's dtype inside ``forward`` (one weight at a time, freed right after), which is
what ComfyUI does with these files. Everything else (biases, norms, embeddings) is loaded in the compute dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class StoredFp8Linear(nn.Linear):
    """nn.Linear whose weight stays 8-bit; the product runs in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def can_keep(module: nn.Module, attr: str, stored: torch.dtype) -> bool:
    """Whether ``module.attr`` stored as ``stored`` is kept 8-bit: plain Linear weights only."""
    return stored in FP8 and attr == "weight" and type(module) in (nn.Linear, StoredFp8Linear)


def keep_stored(linear: nn.Linear) -> None:
    """Make ``linear`` compute with its 8-bit weight (its parameters and names are unchanged)."""
    linear.__class__ = StoredFp8Linear


def stored_bytes(model: nn.Module) -> dict[torch.dtype, int]:
    """Bytes held per dtype (meta tensors hold none): shows what a stage keeps in 8 bits."""
    out: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if not p.is_meta:
            out[p.dtype] = out.get(p.dtype, 0) + p.numel() * p.element_size()
    return out
