"""Reference latents in a CONDITIONING (ComfyUI's ReferenceLatent: Flux.1 Kontext; TextEncodeQwenImageEdit:
Qwen-Image-Edit) as job tensors.

No ComfyUI import here: this reads ComfyUI's plain data. The references travel as ``ref0, ref1, ...`` (the
positive's), ``neg_ref0, ...`` (the negative's, under cfg) and ``mid_ref0, ...`` (DualCFGGuider's middle) in
LATENT space, [B, C, h, w] (a video VAE's one-frame latent [B, C, 1, h, w], Qwen-Image's, loses its frame axis);
the worker moves them into the sampling space as ComfyUI's model does.
"""
from __future__ import annotations

from comfy_pipefusion.models.references import METHODS


def reference_tensors(cond, which: str = "positive", prefix: str = "ref") -> tuple[dict, str | None]:
    """({prefix0: latent [B, C, h, w], ...}, the conditioning's reference_latents_method or None) of a
    CONDITIONING."""
    extra = cond[0][1] if isinstance(cond, list) and cond else {}
    refs = extra.get("reference_latents") or []
    method = extra.get("reference_latents_method")
    if method is not None and method not in METHODS:
        raise ValueError(f"{which} conditioning asks for reference latents method {method!r}; implemented: "
                         f"{', '.join(METHODS)}")
    out = {}
    for i, r in enumerate(refs):
        if getattr(r, "ndim", 0) == 5 and r.shape[2] == 1:  # the Wan VAE's one frame (Qwen-Image-Edit)
            r = r[:, :, 0]
        if getattr(r, "ndim", 0) != 4:
            raise ValueError(f"{which} reference latent {i} has shape {tuple(getattr(r, 'shape', ()))}; connect "
                             "a LATENT (VAEEncode of the reference image) to ReferenceLatent")
        out[f"{prefix}{i}"] = r
    return out, method


def job_references(positive, negative, cfg: float, middle=None) -> tuple[dict, str | None]:
    """Every reference tensor of a KSampler call (the negative's under cfg or with a middle; the middle's, as
    ``mid_ref0, ...``, when DualCFGGuider runs one), and the method."""
    tensors, method = reference_tensors(positive)
    if abs(cfg - 1.0) > 1e-6 or middle is not None:
        neg, _ = reference_tensors(negative, "negative", "neg_ref")
        tensors.update(neg)
    if middle is not None:
        tensors.update(reference_tensors(middle, "middle", "mid_ref")[0])
    return tensors, method

