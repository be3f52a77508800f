"""Sigma schedules as ComfyUI computes them (float32, the same table lookups)."""
from __future__ import annotations

import math

import torch

FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15
FLUX_SHIFT_TOKENS = (256, 4096)


def flux_shift_for(height: int, width: int, base: float = FLUX_BASE_SHIFT, top: float = FLUX_MAX_SHIFT) -> float:
    """ComfyUI's ModelSamplingFlux: linear in the image-token count, ``base`` at 256 and ``top`` at 4096."""
    x1, x2 = FLUX_SHIFT_TOKENS
    slope = (top - base) / (x2 - x1)
    return (width * height / (8 * 8 * 2 * 2)) * slope + (base - slope * x1)


def flux_sigma_table(shift: float, timesteps: int = 10000) -> torch.Tensor:
    """sigma(t) = e^mu / (e^mu + (1/t - 1)) at t = 1/N .. 1, as ComfyUI's flow model sampling tabulates it."""
    t = torch.arange(1, timesteps + 1, 1) / timesteps
    return math.exp(shift) / (math.exp(shift) + (1 / t - 1) ** 1.0)


def simple_schedule(table: torch.Tensor, steps: int) -> torch.Tensor:
    """ComfyUI's 'simple' scheduler: evenly spaced entries from the top of the table, then 0."""
    stride = len(table) / steps
    sigs = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.FloatTensor(sigs + [0.0])


def flux_sigmas(height: int, width: int, steps: int, shift: float | None = None) -> torch.Tensor:
    """[steps + 1] sigmas of Flux's simple schedule at this resolution."""
    mu = flux_shift_for(height, width) if shift is None else shift
    return simple_schedule(flux_sigma_table(mu), steps)


def frozen_sigmas(steps: int, sigma: float = 0.7) -> torch.Tensor:
    """A constant schedule for the frozen-trajectory test: every step sees the same model input."""
    return torch.full((steps + 1,), sigma, dtype=torch.float32)
