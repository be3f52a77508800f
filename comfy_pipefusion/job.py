"""One sampling job's inputs, identical on every rank: schedule, initial latent, conditioning, positions.

The sampler works in the model's sampling space on packed tokens ([B, S_img, 64] for Flux). Latents
enter and leave in ComfyUI's LATENT convention (``process_in``/``process_out`` apply Flux's scale and
shift), so what a job returns is what ComfyUI's KSampler would return.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SampleSpec
from .models import flux
from .sampling.noise import comfy_noise
from .sampling.sigmas import flux_sigmas, frozen_sigmas


def process_in(latent: torch.Tensor) -> torch.Tensor:
    return (latent - flux.LATENT_SHIFT) * flux.LATENT_SCALE


def process_out(latent: torch.Tensor) -> torch.Tensor:
    return latent / flux.LATENT_SCALE + flux.LATENT_SHIFT


@dataclass(frozen=True)
class Problem:
    """Everything a rank needs to sample one job (CPU tensors; ranks move them to their device)."""

    spec: SampleSpec
    sigmas: torch.Tensor  # [steps + 1] float32
    x0: torch.Tensor  # [B, S_img, 64] float32, noised, sampling space
    txt: torch.Tensor  # [B, S_txt, joint_dim] text-encoder states
    pooled: torch.Tensor  # [B, pooled_dim]
    guidance: torch.Tensor | None  # [B], None for models without a guidance embedding
    rows: int  # image token rows
    cols: int  # image token columns

    @property
    def n_txt(self) -> int:
        return self.txt.shape[1]

    @property
    def n_img(self) -> int:
        return self.rows * self.cols

    @property
    def batch(self) -> int:
        return self.x0.shape[0]

    @property
    def txt_ids(self) -> torch.Tensor:
        return torch.zeros(self.n_txt, 3)

    @property
    def img_ids(self) -> torch.Tensor:
        return flux.image_ids(self.rows, self.cols)

    def band(self, r0: int, r1: int) -> "BandProblem":
        """The rows [r0, r1) alone, keeping their positions (naive patch baseline)."""
        return BandProblem(self, r0, r1)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Packed sampling-space tokens -> ComfyUI LATENT samples [B, 16, h, w]."""
        return process_out(flux.unpack_latent(x.float().cpu(), self.rows * 2, self.cols * 2))


class BandProblem:
    """A view of a Problem restricted to a band of token rows, with the band's true RoPE positions."""

    def __init__(self, full: Problem, r0: int, r1: int) -> None:
        self.full, self.r0, self.r1 = full, r0, r1
        i0, i1 = r0 * full.cols, r1 * full.cols
        self.spec, self.sigmas, self.txt, self.pooled, self.guidance = \
            full.spec, full.sigmas, full.txt, full.pooled, full.guidance
        self.x0 = full.x0[:, i0:i1]
        self.rows, self.cols = r1 - r0, full.cols
        self.n_txt, self.n_img, self.batch = full.n_txt, self.rows * self.cols, full.batch
        self.txt_ids = full.txt_ids
        self.img_ids = full.img_ids[i0:i1]


def make_problem(spec: SampleSpec, txt: torch.Tensor, pooled: torch.Tensor,
                 latent: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Problem:
    """Build a job from conditioning, an optional input LATENT (zeros: text to image) and optional noise
    (default: ComfyUI's noise for ``spec.seed``)."""
    h, w = spec.height // 8, spec.width // 8
    shape = (spec.batch, flux.LATENT_CHANNELS, h, w)
    if latent is None:
        latent = torch.zeros(shape)
    if tuple(latent.shape) != shape:
        raise ValueError(f"latent shape {tuple(latent.shape)} does not match {shape} for "
                         f"{spec.width}x{spec.height} with batch {spec.batch}")
    if spec.sampler == "frozen":
        sigmas = frozen_sigmas(spec.steps)
    else:
        sigmas = flux_sigmas(spec.height, spec.width, spec.steps, spec.shift)
    if noise is None:
        noise = comfy_noise(shape, spec.seed)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match the latent's {shape}")
    s0 = float(sigmas[0])
    x0 = flux.pack_latent(s0 * noise + (1.0 - s0) * process_in(latent.float()))
    guidance = torch.full((spec.batch,), float(spec.guidance))
    return Problem(spec, sigmas, x0, txt, pooled, guidance, spec.height // 16, spec.width // 16)


def synthetic_conditioning(config: dict, n_txt: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder-like inputs of the right shapes for built-in models (no text encoder needed)."""
    g = torch.Generator().manual_seed(seed + 7919)
    txt = torch.randn(batch, n_txt, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, config["pooled_projection_dim"], generator=g)
    return txt, pooled


def preset_problem(preset: str, spec: SampleSpec) -> Problem:
    p = flux.PRESETS[preset]
    txt, pooled = synthetic_conditioning(p["config"], p["text_tokens"], spec.batch, spec.seed)
    return make_problem(spec, txt, pooled)
