"""Model sampling per family, as ComfyUI 0.3.75 sets it up for the stock KSampler.

ComfyUI pairs a sigma parameterisation (``ModelSamplingFlux``, ``ModelSamplingDiscreteFlow``,
``ModelSamplingDiscrete``) with a prediction type (``CONST`` for flow models, ``EPS``). The pairs used for the
families we run (comfy/supported_models.py, comfy/model_base.py):

    flux          Flux.1 dev: ModelSamplingFlux + CONST, shift 1.15 (the stock loader ignores the
                  resolution; the ModelSamplingFlux node sets shift from it, see ``flux_shift_for``)
    flux2         Flux.2 dev: ModelSamplingFlux + CONST, shift 2.02 (its sampling_settings)
    flux_schnell  Flux.1 schnell: ModelSamplingDiscreteFlow + CONST, shift 1.0, multiplier 1.0
    sd3           SD3 / SD3.5: ModelSamplingDiscreteFlow + CONST, shift 3.0, multiplier 1000
    zimage        Z-Image: ModelSamplingDiscreteFlow + CONST, shift 3.0, multiplier 1.0 (Qwen-Image uses "flux")
    pixart        PixArt-alpha / -sigma: ModelSamplingDiscrete + EPS, "sqrt_linear" betas 1e-4 .. 0.02
                  over 1000 steps (linear in beta)

The arithmetic follows ComfyUI's float32 order of operations, so tables and schedules come out bitwise equal.
"""
from __future__ import annotations

import math

import torch

MODEL_SAMPLINGS = ("flux", "flux2", "flux_schnell", "sd3", "pixart", "zimage")
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15
FLUX2_SHIFT = 2.02
FLUX_SHIFT_TOKENS = (256, 4096)


def flux_shift_for(height: int, width: int, base: float = FLUX_BASE_SHIFT, top: float = FLUX_MAX_SHIFT) -> float:
    """ComfyUI's ModelSamplingFlux node: linear in the image-token count, ``base`` at 256, ``top`` at 4096."""
    x1, x2 = FLUX_SHIFT_TOKENS
    slope = (top - base) / (x2 - x1)
    return (width * height / (8 * 8 * 2 * 2)) * slope + (base - slope * x1)


def _as_sigma(sigma) -> torch.Tensor:
    return sigma if torch.is_tensor(sigma) else torch.tensor(float(sigma), dtype=torch.float32)


def _shaped(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """A scalar stays a scalar; a per-sample [B] sigma broadcasts over the other dims."""
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


class ModelSampling:
    """Base: the sigma table and the prediction type's four conversions.

    ``flow`` is ComfyUI's ``isinstance(model_sampling, CONST)``: several samplers switch to other math on it.
    """

    flow = False
    sigma_data = 1.0
    sigmas: torch.Tensor  # [T] float32, increasing

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def percent_to_sigma(self, percent: float) -> float:
        raise NotImplementedError

    def calculate_input(self, sigma, x: torch.Tensor) -> torch.Tensor:
        """What the diffusion model sees at ``sigma`` given the sampler's ``x``."""
        if self.flow:
            return x
        s = _shaped(_as_sigma(sigma), x.ndim)
        return x / (s ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output: torch.Tensor, model_input: torch.Tensor) -> torch.Tensor:
        """The denoised prediction from the model's output (eps or velocity): input - output * sigma."""
        s = _shaped(_as_sigma(sigma), model_output.ndim)
        return model_input - model_output * s

    def noise_scaling(self, sigma, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """The sampler's starting point at ``sigma`` (and LCM's re-noising)."""
        s = _shaped(_as_sigma(sigma), noise.ndim)
        if self.flow:
            return s * noise + (1.0 - s) * latent_image
        noise = noise * torch.sqrt(1.0 + s ** 2.0) if max_denoise else noise * s
        return noise + latent_image

    def inverse_noise_scaling(self, sigma, latent: torch.Tensor) -> torch.Tensor:
        """Applied by ComfyUI's KSAMPLER to the sampler's result at the last sigma."""
        if not self.flow:
            return latent
        return latent / (1.0 - _shaped(_as_sigma(sigma), latent.ndim))

    def start(self, sigmas: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor) -> torch.Tensor:
        """The sampler's input for its first evaluation, as ComfyUI's KSAMPLER makes it: the scheduler's
        sigmas[0] (not a sampler's nudged first sigma), with max_denoise when it starts at the top."""
        return self.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(sigmas))

    def max_denoise(self, sigmas: torch.Tensor) -> bool:
        """ComfyUI's Sampler.max_denoise: the schedule starts at (or above) the model's largest sigma."""
        top, first = float(self.sigma_max), float(sigmas[0])
        return math.isclose(top, first, rel_tol=1e-05) or first > top


def _flux_time_shift(mu: float, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)


def _time_snr_shift(alpha: float, t):
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


class FluxSampling(ModelSampling):
    """ComfyUI's ModelSamplingFlux + CONST: sigma(t) = e^shift / (e^shift + 1/t - 1), 10000 entries, t = sigma."""

    flow = True

    def __init__(self, shift: float = FLUX_MAX_SHIFT, timesteps: int = 10000) -> None:
        self.shift = shift
        self.sigmas = self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps)

    def timestep(self, sigma):
        return sigma

    def sigma(self, timestep):
        return _flux_time_shift(self.shift, timestep)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return _flux_time_shift(self.shift, 1.0 - percent)


class DiscreteFlowSampling(ModelSampling):
    """ComfyUI's ModelSamplingDiscreteFlow + CONST (SD3, Flux schnell): a shifted linear flow, 1000 entries."""

    flow = True

    def __init__(self, shift: float = 1.0, multiplier: float = 1000, timesteps: int = 1000) -> None:
        self.shift, self.multiplier = shift, multiplier
        self.sigmas = self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier)

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return _time_snr_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return _time_snr_shift(self.shift, 1.0 - percent)


def _betas(schedule: str, n: int, start: float, end: float) -> torch.Tensor:
    """ComfyUI's make_beta_schedule for the two schedules our families use (float64, as there)."""
    if schedule == "linear":
        return torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    raise ValueError(f"beta schedule {schedule!r} is not implemented: choose linear or sqrt_linear")


class DiscreteEpsSampling(ModelSampling):
    """ComfyUI's ModelSamplingDiscrete + EPS: sigmas of a DDPM beta schedule; timesteps are table indices."""

    flow = False

    def __init__(self, beta_schedule: str = "linear", linear_start: float = 0.00085, linear_end: float = 0.012,
                 timesteps: int = 1000) -> None:
        alphas_cumprod = torch.cumprod(1.0 - _betas(beta_schedule, timesteps, linear_start, linear_end), dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # float64
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    def timestep(self, sigma):
        """The nearest table index in log sigma (an integer tensor, as ComfyUI gives the model)."""
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=(len(self.sigmas) - 1))
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


def model_sampling_for(kind: str, shift: float | None = None) -> ModelSampling:
    """The model sampling ComfyUI's stock loader gives ``kind`` (one of MODEL_SAMPLINGS).

    ``shift`` mirrors the ModelSamplingFlux node for the Flux kinds (it replaces the sampling with
    ModelSamplingFlux at that shift, schnell included) and the ModelSamplingSD3 node for sd3.
    """
    if kind == "flux":
        return FluxSampling(FLUX_MAX_SHIFT if shift is None else shift)
    if kind == "flux2":
        return FluxSampling(FLUX2_SHIFT if shift is None else shift)
    if kind == "flux_schnell":
        return DiscreteFlowSampling(1.0, multiplier=1.0) if shift is None else FluxSampling(shift)
    if kind == "sd3":
        return DiscreteFlowSampling(3.0 if shift is None else shift, multiplier=1000)
    if kind == "zimage":
        return DiscreteFlowSampling(3.0 if shift is None else shift, multiplier=1.0)
    if kind == "pixart":
        if shift is not None:
            raise ValueError("pixart samples on a discrete beta schedule: it takes no shift")
        return DiscreteEpsSampling("sqrt_linear", 0.0001, 0.02, 1000)
    raise ValueError(f"unknown model sampling {kind!r}: supported are {', '.join(MODEL_SAMPLINGS)}")
