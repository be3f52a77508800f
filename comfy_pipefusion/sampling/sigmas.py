"""Flux schedules in the shape the engine's first release used them, now thin wrappers over
``model_sampling`` and ``schedulers`` (which hold ComfyUI's math for every family)."""
from __future__ import annotations

import torch

from .model_sampling import FLUX_BASE_SHIFT, FLUX_MAX_SHIFT, FLUX_SHIFT_TOKENS, FluxSampling, flux_shift_for

__all__ = ["FLUX_BASE_SHIFT", "FLUX_MAX_SHIFT", "FLUX_SHIFT_TOKENS", "flux_shift_for", "flux_sigma_table",
           "simple_schedule", "flux_sigmas", "frozen_sigmas"]


def flux_sigma_table(shift: float, timesteps: int = 10000) -> torch.Tensor:
    """sigma(t) = e^mu / (e^mu + (1/t - 1)) at t = 1/N .. 1, as ComfyUI's ModelSamplingFlux tabulates it."""
    return FluxSampling(shift, timesteps).sigmas


def simple_schedule(table: torch.Tensor, steps: int) -> torch.Tensor:
    """ComfyUI's 'simple' scheduler on a sigma table: evenly spaced entries from the top, then 0."""
    stride = len(table) / steps
    return torch.FloatTensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def flux_sigmas(height: int, width: int, steps: int, shift: float | None = None) -> torch.Tensor:
    """[steps + 1] sigmas of Flux's simple schedule with the ModelSamplingFlux node's resolution shift."""
    mu = flux_shift_for(height, width) if shift is None else shift
    return simple_schedule(flux_sigma_table(mu), steps)


def frozen_sigmas(steps: int, sigma: float = 0.7) -> torch.Tensor:
    """A constant schedule for the frozen-trajectory test: every step sees the same model input."""
    return torch.full((steps + 1,), sigma, dtype=torch.float32)
