"""Translating ComfyUI's values into a job, with errors that name the problem and the fix.

No ComfyUI import here: these take ComfyUI's plain data (CONDITIONING lists, LATENT dicts, strings).
"""
from __future__ import annotations

import torch

IMPLEMENTED_SAMPLERS = ("euler",)
IMPLEMENTED_SCHEDULERS = ("simple",)
DTYPE_CHOICES = ("default", "float32", "bfloat16", "float16")


def parse_devices(text: str, gpu_count: int) -> tuple[tuple[int, ...] | None, int]:
    """'auto' | '0,1,3' (CUDA devices) | 'cpu:N' (N CPU ranks) -> (devices or None for CPU, ranks)."""
    s = text.strip().lower().replace(" ", "")
    if s == "auto":
        return (tuple(range(gpu_count)), gpu_count) if gpu_count >= 1 else (None, 2)
    if s.startswith("cpu"):
        n = s[4:] if s.startswith("cpu:") else ("1" if s == "cpu" else "")
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"devices {text!r}: write cpu:N with N >= 1 CPU ranks, e.g. cpu:2")
        return None, int(n)
    try:
        devs = tuple(int(p) for p in s.split(",") if p != "")
    except ValueError:
        raise ValueError(f"devices {text!r}: write GPU indices like 0,1 or cpu:2 or auto") from None
    if not devs:
        raise ValueError(f"devices {text!r}: no device given; write GPU indices like 0,1 or cpu:2 or auto")
    if len(set(devs)) != len(devs):
        raise ValueError(f"devices {text!r} lists a GPU twice; each rank needs its own GPU")
    bad = [d for d in devs if d < 0 or d >= gpu_count]
    if bad:
        have = f"GPUs 0..{gpu_count - 1}" if gpu_count else "no GPU (use cpu:N)"
        raise ValueError(f"devices {text!r}: GPU {bad[0]} does not exist; this machine has {have}")
    return devs, len(devs)


def check_sampler(sampler_name: str, scheduler: str, denoise: float, cfg: float) -> None:
    if sampler_name not in IMPLEMENTED_SAMPLERS:
        raise ValueError(f"sampler {sampler_name!r} is not implemented yet; implemented: "
                         f"{', '.join(IMPLEMENTED_SAMPLERS)}")
    if scheduler not in IMPLEMENTED_SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} is not implemented yet; implemented: "
                         f"{', '.join(IMPLEMENTED_SCHEDULERS)}")
    if abs(denoise - 1.0) > 1e-6:
        raise ValueError(f"denoise {denoise} is not implemented yet (img2img); use denoise 1.0")
    if abs(cfg - 1.0) > 1e-6:
        raise ValueError(f"cfg {cfg}: Flux uses its distilled guidance (FluxGuidance node); set cfg to 1.0")


def conditioning_tensors(cond, model_cfg: dict, batch: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(text states [B, S, joint], pooled [B, P], guidance) from a Flux CONDITIONING."""
    if not isinstance(cond, list) or not cond:
        raise ValueError("positive conditioning is empty; connect a CLIPTextEncode (and FluxGuidance)")
    if len(cond) > 1:
        raise ValueError(f"positive conditioning has {len(cond)} entries (combined/area conditioning); "
                         "only a single conditioning is supported yet")
    txt, extra = cond[0][0], cond[0][1]
    joint, pooled_dim = model_cfg["joint_attention_dim"], model_cfg["pooled_projection_dim"]
    if txt.ndim != 3 or txt.shape[-1] != joint:
        raise ValueError(f"conditioning width {tuple(txt.shape)[-1]} does not fit this model, which expects "
                         f"{joint}: encode the prompt with the Flux text encoders (DualCLIPLoader type flux)")
    pooled = extra.get("pooled_output")
    if pooled is None or pooled.shape[-1] != pooled_dim:
        got = None if pooled is None else tuple(pooled.shape)
        raise ValueError(f"pooled output {got} does not fit this model, which expects width {pooled_dim}")
    return _batch(txt, batch, "conditioning"), _batch(pooled, batch, "pooled output"), float(extra.get("guidance", 3.5))


def _batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{what} has batch {t.shape[0]} but the latent has {batch}")


def check_latent(latent: dict, channels: int = 16) -> torch.Tensor:
    samples = latent["samples"]
    if samples.ndim != 4 or samples.shape[1] != channels:
        raise ValueError(f"latent of shape {tuple(samples.shape)}: Flux needs {channels} channels "
                         "(EmptySD3LatentImage); 4 channels is an SD1.5/SDXL latent")
    h, w = samples.shape[2:]
    if h % 2 or w % 2:
        raise ValueError(f"latent {h}x{w} (image {h * 8}x{w * 8}): the image size must be a multiple of 16")
    if "noise_mask" in latent:
        raise ValueError("latents with a noise mask (inpainting) are not supported yet")
    return samples
