"""8-bit float weights kept as stored, computed in the activations' dtype.

A checkpoint in float8_e4m3fn holds half the bytes of bf16; a stage keeps its Linear weights in that form.
How a stage computes with them is chosen per job (``set_compute``, decided by ``memory.fp8_compute``):

- ``upcast``: one copy of each 8-bit weight in the compute dtype, made once and kept with the stage (when
  memory allows: the copy is counted by the memory estimate), so no step casts a weight again;
- ``cast``: each weight is cast to the input's dtype inside ``forward`` (one at a time, freed right after),
  which is what ComfyUI does with these files; the result equals ``upcast`` exactly;
- ``scaled_mm``: ``torch._scaled_mm`` on CUDA devices of compute capability 8.9 and up (the activations are
  quantised to 8 bits per call, so results differ slightly; opt-in, as ComfyUI's ``--fast``). Untested on
  CPU: where the device or a shape does not allow it, the layer casts instead.

A weight of ComfyUI's scaled-fp8 files carries a per-tensor ``scale`` (weight = stored x scale): every mode
applies it as ComfyUI does (the cast weight times the scale; ``scaled_mm`` passes it as the weight's scale).

Everything else (biases, norms, embeddings) is loaded in the compute dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
MODES = ("upcast", "cast", "scaled_mm")
E4M3_MAX = 448.0


class StoredFp8Linear(nn.Linear):
    """nn.Linear whose weight stays 8-bit; the product runs in the input's dtype. ``upcast`` (a plain
    attribute, not in the state dict) holds the compute-dtype copy when the stage keeps one."""

    upcast: torch.Tensor | None = None
    scaled: bool = False
    scale: torch.Tensor | None = None  # [] float32: the file's per-tensor scale (scaled-fp8 files)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in FP8:  # code that casts its input to the weight's dtype (diffusers' Z-Image time embedder)
            x = x.float()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.upcast is not None and self.upcast.dtype == x.dtype:
            return F.linear(x, self.upcast, bias)
        if self.scaled and _scaled_ok(x, self.weight):
            return _scaled_linear(x, self.weight, bias, self.scale)
        return F.linear(x, self.dequantised(x.dtype), bias)

    def dequantised(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``: cast, times the scale where the file has one (as ComfyUI computes it)."""
        w = self.weight.to(dtype)
        return w if self.scale is None else w * self.scale.to(dtype)


def _scaled_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return x.is_cuda and w.dtype == torch.float8_e4m3fn and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0


def _scaled_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                   w_scale: torch.Tensor | None = None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])  # [M, in]
    scale = (flat.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
    xq = (flat / scale.to(flat.dtype)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    one = torch.ones((), device=x.device, dtype=torch.float32) if w_scale is None else w_scale.float()
    out = torch._scaled_mm(xq, w.t(), scale_a=scale, scale_b=one, out_dtype=x.dtype)  # w.t(): column-major
    out = out[0] if isinstance(out, tuple) else out  # older torch returns (out, amax)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], w.shape[0])


def scaled_mm_available(device: torch.device) -> bool:
    """Whether ``device`` has an 8-bit matmul torch can call (CUDA, compute capability 8.9 and up)."""
    return device.type == "cuda" and hasattr(torch, "_scaled_mm") and \
        torch.cuda.get_device_capability(device) >= (8, 9)


def can_keep(module: nn.Module, attr: str, stored: torch.dtype) -> bool:
    """Whether ``module.attr`` stored as ``stored`` is kept 8-bit: plain Linear weights only."""
    return stored in FP8 and attr == "weight" and type(module) in (nn.Linear, StoredFp8Linear)


def keep_stored(linear: nn.Linear, scale: torch.Tensor | None = None) -> None:
    """Make ``linear`` compute with its 8-bit weight (its parameters and names are unchanged), times ``scale``
    (a scaled-fp8 file's per-tensor scale) where given."""
    linear.__class__ = StoredFp8Linear
    linear.scale = scale


def stored_layers(model: nn.Module) -> list[StoredFp8Linear]:
    return [m for m in model.modules() if isinstance(m, StoredFp8Linear) and not m.weight.is_meta]


def copy_bytes(model: nn.Module) -> int:
    """Bytes of the upcast copies ``model`` holds now."""
    return sum(m.upcast.numel() * m.upcast.element_size() for m in stored_layers(model) if m.upcast is not None)


def set_compute(model: nn.Module, mode: str, dtype: torch.dtype) -> int:
    """Make every 8-bit Linear of ``model`` compute as ``mode`` (see the module docstring): ``upcast`` makes
    the copies in ``dtype`` (kept ones are reused), the others drop them. Returns the copies' bytes."""
    if mode not in MODES:
        raise ValueError(f"fp8 compute mode {mode!r} unknown: choose one of {', '.join(MODES)}")
    with torch.no_grad():
        for m in stored_layers(model):
            if mode == "upcast":
                if m.upcast is None or m.upcast.dtype != dtype:
                    m.upcast = None  # free the old copy before the new one
                    m.upcast = m.dequantised(dtype)
            else:
                m.upcast = None
            m.scaled = mode == "scaled_mm"
    return copy_bytes(model)


def stored_bytes(model: nn.Module) -> dict[torch.dtype, int]:
    """Bytes held per dtype (meta tensors hold none): shows what a stage keeps in 8 bits."""
    out: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if not p.is_meta:
            out[p.dtype] = out.get(p.dtype, 0) + p.numel() * p.element_size()
    return out
