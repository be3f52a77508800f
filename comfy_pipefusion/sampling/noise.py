"""Initial noise as ComfyUI's KSampler makes it: one CPU generator seeded once, over the whole batch."""
from __future__ import annotations

import torch


def comfy_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The noise ``comfy.sample.prepare_noise`` gives a latent of ``shape`` (float32, on the CPU)."""
    # A private generator gives the same stream as ComfyUI's torch.manual_seed(seed) without touching
    # the process-wide one.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")
