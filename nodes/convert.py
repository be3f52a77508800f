"""Translating ComfyUI's values into a job, with errors that name the problem and the fix.

No ComfyUI import here: these take ComfyUI's plain data (CONDITIONING lists, LATENT dicts, strings). What a
model family expects (text widths, latent channels, which encoders and nodes make them) comes from its
family module (comfy_pipefusion/models/family.py), not from a table here.
"""
from __future__ import annotations

import torch

from comfy_pipefusion.config import SAMPLERS, SCHEDULERS, check_seed
from comfy_pipefusion.models import family as families

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


def parse_stage_split(text: str, strategy: str) -> tuple[int, ...] | None:
    """'' (automatic) or blocks per stage like '10,9' -> (10, 9); PipeFusion only."""
    s = (text or "").strip().replace(" ", "")
    if not s:
        return None
    try:
        split = tuple(int(p) for p in s.split(","))
    except ValueError:
        raise ValueError(f"stage_split {text!r}: write blocks per stage like 10,9, or leave it empty") from None
    if "pipefusion" not in strategy.split("+"):
        raise ValueError(f"stage_split {text!r} applies to pipefusion only (strategy is {strategy}); "
                         "leave it empty")
    return split


def check_patches(patches: int, strategy: str) -> None:
    """``patches`` is PipeFusion's M: any other strategy decides its bands itself, so a value set there
    would be ignored without a word; it is refused, naming what the strategy does instead."""
    if patches and "pipefusion" not in strategy.split("+"):
        does = {"serial": "samples the whole image at once", "auto": "picks the patches per job",
                "cfg": "runs each branch of the guidance whole on its own rank"}.get(
            strategy, "splits the image into one band per rank")
        raise ValueError(f"patches {patches} applies to pipefusion only; {strategy} {does}. Set patches to 0, "
                         "or choose strategy pipefusion")


def place_auto(devices: tuple[int, ...], comfy_device: int | None, rank_bytes: list[int]) -> tuple[int, ...]:
    """``auto`` devices: the rank with the fewest bytes goes on ComfyUI's own GPU (which also holds the text
    encoders and the VAE); the others keep their order."""
    if comfy_device is None or comfy_device not in devices or len(devices) < 2:
        return devices
    light = min(range(len(devices)), key=lambda r: (rank_bytes[r], -r))
    others = [d for d in devices if d != comfy_device]
    return tuple(others[:light]) + (comfy_device,) + tuple(others[light:])


def check_sampler(sampler_name: str, scheduler: str, denoise: float, seed: int = 0) -> None:
    if sampler_name not in SAMPLERS:
        raise ValueError(f"sampler {sampler_name!r} is not implemented; implemented: "
                         f"{', '.join(SAMPLERS)}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} is not implemented; implemented: "
                         f"{', '.join(SCHEDULERS)}")
    check_seed(seed, sampler_name)
    if denoise <= 0.0:
        raise ValueError(f"denoise {denoise} samples nothing; use a value in (0, 1] (1 = from pure noise)")


def conditioning_tensors(cond, family: str, model_cfg: dict, batch: int,
                         which: str = "positive") -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(text states [B, S, width], pooled [B, P] or None, Flux guidance) from a CONDITIONING of ``family``."""
    fam = families.get(family)
    hint = fam.TEXT_ENCODERS
    if not isinstance(cond, list) or not cond:
        raise ValueError(f"{which} conditioning is empty; connect a CLIPTextEncode ({hint})")
    if len(cond) > 1:
        raise ValueError(f"{which} conditioning has {len(cond)} entries (combined/area conditioning); "
                         "only a single conditioning is supported yet")
    txt, extra = cond[0][0], cond[0][1]
    if extra.get("reference_latents") is not None and not getattr(fam, "REFERENCES", False):
        raise ValueError(f"{which} conditioning carries reference latents (an image-editing conditioning such as "
                         f"TextEncodeQwenImageEdit or ReferenceLatent), which a {family} model does not take; remove "
                         "the ReferenceLatent node, or load an editing model (Flux.1 Kontext, Qwen-Image-Edit)")
    mask = extra.get("attention_mask")
    if family == "zimage" and mask is not None and torch.numel(mask) != int(mask.sum()):
        raise ValueError(f"{which} conditioning carries an attention mask over padded text tokens, which "
                         "ComfyUI's Z-Image model applies and PipeFusion does not yet; encode the prompt without "
                         "padding (one prompt per conditioning)")
    width, pooled_dim = fam.conditioning_dims(model_cfg)
    if txt.ndim != 3 or txt.shape[-1] != width:
        raise ValueError(f"{which} conditioning width {tuple(txt.shape)[-1]} does not fit this {family} model, "
                         f"which expects {width}: encode the prompt with {hint}")
    pooled = None
    if pooled_dim:
        pooled = extra.get("pooled_output")
        if pooled is None or pooled.shape[-1] != pooled_dim:
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"{which} pooled output {got} does not fit this {family} model, which expects "
                             f"width {pooled_dim}: encode the prompt with {hint}")
        pooled = _batch(pooled, batch, f"{which} pooled output")
    # ComfyUI's Flux models default the guidance to 3.5, Chroma's to 0 (FluxGuidance sets it for both)
    guidance = float(extra.get("guidance", getattr(fam, "DEFAULT_GUIDANCE", 3.5)))
    return _batch(txt, batch, f"{which} conditioning"), pooled, guidance


def _frames(family: str) -> bool:
    return getattr(families.get(family), "LATENT_FRAMES", False)


def output_latent(samples: torch.Tensor, family: str, model_cfg: dict | None = None) -> torch.Tensor:
    """The sampled [B, C, h, w] as ComfyUI's KSampler returns it for ``family`` ([B, C, 1, h, w] for Wan latents,
    2x2 patches folded into the channels for Flux.2's)."""
    samples = latent_format(family, model_cfg).to_comfy(samples)
    return samples.unsqueeze(2) if _frames(family) else samples


def latent_format(family: str, model_cfg: dict | None = None):
    """The family's LatentFormat: ``from_comfy`` puts a tensor shaped like ComfyUI's LATENT (its noise, a prepared
    noise mask) in the engine's layout (Flux.2's 128 channels unfolded into 32 at twice the size)."""
    return families.get(family).latent_format(model_cfg or {})


def _batch(t: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{what} has batch {t.shape[0]} but the latent has {batch}")


def check_latent(latent: dict, family: str = "flux", model_cfg: dict | None = None) -> torch.Tensor:
    """The LATENT's samples as [B, C, h, w] in the engine's layout; a video-VAE family's one-frame [B, C, 1, h, w]
    (Qwen-Image's Wan latent, as ComfyUI's KSampler makes it) loses its frame axis, Flux.2's 2x2 patches leave
    its channels (``output_latent`` puts both back)."""
    samples = latent["samples"]
    if samples.ndim == 5 and _frames(family):
        if samples.shape[2] != 1:
            raise ValueError(f"latent of shape {tuple(samples.shape)} has {samples.shape[2]} frames; a "
                             f"{family} model makes one image (1 frame)")
        samples = samples[:, :, 0]
    fmt = families.get(family).latent_format(model_cfg or {})  # e.g. the built-in model's 12-channel latent
    channels, node = fmt.comfy_channels, fmt.empty_node
    if samples.ndim != 4 or samples.shape[1] != channels:
        got = tuple(samples.shape)
        raise ValueError(f"latent of shape {got}: a {family} model needs {channels} channels ({node}); "
                         f"{got[1] if len(got) > 1 else '?'} channels is a latent of another model family")
    samples = fmt.from_comfy(samples)  # Flux.2: [B, 128, H/16, W/16] -> [B, 32, H/8, W/8]
    h, w = samples.shape[2:]
    if h % 2 or w % 2:
        raise ValueError(f"latent {h}x{w} (image {h * 8}x{w * 8}): the image size must be a multiple of 16")
    return samples
