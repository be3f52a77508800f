from __future__ import annotations

import math

import torch

from comfy_pipefusion.config import SampleSpec
from comfy_pipefusion.job import make_problem
from comfy_pipefusion.models.flux import LATENT
from comfy_pipefusion.sampling.noise import comfy_noise
from comfy_pipefusion.sampling.samplers import Euler
from frozen_sampler import Frozen
from comfy_pipefusion.sampling.model_sampling import FluxSampling, flux_shift_for
from comfy_pipefusion.sampling.schedulers import scheduler_sigmas, simple


def test_flux_shift_is_linear_in_tokens():
    assert math.isclose(flux_shift_for(256, 256), 0.5)  # 256 tokens
    assert math.isclose(flux_shift_for(1024, 1024), 1.15)  # 4096 tokens
    assert math.isclose(flux_shift_for(512, 1024), 0.5 + (2048 - 256) * 0.65 / 3840)


def test_flux_sigma_table_and_simple_schedule():
    ms = FluxSampling(1.15)
    table = ms.sigmas
    assert len(table) == 10000 and float(table[-1]) == 1.0
    t = 0.5
    assert math.isclose(float(table[4999]), math.exp(1.15) / (math.exp(1.15) + (1 / t - 1)), rel_tol=1e-6)
    sig = simple(ms, 4)
    assert sig.tolist()[-1] == 0.0 and len(sig) == 5
    assert torch.equal(sig[:4], torch.stack([table[-1], table[-2501], table[-5001], table[-7501]]))
    assert torch.all(sig[:-1] > sig[1:])
    assert torch.equal(scheduler_sigmas(FluxSampling(flux_shift_for(1024, 1024)), "simple", 4), sig)


def test_noise_is_comfyui_stream():
    g = torch.manual_seed(42)
    want = torch.randn((2, 16, 4, 4), generator=g)
    assert torch.equal(comfy_noise((2, 16, 4, 4), 42), want)


def test_latent_in_out_roundtrip_and_initial_noise():
    lat = torch.randn(1, 16, 4, 4)
    assert torch.allclose(LATENT.process_out(LATENT.process_in(lat)), lat, atol=1e-6)
    spec = SampleSpec(height=32, width=32, steps=2, seed=3)
    p = make_problem(spec, torch.zeros(1, 2, 8), torch.zeros(1, 8))
    assert p.x0.shape == (1, 4, 64)
    assert float(p.sigmas[0]) == 1.0  # txt2img starts from pure noise at sigma 1
    assert torch.allclose(p.finish(p.x0), LATENT.process_out(comfy_noise((1, 16, 4, 4), 3)))


def test_euler_and_frozen_steps():
    sig = torch.tensor([1.0, 0.5, 0.0])
    x, den = torch.ones(1, 2, 64), torch.zeros(1, 2, 64)
    assert torch.allclose(Euler(sig).step(0, slice(None), x, den), torch.full_like(x, 0.5))
    assert torch.equal(Euler(sig).step(1, slice(None), x, den), den)  # sigma_next 0: the prediction
    f = Frozen(sig)
    assert f.step(0, slice(None), x, den) is x and torch.equal(f.step(1, slice(None), x, den), den)


# --- ComfyUI's samplers as per-patch steps (issue 5); equality with ComfyUI is in test_sampling_comfy.py ---

import pytest  # noqa: E402

from comfy_pipefusion.models.family import pack_latent, unpack_latent  # noqa: E402
from comfy_pipefusion.sampling.model_sampling import MODEL_SAMPLINGS, model_sampling_for  # noqa: E402
from comfy_pipefusion.sampling.noise import SamplerNoise, initial_noise  # noqa: E402
from comfy_pipefusion.sampling.samplers import SAMPLERS, make_sampler  # noqa: E402
from comfy_pipefusion.sampling.schedulers import SCHEDULERS, scheduler_sigmas  # noqa: E402

H, W, TOKENS = 6, 8, 12  # a 6x8 latent: 3x4 tokens


def toy_denoise(ms, x, sigma, family):
    """A nonlinear denoiser that mixes tokens, through the family's input/output conversions."""
    xc = ms.calculate_input(sigma, x)
    tn = ms.timestep(sigma).float().view(-1, 1, 1, 1) / (1.0 if family.startswith("flux") else 1000.0)
    out = torch.tanh(0.7 * xc + 0.2 * tn) + 0.3 * xc.mean(dim=(2, 3), keepdim=True)
    return ms.calculate_denoised(sigma, out, x)


def sample_patched(family, name, scheduler, patchings, steps=5, seed=11):
    """Our sampler over packed tokens, evaluation k cut into patchings[k % len(patchings)]."""
    ms = model_sampling_for(family)
    c = 4 if family == "pixart" else 16
    sigmas = scheduler_sigmas(ms, scheduler, steps, sampler=name)
    sampler = make_sampler(name, sigmas, ms, SamplerNoise((2, c, H, W), seed, pack_latent))
    x = pack_latent(ms.start(sigmas, initial_noise((2, c, H, W), seed), torch.zeros(2, c, H, W)))
    for k, sigma in enumerate(sampler.evals):
        den = pack_latent(toy_denoise(ms, unpack_latent(x, H, W), torch.full((2,), sigma), family))
        bands = patchings[k % len(patchings)]
        x = torch.cat([sampler.step(k, slice(a, b), x[:, a:b], den[:, a:b]) for a, b in bands], dim=1)
    return x


@pytest.mark.parametrize("family", MODEL_SAMPLINGS)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_patching_does_not_change_the_result(family, name):
    whole = sample_patched(family, name, "karras", [[(0, TOKENS)]])
    bands = sample_patched(family, name, "karras", [[(0, 4), (4, 8), (8, 12)]])
    changing = sample_patched(family, name, "karras", [[(0, 5), (5, 12)], [(0, TOKENS)], [(0, 1), (1, 2), (2, 12)]])
    assert torch.isfinite(whole).all() and whole.abs().max() > 0
    assert torch.equal(bands, whole) and torch.equal(changing, whole)


def test_evaluation_plans():
    ms = model_sampling_for("flux")
    sig = scheduler_sigmas(ms, "simple", 4)
    heun = make_sampler("heun", sig, ms)
    assert len(heun.evals) == 7 and [heun.step_of(k) for k in range(7)] == [0, 0, 1, 1, 2, 2, 3]
    assert heun.evals[:2] == [float(sig[0]), float(sig[1])]  # the second stage evaluates at sigma_next
    dpm2 = make_sampler("dpm_2", sig, ms)
    assert sig[1] < dpm2.evals[1] < sig[0]  # log-midpoint
    noise = SamplerNoise((1, 16, H, W), 0, pack_latent)
    sde = make_sampler("dpmpp_2m_sde", sig, ms, noise)
    assert sde.evals[0] == float(torch.tensor(ms.percent_to_sigma(1e-4))) < 1.0 == float(sig[0])  # flow: nudged
    assert make_sampler("euler", sig).evals == [float(s) for s in sig[:-1]]
    assert make_sampler("uni_pc", scheduler_sigmas(ms, "simple", 4, sampler="uni_pc"), ms).evals == \
        [float(s) for s in scheduler_sigmas(ms, "simple", 4, sampler="uni_pc")[:-1]]


def test_denoise_keeps_the_tail_of_a_longer_schedule():
    ms = model_sampling_for("sd3")
    full = scheduler_sigmas(ms, "karras", int(10 / 0.6))
    assert torch.equal(scheduler_sigmas(ms, "karras", 10, denoise=0.6), full[-11:])
    assert len(scheduler_sigmas(ms, "simple", 10, denoise=0.0)) == 0
    plain, dropped = scheduler_sigmas(ms, "simple", 4), scheduler_sigmas(ms, "simple", 4, sampler="dpm_2")
    assert len(plain) == len(dropped) == 5 and dropped[-1] == 0 and not torch.equal(plain, dropped)


def test_model_sampling_kinds():
    flux, sd3, pix = model_sampling_for("flux"), model_sampling_for("sd3"), model_sampling_for("pixart")
    assert flux.shift == 1.15 and model_sampling_for("flux", 0.5).shift == 0.5  # the stock loader's shift
    assert flux.flow and sd3.flow and not pix.flow
    assert float(sd3.timestep(torch.tensor(0.5))) == 500.0 and float(flux.timestep(torch.tensor(0.5))) == 0.5
    assert pix.timestep(pix.sigmas[[0, 500, 999]]).tolist() == [0, 500, 999]
    assert 150 < float(pix.sigma_max) < 160  # linear betas 1e-4 .. 0.02 over 1000 steps
    x, lat = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    assert torch.allclose(pix.noise_scaling(pix.sigma_max, x, lat, True), x * (1 + pix.sigma_max ** 2) ** 0.5)
    assert torch.equal(flux.noise_scaling(torch.tensor(1.0), x, lat), x)


def test_noise_draws_in_order_and_batch_index():
    stream = SamplerNoise((1, 4, 2, 2), 5).gaussian()
    first = stream(0, None, None)
    assert stream(0, None, None) is first  # every patch of a step slices the same draw
    with pytest.raises(RuntimeError, match="in order"):
        stream(2, None, None)
    g = torch.Generator().manual_seed(9)
    draws = [torch.randn(1, 4, 2, 2, generator=g) for _ in range(3)]
    assert torch.equal(initial_noise((2, 4, 2, 2), 9, [2, 0]), torch.cat([draws[2], draws[0]]))
    assert torch.equal(initial_noise((2, 4, 2, 2), 9), comfy_noise((2, 4, 2, 2), 9))


def test_unsupported_names_are_refused_with_the_supported_ones():
    ms = model_sampling_for("flux")
    with pytest.raises(ValueError, match="euler_ancestral.*uni_pc"):
        make_sampler("dpmpp_3m_sde", torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="karras.*linear_quadratic"):
        scheduler_sigmas(ms, "kl_optimal", 4)
    assert set(SCHEDULERS) >= {"simple", "normal", "karras", "exponential", "sgm_uniform", "beta", "ddim_uniform"}
    with pytest.raises(ValueError, match="flux_schnell"):
        model_sampling_for("sdxl")
    with pytest.raises(ValueError, match="noise"):
        make_sampler("euler_ancestral", torch.tensor([1.0, 0.0]), ms)
    with pytest.raises(ValueError, match="model sampling"):
        make_sampler("dpmpp_sde", torch.tensor([1.0, 0.0]))
