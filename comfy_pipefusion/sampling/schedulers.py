"""Sigma schedules as ComfyUI 0.3.75's KSampler computes them (comfy/samplers.py, k_diffusion/sampling.py).

Each scheduler reads the model sampling (its sigma table, sigma_min/max, timestep/sigma maps) and returns
float32 [steps + 1] ending at 0 (ComfyUI's own quirks kept: ``beta`` may return fewer entries when timesteps
repeat, ``linear_quadratic`` is scaled by sigma_max). ``scheduler_sigmas`` adds the KSampler's rules around
them: denoise < 1 computes int(steps / denoise) steps and keeps the last steps + 1 sigmas, and the samplers
in DISCARD_PENULTIMATE get one step more with the penultimate sigma dropped.
"""
from __future__ import annotations

import math

import torch

SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic")
DISCARD_PENULTIMATE = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def simple(ms, steps: int) -> torch.Tensor:
    """Evenly spaced entries from the top of the sigma table."""
    stride = len(ms.sigmas) / steps
    return torch.FloatTensor([float(ms.sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def ddim_uniform(ms, steps: int) -> torch.Tensor:
    """Every len/steps-th table entry from the second one up, reversed, then 0 (unless the table has it)."""
    sigs, x = [], 1
    if math.isclose(float(ms.sigmas[x]), 0, abs_tol=0.00001):
        steps += 1
    else:
        sigs = [0.0]
    stride = max(len(ms.sigmas) // steps, 1)
    while x < len(ms.sigmas):
        sigs.append(float(ms.sigmas[x]))
        x += stride
    return torch.FloatTensor(sigs[::-1])


def normal(ms, steps: int, sgm: bool = False) -> torch.Tensor:
    """Linear in the model's timestep between sigma_max and sigma_min; ``sgm``: drop the end point."""
    start, end = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    zero = True
    if sgm:
        ts = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=0.00001):
            steps, zero = steps + 1, False
        ts = torch.linspace(start, end, steps)
    sigs = [float(ms.sigma(t)) for t in ts]
    return torch.FloatTensor(sigs + [0.0] if zero else sigs)


def sgm_uniform(ms, steps: int) -> torch.Tensor:
    return normal(ms, steps, sgm=True)


def karras(ms, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): linear in sigma^(1/rho)."""
    lo, hi = float(ms.sigma_min), float(ms.sigma_max)
    ramp = torch.linspace(0, 1, steps)
    lo_r, hi_r = lo ** (1 / rho), hi ** (1 / rho)
    return _append_zero((hi_r + ramp * (lo_r - hi_r)) ** rho)


def exponential(ms, steps: int) -> torch.Tensor:
    """Linear in log sigma."""
    lo, hi = float(ms.sigma_min), float(ms.sigma_max)
    return _append_zero(torch.linspace(math.log(hi), math.log(lo), steps).exp())


def beta(ms, steps: int, alpha: float = 0.6, b: float = 0.6) -> torch.Tensor:
    """Table entries at the Beta(alpha, b) quantiles (arXiv 2407.12173); repeated indices are dropped."""
    import numpy
    import scipy.stats  # imported here: only this scheduler needs scipy

    total = len(ms.sigmas) - 1
    ts = numpy.rint(scipy.stats.beta.ppf(1 - numpy.linspace(0, 1, steps, endpoint=False), alpha, b) * total)
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(float(ms.sigmas[int(t)]))
        last = t
    return torch.FloatTensor(sigs + [0.0])


def linear_quadratic(ms, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
    """Mochi's schedule: linear for the first half of the steps, then quadratic, times sigma_max."""
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        lin = steps // 2
        head = [i * threshold_noise / lin for i in range(lin)]
        step_diff = lin - threshold_noise * steps
        quad = steps - lin
        q_coef = step_diff / (lin * quad ** 2)
        l_coef = threshold_noise / lin - 2 * step_diff / (quad ** 2)
        const = q_coef * (lin ** 2)
        tail = [q_coef * (i ** 2) + l_coef * i + const for i in range(lin, steps)]
        sched = [1.0 - v for v in head + tail + [1.0]]
    return torch.FloatTensor(sched) * ms.sigma_max.cpu()


_HANDLERS = {"simple": simple, "sgm_uniform": sgm_uniform, "karras": karras, "exponential": exponential,
             "ddim_uniform": ddim_uniform, "beta": beta, "normal": normal, "linear_quadratic": linear_quadratic}


def calculate_sigmas(model_sampling, name: str, steps: int) -> torch.Tensor:
    """The named scheduler alone (ComfyUI's ``calculate_sigmas``)."""
    if name not in _HANDLERS:
        raise ValueError(f"scheduler {name!r} is not implemented: choose one of {', '.join(SCHEDULERS)}")
    return _HANDLERS[name](model_sampling, steps)


def scheduler_sigmas(model_sampling, name: str, steps: int, denoise: float = 1.0,
                     sampler: str | None = None) -> torch.Tensor:
    """float32 [steps + 1]: the sigmas ComfyUI's KSampler samples with (``sampler`` for its discard rule)."""
    if name not in _HANDLERS:
        raise ValueError(f"scheduler {name!r} is not implemented: choose one of {', '.join(SCHEDULERS)}")

    def schedule(n: int) -> torch.Tensor:
        if sampler in DISCARD_PENULTIMATE:
            sig = calculate_sigmas(model_sampling, name, n + 1)
            return torch.cat([sig[:-2], sig[-1:]])
        return calculate_sigmas(model_sampling, name, n)

    if denoise is None or denoise > 0.9999:
        return schedule(steps)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    return schedule(int(steps / denoise))[-(steps + 1):]
