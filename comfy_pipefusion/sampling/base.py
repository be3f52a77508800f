"""What every per-patch sampler shares: the evaluation plan, full-latent state buffers, ComfyUI's scalars.

A sampler turns ComfyUI's sampling loop inside out. The loop calls the model K times; we number those
evaluations k = 0 .. K-1 and know before sampling which sigma each one is at (``evals``) and which sampling
step it belongs to (``step_of``). The engine evaluates the model patch by patch and hands each patch's
denoised prediction to ``step(k, sl, x, denoised)``, which returns that patch's input for evaluation k + 1
(after the last evaluation: the final latent, ComfyUI's inverse noise scaling applied).

State (history, a first stage's derivative, the step's start) lives in full-latent buffers that patches
read and write by token range, and noise is one full-latent draw sliced per patch; every operation on
latent-sized tensors is elementwise, so the result is bitwise independent of how evaluations are cut into
patches. Per-step scalars are 0-d float32 tensors computed in ComfyUI's order of operations, which keeps
us within float32 rounding of ComfyUI's own samplers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Eval:
    """One model evaluation: the sampling ``step`` it belongs to, its ``sigma`` and ``stage`` in the step."""

    step: int
    sigma: torch.Tensor  # 0-d float32
    stage: int = 0


class TokenBuffer:
    """A full-latent [B, S, C] tensor read and written by token ranges.

    The sampler is never told S: the buffer is allocated by the first write and grows while the first
    evaluation's patches (which arrive in increasing order) extend it; afterwards its shape is fixed.
    """

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None

    @staticmethod
    def bounds(sl: slice, n: int) -> tuple[int, int]:
        start = sl.start or 0
        return start, start + n

    def write(self, sl: slice, value: torch.Tensor) -> None:
        i0, i1 = self.bounds(sl, value.shape[1])
        if self.data is None or self.data.shape[1] < i1:
            grown = value.new_zeros((value.shape[0], i1, *value.shape[2:]))
            if self.data is not None:
                grown[:, : self.data.shape[1]] = self.data
            self.data = grown
        self.data[:, i0:i1] = value

    def read(self, sl: slice, n: int) -> torch.Tensor:
        i0, i1 = self.bounds(sl, n)
        return self.data[:, i0:i1]


def f32(value) -> torch.Tensor:
    """A 0-d float32 tensor: ComfyUI's sigmas[i] and the scalars derived from them."""
    return torch.as_tensor(value, dtype=torch.float32)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ODE derivative (x - denoised) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """(sigma_down, sigma_up) of an ancestral step: step down to sigma_down, add sigma_up of fresh noise."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def half_log_snr(sigma: torch.Tensor, flow: bool) -> torch.Tensor:
    """lambda = log(alpha / sigma): -logit(sigma) for flow models, -log(sigma) otherwise."""
    return sigma.logit().neg() if flow else sigma.log().neg()


def sigma_of_half_log_snr(lam: torch.Tensor, flow: bool) -> torch.Tensor:
    return lam.neg().sigmoid() if flow else lam.neg().exp()


def sde_schedule(sigmas, model_sampling):
    """(sigmas the SDE samplers step through, the Brownian tree's (min, max) span or None), as ComfyUI sets
    them up: the tree spans the positive sigmas; for flow models a first sigma of 1 is nudged to
    ``percent_to_sigma(1e-4)``."""
    sig = f32(sigmas)
    positive = sig[sig > 0]
    span = (positive.min(), sig.max()) if len(positive) else None
    if getattr(model_sampling, "flow", False) and len(sig) > 1 and sig[0] >= 1:
        sig = sig.clone()
        sig[0] = model_sampling.percent_to_sigma(1e-4)
    return sig, span


class Sampler:
    """Base: ``sigmas`` [steps + 1]; subclasses give ``_plan`` (the evaluations) and ``_update``.

    ``model_sampling`` is needed by samplers whose math depends on the prediction type (and for the final
    inverse noise scaling); ``noise`` (a SamplerNoise) by those that add noise.
    """

    name = "base"
    inverse_scaling = True  # apply ComfyUI's inverse noise scaling to the final latent
    needs_model_sampling = False
    needs_noise = False

    def __init__(self, sigmas: torch.Tensor, model_sampling=None, noise=None) -> None:
        if self.needs_model_sampling and model_sampling is None:
            raise ValueError(f"sampler {self.name!r} needs the model sampling (its math depends on it)")
        if self.needs_noise and noise is None:
            raise ValueError(f"sampler {self.name!r} adds noise: pass noise=SamplerNoise(...)")
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float32).detach().cpu().clone()
        self.steps = len(self.sigmas) - 1
        self.model_sampling, self.noise = model_sampling, noise
        self.flow = bool(getattr(model_sampling, "flow", False))
        self.plan: list[Eval] = self._plan()
        self.evals: list[float] = [float(e.sigma) for e in self.plan]
        self.final_sigma = self.sigmas[-1] if self.steps >= 0 else f32(0.0)

    @classmethod
    def schedule(cls, steps: int) -> torch.Tensor | None:
        """Sigmas [steps + 1] this sampler needs whatever the scheduler (None, the default: the scheduler's)."""
        return None

    def _plan(self) -> list[Eval]:
        """Default: one evaluation per step at sigmas[i]."""
        return [Eval(i, self.sigmas[i]) for i in range(self.steps)]

    def step_of(self, k: int) -> int:
        """The sampling step evaluation ``k`` belongs to (for progress)."""
        return self.plan[k].step

    def step(self, k: int, sl: slice, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        out = self._update(k, sl, x, denoised)
        if k == len(self.plan) - 1 and self.model_sampling is not None and self.inverse_scaling:
            out = self.model_sampling.inverse_noise_scaling(self.final_sigma, out)
        return out

    def _update(self, k: int, sl: slice, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
