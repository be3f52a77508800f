"""Per-patch samplers with ComfyUI 0.3.75's names and math (comfy/k_diffusion/sampling.py, comfy/samplers.py).

See ``base`` for the contract (``evals``, ``step_of``, ``step``). This module holds the one-evaluation-per-step
samplers and the registry; two-stage samplers are in ``two_stage``, multistep ones in ``multistep``, UniPC
in ``unipc``. Parameters are KSampler's defaults (eta 1, s_noise 1, r 1/2, no churn), and each sampler
takes the branch ComfyUI takes for the model's prediction type (flow/CONST or eps).
"""
from __future__ import annotations

import torch

from .base import Sampler, ancestral_step, to_d  # noqa: F401  (Sampler is public here)
from .multistep import Dpmpp2M, Dpmpp2MSde
from .two_stage import Dpm2, DpmppSde, Heun
from .unipc import UniPC


class Euler(Sampler):
    """k-diffusion's Euler: d = (x - denoised) / sigma; x += d * (sigma_next - sigma)."""

    name = "euler"

    def _update(self, k, sl, x, denoised):
        s, nxt = self.sigmas[k], self.sigmas[k + 1]
        return x + to_d(x, s, denoised) * (nxt - s)


class Ddim(Euler):
    """ComfyUI's "ddim" is Euler (its only difference, random inpainting noise, needs a noise mask)."""

    name = "ddim"


def _draw_indices(steps: int, draws) -> list[int | None]:
    """The default noise sampler's call index of each step (None where ``draws(step)`` is false: ComfyUI
    makes no draw there, so later steps keep their place in the stream)."""
    out, n = [], 0
    for i in range(steps):
        d = draws(i)
        out.append(n if d else None)
        n += d
    return out


class EulerAncestral(Sampler):
    """euler_ancestral: for eps models Euler to sigma_down plus sigma_up of fresh noise; for flow models
    ComfyUI runs its RF variant (a step to sigma_down in the flow's interpolation, then re-noise)."""

    name = "euler_ancestral"
    needs_model_sampling = True
    needs_noise = True

    def __init__(self, sigmas, model_sampling=None, noise=None) -> None:
        super().__init__(sigmas, model_sampling, noise)
        self._stream = noise.gaussian()
        self._draws = _draw_indices(self.steps, lambda i: bool(self.sigmas[i + 1] != 0) if self.flow else
                                    bool(ancestral_step(self.sigmas[i], self.sigmas[i + 1])[0] != 0))

    def _update(self, k, sl, x, denoised):
        s, nxt, draw = self.sigmas[k], self.sigmas[k + 1], self._draws[k]
        if draw is None:
            return denoised
        noise = self._stream(draw, s, nxt)[:, sl]
        if not self.flow:
            down, up = ancestral_step(s, nxt)
            return x + to_d(x, s, denoised) * (down - s) + noise * 1.0 * up
        down = nxt * (1 + (nxt / s - 1) * 1.0)
        alpha_next, alpha_down = 1 - nxt, 1 - down
        renoise = (nxt ** 2 - down ** 2 * alpha_next ** 2 / alpha_down ** 2) ** 0.5
        ratio = down / s
        x = ratio * x + (1 - ratio) * denoised
        return (alpha_next / alpha_down) * x + noise * 1.0 * renoise


class Lcm(Sampler):
    """lcm: jump to the prediction, then re-noise it to sigma_next with the model's noise scaling."""

    name = "lcm"
    needs_model_sampling = True
    needs_noise = True

    def __init__(self, sigmas, model_sampling=None, noise=None) -> None:
        super().__init__(sigmas, model_sampling, noise)
        self._stream = noise.gaussian()
        self._draws = _draw_indices(self.steps, lambda i: bool(self.sigmas[i + 1] > 0))

    def _update(self, k, sl, x, denoised):
        nxt, draw = self.sigmas[k + 1], self._draws[k]
        if draw is None:
            return denoised
        return self.model_sampling.noise_scaling(nxt, self._stream(draw, self.sigmas[k], nxt)[:, sl], denoised)


SAMPLERS = {cls.name: cls for cls in (Euler, EulerAncestral, Heun, Dpm2, DpmppSde, Dpmpp2M, Dpmpp2MSde, Ddim,
                                      UniPC, Lcm)}


def sampler_class(sampler: str | type[Sampler]) -> type[Sampler]:
    """The class of ``sampler``: a name in SAMPLERS, or a Sampler subclass given as such (the tests' own
    samplers, which never enter SAMPLERS)."""
    if isinstance(sampler, type) and issubclass(sampler, Sampler):
        return sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not implemented: choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler]


def make_sampler(sampler: str | type[Sampler], sigmas: torch.Tensor, model_sampling=None, noise=None) -> Sampler:
    """The sampler over ``sigmas`` (use scheduler_sigmas(..., sampler=name) for KSampler's sigmas)."""
    return sampler_class(sampler)(sigmas, model_sampling, noise)


def load_samplers(path: str | None) -> dict | None:
    """{name: Sampler subclass} from the ``SAMPLERS`` of the Python file ``path`` (the tests' own samplers,
    e.g. tests/frozen_sampler.py, given to the worker or the bench by ``--test-samplers``); None without one."""
    if not path:
        return None
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pipefusion_test_samplers", path)
    if spec is None or not Path(path).is_file():
        raise FileNotFoundError(f"--test-samplers {path}: no such Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.SAMPLERS)
