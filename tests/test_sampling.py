from __future__ import annotations

import math

import torch

from comfy_pipefusion.config import SampleSpec
from comfy_pipefusion.job import make_problem, process_in, process_out
from comfy_pipefusion.sampling.noise import comfy_noise
from comfy_pipefusion.sampling.samplers import Euler, Frozen
from comfy_pipefusion.sampling.sigmas import flux_shift_for, flux_sigma_table, flux_sigmas, simple_schedule


def test_flux_shift_is_linear_in_tokens():
    assert math.isclose(flux_shift_for(256, 256), 0.5)  # 256 tokens
    assert math.isclose(flux_shift_for(1024, 1024), 1.15)  # 4096 tokens
    assert math.isclose(flux_shift_for(512, 1024), 0.5 + (2048 - 256) * 0.65 / 3840)


def test_flux_sigma_table_and_simple_schedule():
    table = flux_sigma_table(1.15)
    assert len(table) == 10000 and float(table[-1]) == 1.0
    t = 0.5
    assert math.isclose(float(table[4999]), math.exp(1.15) / (math.exp(1.15) + (1 / t - 1)), rel_tol=1e-6)
    sig = simple_schedule(table, 4)
    assert sig.tolist()[-1] == 0.0 and len(sig) == 5
    assert torch.equal(sig[:4], torch.stack([table[-1], table[-2501], table[-5001], table[-7501]]))
    assert torch.all(sig[:-1] > sig[1:])
    assert torch.equal(flux_sigmas(1024, 1024, 4), sig)


def test_noise_is_comfyui_stream():
    g = torch.manual_seed(42)
    want = torch.randn((2, 16, 4, 4), generator=g)
    assert torch.equal(comfy_noise((2, 16, 4, 4), 42), want)


def test_latent_in_out_roundtrip_and_initial_noise():
    lat = torch.randn(1, 16, 4, 4)
    assert torch.allclose(process_out(process_in(lat)), lat, atol=1e-6)
    spec = SampleSpec(height=32, width=32, steps=2, seed=3)
    p = make_problem(spec, torch.zeros(1, 2, 8), torch.zeros(1, 8))
    assert p.x0.shape == (1, 4, 64)
    assert float(p.sigmas[0]) == 1.0  # txt2img starts from pure noise at sigma 1
    assert torch.allclose(p.finish(p.x0), process_out(comfy_noise((1, 16, 4, 4), 3)))


def test_euler_and_frozen_steps():
    sig = torch.tensor([1.0, 0.5, 0.0])
    x, den = torch.ones(1, 2, 64), torch.zeros(1, 2, 64)
    assert torch.allclose(Euler(sig).step(0, slice(None), x, den), torch.full_like(x, 0.5))
    assert torch.equal(Euler(sig).step(1, slice(None), x, den), den)  # sigma_next 0: the prediction
    f = Frozen(sig)
    assert f.step(0, slice(None), x, den) is x and torch.equal(f.step(1, slice(None), x, den), den)
