"""Per-patch sampler steps.

A sampler advances the latent of one patch (a slice of image tokens) from step ``t`` to ``t + 1`` given the
model's denoised prediction for that patch. State that a multistep sampler keeps is held in full-latent
buffers and sliced per patch, so patches of different sizes at different steps (warm-up steps use one
patch, later steps M bands) stay consistent and the result does not depend on M.
"""
from __future__ import annotations

import torch


class Sampler:
    """Base: ``sigmas`` [steps + 1]; ``step`` returns the patch's new latent."""

    name = "base"

    def __init__(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas
        self.steps = len(sigmas) - 1

    def step(self, t: int, sl: slice, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Euler(Sampler):
    """k-diffusion's Euler: d = (x - denoised) / sigma; x += d * (sigma_next - sigma)."""

    name = "euler"

    def step(self, t, sl, x, denoised):
        sigma, nxt = float(self.sigmas[t]), float(self.sigmas[t + 1])
        return x + (x - denoised) / sigma * (nxt - sigma)


class Frozen(Sampler):
    """Test sampler: identity until the last step, which returns the prediction.

    With a constant sigma schedule every step sees the same input, so one step's K/V equal the next
    step's and stale activations equal fresh ones: every strategy must then equal serial exactly.
    """

    name = "frozen"

    def step(self, t, sl, x, denoised):
        return denoised.clone() if t == self.steps - 1 else x


SAMPLERS = {cls.name: cls for cls in (Euler, Frozen)}


def make_sampler(name: str, sigmas: torch.Tensor) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not implemented: choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](sigmas)


def flow_denoised(x: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """Flow-matching (ComfyUI's CONST) prediction: denoised = x - sigma * v."""
    return x - velocity * sigma
