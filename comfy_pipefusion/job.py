"""One sampling job's inputs, identical on every rank: schedule, initial latent, conditioning, positions.

The sampler works in the model's sampling space on packed tokens ([B, S_img, 64] for Flux). Latents
enter and leave in ComfyUI's LATENT convention (``process_in``/``process_out`` apply Flux's scale and
shift), so what a job returns is what ComfyUI's KSampler would return.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SampleSpec
from .models import family
from .models.family import LatentFormat, pack_latent, unpack_latent
from .sampling.noise import comfy_noise
from .sampling.sigmas import flux_sigmas, frozen_sigmas


@dataclass(frozen=True)
class Problem:
    """Everything a rank needs to sample one job (CPU tensors; ranks move them to their device)."""

    spec: SampleSpec
    sigmas: torch.Tensor  # [steps + 1] float32
    x0: torch.Tensor  # [B, S_img, 64] float32, noised, sampling space
    txt: torch.Tensor  # [B, S_txt, joint_dim] text-encoder states
    pooled: torch.Tensor | None  # [B, pooled_dim]; None for families without a pooled vector
    guidance: torch.Tensor | None  # [B], None for models without a guidance embedding
    rows: int  # image token rows
    cols: int  # image token columns
    family: str = "flux"
    latent: LatentFormat = LatentFormat(16, 0.3611, 0.1159)

    @property
    def joint_text(self) -> bool:
        return family.get(self.family).JOINT_TEXT

    @property
    def n_span_txt(self) -> int:
        """Text tokens inside the attention sequence: all of them for joint-text families, else none."""
        return self.n_txt if self.joint_text else 0

    @property
    def n_txt(self) -> int:
        return self.txt.shape[1]

    @property
    def n_img(self) -> int:
        return self.rows * self.cols

    @property
    def batch(self) -> int:
        return self.x0.shape[0]

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Packed sampling-space tokens -> ComfyUI LATENT samples [B, C, h, w]."""
        return self.latent.process_out(unpack_latent(x.float().cpu(), self.rows * 2, self.cols * 2))


def make_problem(spec: SampleSpec, txt: torch.Tensor, pooled: torch.Tensor,
                 latent: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 fam: str = "flux", fmt: LatentFormat | None = None) -> Problem:
    """Build a job from conditioning, an optional input LATENT (zeros: text to image) and optional noise
    (default: ComfyUI's noise for ``spec.seed``), for a model of family ``fam`` with latent format ``fmt``."""
    fmt = fmt or family.get(fam).LATENT
    h, w = spec.height // 8, spec.width // 8
    shape = (spec.batch, fmt.channels, h, w)
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
    x0 = pack_latent(s0 * noise + (1.0 - s0) * fmt.process_in(latent.float()))
    guidance = torch.full((spec.batch,), float(spec.guidance))
    return Problem(spec, sigmas, x0, txt, pooled, guidance, spec.height // 16, spec.width // 16, fam, fmt)


def synthetic_conditioning(config: dict, n_txt: int, batch: int, seed: int,
                           fam: str = "flux") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text-encoder-like inputs of the right shapes for built-in models (no text encoder needed)."""
    width, pooled_width = family.get(fam).conditioning_dims(config)
    g = torch.Generator().manual_seed(seed + 7919)
    txt = torch.randn(batch, n_txt, width, generator=g)
    pooled = torch.randn(batch, pooled_width, generator=g) if pooled_width else None
    return txt, pooled


def synthetic_problem(fam, config: dict, spec: SampleSpec, n_txt: int) -> Problem:
    """A job with text-encoder-like conditioning of the right shapes for ``config`` (benchmarks, tests)."""
    txt, pooled = synthetic_conditioning(config, n_txt, spec.batch, spec.seed, fam.NAME)
    return make_problem(spec, txt, pooled, fam=fam.NAME, fmt=fam.latent_format(config))


def preset_problem(preset: str, spec: SampleSpec) -> Problem:
    fam, p = family.find_preset(preset)
    return synthetic_problem(fam, p["config"], spec, p["text_tokens"])
