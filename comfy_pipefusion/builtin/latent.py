"""The built-in model's latent format: pixels folded into channels, so no VAE is needed.

A 128 x 128 RGB picture in [0, 1] becomes a LATENT of 12 channels x 64 x 64: each 2 x 2 block of pixels is
folded into 12 channels (channel = colour * 4 + dy * 2 + dx), and values are mapped to [-1, 1]. The engine
packs 2 x 2 latent pixels into one token (48 values, i.e. 4 x 4 pixels), so the picture is 32 x 32 = 1024
image tokens. The engine counts sizes in its Flux convention (latent = size / 8), so the model's native
size is "512 x 512" for the engine and ComfyUI, and the decoded picture is 128 x 128 (a quarter of that).
LATENT = sampling space (scale 1, shift 0): what the sampler produces is the folded picture itself.
"""
from __future__ import annotations

import torch

CHANNELS = 12
FOLD = 2  # pixels per latent pixel, per side
ENGINE_SIZE = 512  # height and width to give the engine (and ComfyUI) for the native 128-pixel picture


def encode(img: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> LATENT [B, 12, H/2, W/2] in [-1, 1]."""
    b, c, h, w = img.shape
    if c != 3 or h % FOLD or w % FOLD:
        raise ValueError(f"encode takes [B, 3, H, W] with even H and W, got {tuple(img.shape)}")
    x = (img * 2 - 1).view(b, 3, h // FOLD, FOLD, w // FOLD, FOLD).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 3 * FOLD * FOLD, h // FOLD, w // FOLD)


def decode(latent: torch.Tensor) -> torch.Tensor:
    """LATENT [B, 12, h, w] -> picture [B, 3, 2h, 2w] in [0, 1] (clamped)."""
    b, c, h, w = latent.shape
    if c != CHANNELS:
        raise ValueError(f"the built-in model's LATENT has {CHANNELS} channels, got {c} (shape "
                         f"{tuple(latent.shape)}); decode only this model's latents")
    x = latent.float().view(b, 3, FOLD, FOLD, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, 3, h * FOLD, w * FOLD)
    return ((x + 1) / 2).clamp(0, 1)
