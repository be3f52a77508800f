"""Weight adapters and their math: what one adapter entry of a LoRA file adds to the weight it targets.

Kinds (the suffixes a file's keys carry after the target's prefix):
    lora   LoRA / LoCon: ``lora_up``/``lora_down`` (kohya, ComfyUI), ``lora_B``/``lora_A`` (peft), ``lora.up``/
           ``lora.down`` and ``_lora.up``/``_lora.down`` (diffusers); ``lora_mid`` (LoCon's Tucker core)
           delta = up @ down, scaled by alpha / rank (rank = rows of down)
    loha   LoHa: ``hada_w1_a/b``, ``hada_w2_a/b`` (``hada_t1/t2``: CP cores); delta = (w1a w1b) * (w2a w2b),
           scaled by alpha / rows of w1b
    lokr   LoKr: ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b`` (``lokr_t2``);
           delta = kron(w1, w2), scaled by alpha / the rank of the factored one (1 when none is factored)
    diff   a full difference (``diff``, ``w_norm``; ``diff_b``/``b_norm`` for the bias); ``set_weight`` replaces
Every kind but diff/set may carry ``dora_scale`` (DoRA): the adapted weight's norm per output row (or per
input column) is rescaled to ``dora_scale``, then blended with the weight by the strength.
Results match ComfyUI's LoRA loader (tests/test_lora_math_comfy.py compares them key by key).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# suffix -> the name this module uses; the longest suffixes are tried first
_LORA_PAIRS = (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight"),
               ("lora.up.weight", "lora.down.weight"), ("lora_linear_layer.up.weight", "lora_linear_layer.down.weight"),
               ("lora_B.default.weight", "lora_A.default.weight"), ("lora_B", "lora_A"))
SUFFIXES = tuple(sorted({s for pair in _LORA_PAIRS for s in pair} | {
    "lora_mid.weight", "alpha", "dora_scale", "reshape_weight", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
    "hada_t1", "hada_t2", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "w_norm", "b_norm", "set_weight"}, key=len, reverse=True))


def split_key(key: str) -> tuple[str, str] | None:
    """A file key -> (target prefix, suffix), or None when it carries no adapter suffix we know."""
    if key.endswith("_lora.up.weight") or key.endswith("_lora.down.weight"):  # diffusers' attention processors
        prefix, _, rest = key.rpartition("_lora.")
        return prefix, "lora." + rest
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return None


@dataclass(frozen=True)
class Adapter:
    """One target's entry of one file. ``kind``: lora | loha | lokr | diff | set; ``t``: its tensors by suffix."""

    kind: str
    t: dict = field(repr=False)
    alpha: float | None = None

    @property
    def dora(self) -> torch.Tensor | None:
        return self.t.get("dora_scale")


def parse(parts: dict[str, torch.Tensor]) -> tuple[Adapter | None, Adapter | None]:
    """(weight adapter, bias adapter) of one target from its tensors by suffix; None where there is none."""
    alpha = float(parts["alpha"].item()) if "alpha" in parts else None
    bias = Adapter("diff", {"diff": parts.get("diff_b", parts.get("b_norm"))}) \
        if "diff_b" in parts or "b_norm" in parts else None
    for up, down in _LORA_PAIRS:
        if up in parts:
            t = {"up": parts[up], "down": parts[down]}
            for extra in ("lora_mid.weight", "dora_scale"):
                if extra in parts and not (extra == "lora_mid.weight" and up != "lora_up.weight"):
                    t[extra.split(".")[0]] = parts[extra]
            return Adapter("lora", t, alpha), bias
    if "hada_w1_a" in parts:
        return Adapter("loha", parts, alpha), bias
    if any(k.startswith("lokr_w") for k in parts):
        return Adapter("lokr", parts, alpha), bias
    for name in ("diff", "w_norm"):
        if name in parts:
            return Adapter("diff", {"diff": parts[name]}), bias
    if "set_weight" in parts:
        return Adapter("set", {"set": parts["set_weight"]}), bias
    return None, bias


def _f(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like.device, torch.float32)


def _cp(core: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """A CP-factored kernel as LyCORIS stores it: core [i, j, kh, kw], b [j, r], a [i, p] -> [p, r, kh, kw]."""
    return torch.einsum("ijkl,jr,ip->prkl", core, b, a)


def delta(ad: Adapter, weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(the adapter's difference in ``weight``'s shape, float32, and its alpha scale)."""
    t = {k: _f(v, weight) for k, v in ad.t.items() if k != "alpha"}
    if ad.kind == "lora":
        up, down = t["up"], t["down"]
        scale = ad.alpha / down.shape[0] if ad.alpha is not None else 1.0
        if "lora_mid" in t:  # LoCon's core: down[j, i, h, w] = sum_k down[k, i] mid[k, j, h, w]
            mid = t["lora_mid"]
            down = torch.einsum("ki,kjhw->jihw", down.flatten(1), mid)
        return (up.flatten(1) @ down.flatten(1)).reshape(weight.shape), scale
    if ad.kind == "loha":
        scale = ad.alpha / t["hada_w1_b"].shape[0] if ad.alpha is not None else 1.0
        if "hada_t1" in t:
            m1 = _cp(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            m2 = _cp(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            m1, m2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
        return (m1 * m2).reshape(weight.shape), scale
    if ad.kind == "lokr":
        rank = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            rank, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None:
            rank = t["lokr_w2_b"].shape[0]
            w2 = _cp(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"]) if "lokr_t2" in t \
                else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = ad.alpha / rank if ad.alpha is not None and rank is not None else 1.0
        return torch.kron(w1, w2).reshape(weight.shape), scale
    raise ValueError(f"adapter kind {ad.kind!r} has no low-rank difference")


def apply(weight: torch.Tensor, ad: Adapter, strength: float) -> torch.Tensor:
    """``weight`` (float32) with ``ad`` applied at ``strength``; a new tensor."""
    if ad.kind == "diff":
        d = _f(ad.t["diff"], weight)
        if d.shape != weight.shape:
            raise ValueError(f"a difference of shape {tuple(d.shape)} for a weight of {tuple(weight.shape)}")
        return weight + strength * d
    if ad.kind == "set":
        return _f(ad.t["set"], weight).reshape(weight.shape).clone()
    d, scale = delta(ad, weight)
    if ad.dora is None:
        return weight + (strength * scale) * d
    return _dora(weight, d * scale, _f(ad.dora, weight), strength)


def _dora(weight: torch.Tensor, d: torch.Tensor, magnitude: torch.Tensor, strength: float) -> torch.Tensor:
    """DoRA: the adapted weight rescaled to ``magnitude`` per output row (the norm of the weight before the
    adapter) or per input column (the norm of the adapted weight), blended by ``strength``."""
    adapted = weight + d
    if magnitude.shape[0] == adapted.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = adapted.transpose(0, 1).reshape(adapted.shape[1], -1).norm(dim=1)
        norm = norm.reshape(-1, *[1] * (adapted.dim() - 1)).transpose(0, 1)
    adapted = adapted * (magnitude / (norm + torch.finfo(weight.dtype).eps))
    return adapted if strength == 1.0 else weight + strength * (adapted - weight)
