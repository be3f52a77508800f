"""Noise exactly as ComfyUI makes it: the initial noise of the KSampler node and the samplers' per-step noise.

Initial noise (comfy/sample.py ``prepare_noise``): one CPU generator seeded once over the whole batch; with a
latent ``batch_index`` each sample takes the draw of its index, so a batch split by "Latent From Batch"
gets the same noise as the whole batch.

Per-step noise (comfy/k_diffusion/sampling.py): ancestral samplers and LCM draw ``randn`` over the whole
unpacked latent from one generator seeded with the seed on the latent's device, once per call; the SDE
samplers ask a Brownian tree (torchsde, built on the CPU over the unpacked latent) for the increment
between two sigmas. Draws are made in ComfyUI's call order, over the full latent, then packed: every patch
slices the same cached tensor, so a patch's noise does not depend on how the image is cut.
"""
from __future__ import annotations

from typing import Callable

import torch

Pack = Callable[[torch.Tensor], torch.Tensor]


def comfy_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The noise ``comfy.sample.prepare_noise`` gives a latent of ``shape`` (float32, on the CPU)."""
    # A private generator gives the same stream as ComfyUI's torch.manual_seed(seed) without touching
    # the process-wide one.
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")


def initial_noise(shape: tuple[int, ...], seed: int, batch_index: list[int] | None = None) -> torch.Tensor:
    """``prepare_noise`` with the LATENT's optional ``batch_index``: sample j gets draw number batch_index[j].

    Draws are [1, C, h, w] each, made in order up to the largest index, as ComfyUI does.
    """
    if batch_index is None:
        return comfy_noise(shape, seed)
    if len(batch_index) != shape[0]:
        raise ValueError(f"batch_index has {len(batch_index)} entries for a batch of {shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    wanted = set(int(i) for i in batch_index)
    draws = {}
    for i in range(max(wanted) + 1):
        draw = torch.randn([1, *shape[1:]], dtype=torch.float32, generator=generator, device="cpu")
        if i in wanted:
            draws[i] = draw
    return torch.cat([draws[int(i)] for i in batch_index], dim=0)


class _Stream:
    """Draws in ComfyUI's call order; the latest draw is cached for the patches that slice it."""

    def __init__(self, pack: Pack | None) -> None:
        self._pack = pack
        self._index = -1
        self._value: torch.Tensor | None = None

    def __call__(self, index: int, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """The packed full-latent noise of call ``index`` (0, 1, 2, ... in order; repeats are cached)."""
        if index == self._index:
            return self._value
        if index != self._index + 1:
            raise RuntimeError(f"noise draw {index} asked after draw {self._index}: draws must come in order")
        raw = self._draw(sigma, sigma_next)
        self._index, self._value = index, (raw if self._pack is None else self._pack(raw))
        return self._value

    def _draw(self, sigma, sigma_next) -> torch.Tensor:
        raise NotImplementedError


class GaussianStream(_Stream):
    """k-diffusion's ``default_noise_sampler``: one randn over the latent per call, generator on its device."""

    def __init__(self, shape, seed: int, pack: Pack | None, device, dtype) -> None:
        super().__init__(pack)
        self.shape, self.device, self.dtype = tuple(shape), torch.device(device), dtype
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)

    def _draw(self, sigma, sigma_next):
        return torch.randn(self.shape, dtype=self.dtype, device=self.device, generator=self._generator)


class BrownianStream(_Stream):
    """k-diffusion's ``BrownianTreeNoiseSampler(cpu=True)``: W(sigma_next) - W(sigma), normalised.

    The tree spans [sigma_min, sigma_max] of the sampler's schedule (smallest non-zero, largest) and is
    seeded with the job's seed; torchsde is imported only when an SDE sampler runs.
    """

    def __init__(self, shape, seed: int, pack: Pack | None, device, dtype, sigma_min, sigma_max) -> None:
        super().__init__(pack)
        import torchsde

        self.device, self.dtype = torch.device(device), dtype
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        self._sign = 1
        if not t0 < t1:
            t0, t1, self._sign = t1, t0, -1
        w0 = torch.zeros(tuple(shape), dtype=dtype)
        self._tree = torchsde.BrownianTree(t0.detach().cpu(), w0, t1.detach().cpu(), entropy=seed)

    def _draw(self, sigma, sigma_next):
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        w = self._tree(lo.detach().cpu().float(), hi.detach().cpu().float())
        w = w.to(device=self.device, dtype=lo.dtype) * (self._sign * sign)
        return w / (b - a).abs().sqrt()


class SamplerNoise:
    """The per-step noise of one job: the unpacked latent ``shape``, the ``seed``, and how to pack it.

    A sampler asks for its stream once (``gaussian()`` or ``brownian(sigma_min, sigma_max)``) and calls it
    with ComfyUI's call index; ``device`` is where ComfyUI would hold the latent (the model's device: CUDA
    and CPU generators give different streams).
    """

    def __init__(self, shape: tuple[int, ...], seed: int, pack: Pack | None = None, device="cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.shape, self.seed, self.pack, self.device, self.dtype = tuple(shape), seed, pack, device, dtype

    def gaussian(self) -> GaussianStream:
        return GaussianStream(self.shape, self.seed, self.pack, self.device, self.dtype)

    def brownian(self, sigma_min, sigma_max) -> BrownianStream:
        return BrownianStream(self.shape, self.seed, self.pack, self.device, self.dtype, sigma_min, sigma_max)
