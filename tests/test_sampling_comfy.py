"""Our per-patch sampling against ComfyUI 0.3.75's own code, run on the installed test host.

ComfyUI's modules are imported in a subprocess (``write_references``: importing comfy configures its
device management and pulls in its top-level packages), which runs its KSampler sigma computation and
KSAMPLER.sample - noise scaling, the k-diffusion/UniPC sampler function, inverse noise scaling - on a toy
deterministic denoiser over the full unpacked latent, and saves what it got. The tests run ours on packed
tokens, patch by patch, with uneven patchings that change between evaluations, and compare.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from comfy_pipefusion.models.family import pack_latent, unpack_latent
from comfy_pipefusion.sampling.model_sampling import flux_shift_for, model_sampling_for
from comfy_pipefusion.sampling.noise import SamplerNoise, initial_noise
from comfy_pipefusion.sampling.samplers import make_sampler
from comfy_pipefusion.sampling.schedulers import SCHEDULERS, scheduler_sigmas

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("flux", "flux_schnell", "sd3", "pixart")
SAMPLER_NAMES = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim",
                 "uni_pc", "lcm")
SEED, STEPS, HEIGHT, WIDTH, BATCH = 7, 6, 8, 12, 2
TOLERANCE = 1e-5  # max |ours - ComfyUI| / max |ComfyUI|
SHIFTED = {"flux": flux_shift_for(HEIGHT * 8, WIDTH * 8), "sd3": 2.0}  # ModelSamplingFlux / SD3 users
# (start, stop) token bands per evaluation, cycling: whole, uneven thirds, halves, tiny first patches
PATCHINGS = (((0, 24),), ((0, 7), (7, 8), (8, 24)), ((0, 13), (13, 24)), ((0, 1), (1, 5), (5, 6), (6, 24)))


def channels(family: str) -> int:
    return 4 if family == "pixart" else 16


def toy_output(xc: torch.Tensor, t: torch.Tensor, family: str) -> torch.Tensor:
    """A deterministic nonlinear "diffusion model" that mixes tokens (per-channel mean) and reads t."""
    tn = t.float().view(-1, 1, 1, 1) / (1.0 if family.startswith("flux") else 1000.0)
    ch = torch.linspace(-1, 1, xc.shape[1]).view(1, -1, 1, 1)
    return torch.tanh(0.8 * xc + 0.3 * ch * tn) + 0.2 * xc.mean(dim=(2, 3), keepdim=True) + 0.1 * torch.sin(3 * tn + ch)


def denoise(ms, x: torch.Tensor, sigma: torch.Tensor, family: str) -> torch.Tensor:
    """What ComfyUI's BaseModel._apply_model does around the diffusion model, with ``ms``'s conversions."""
    out = toy_output(ms.calculate_input(sigma, x), ms.timestep(sigma).float(), family)
    return ms.calculate_denoised(sigma, out.float(), x)


def latent_image(family: str, img2img: bool) -> torch.Tensor:
    shape = (BATCH, channels(family), HEIGHT, WIDTH)
    if not img2img:
        return torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(123)) * 0.7


def sampler_cases() -> list[tuple]:
    """(family, sampler, scheduler, denoise, shift, batch_index): the matrix of the issue, plus img2img."""
    cases = []
    for fam in FAMILIES:
        for name in SAMPLER_NAMES:
            cases += [(fam, name, sched, 1.0, None, None) for sched in ("simple", "karras")]
            cases.append((fam, name, "simple", 0.6, None, None))
        cases += [(fam, "euler", sched, 1.0, None, None) for sched in SCHEDULERS if sched not in ("simple", "karras")]
    for fam, shift in SHIFTED.items():
        cases += [(fam, name, "simple", 1.0, shift, None) for name in ("euler", "dpmpp_2m_sde", "uni_pc")]
    cases.append(("flux", "euler_ancestral", "simple", 1.0, None, (2, 0)))
    return cases


def schedule_cases() -> list[tuple]:
    return [(fam, sched, steps, denoise, sampler, None) for fam in FAMILIES for sched in SCHEDULERS
            for steps in (1, 4, 9) for denoise in (1.0, 0.6) for sampler in ("euler", "dpm_2")] + \
           [(fam, "normal", 5, 1.0, "euler", shift) for fam, shift in SHIFTED.items()]


# --- ComfyUI's side (runs in a subprocess) -------------------------------------------------------------

def _comfy_model_sampling(family: str, shift):
    import comfy.model_base as mb
    import comfy.supported_models as sm

    config, kind = {"flux": (sm.Flux, mb.ModelType.FLUX), "flux_schnell": (sm.FluxSchnell, mb.ModelType.FLOW),
                    "sd3": (sm.SD3, mb.ModelType.FLOW), "pixart": (sm.PixArtAlpha, mb.ModelType.EPS)}[family]
    ms = mb.model_sampling(SimpleNamespace(sampling_settings=dict(config.sampling_settings)), kind)
    if shift is not None:  # the ModelSamplingFlux / ModelSamplingSD3 nodes
        ms.set_parameters(shift=shift) if family == "flux" else ms.set_parameters(shift=shift, multiplier=1000)
    return ms


class _Guider:
    """Stands in for CFGGuider: what KSAMPLER and the sampler functions read from it, and the model call."""

    def __init__(self, ms, family: str) -> None:
        self.inner_model = SimpleNamespace(model_sampling=ms)
        self.model_patcher = SimpleNamespace(get_model_object=lambda name: ms)
        self.ms, self.family, self.calls = ms, family, []

    def __call__(self, x, sigma, model_options=None, seed=None):
        self.calls.append(float(sigma[0]))
        return denoise(self.ms, x, sigma, self.family)


def _comfy_sigmas(ms, scheduler: str, steps: int, denoise_: float, sampler: str):
    import comfy.samplers

    model = SimpleNamespace(get_model_object=lambda name: ms)
    return comfy.samplers.KSampler(model, steps, "cpu", sampler=sampler, scheduler=scheduler, denoise=denoise_).sigmas


def write_references(path: str, host: str) -> None:
    """Import ComfyUI from ``host`` (CPU only) and save every reference the tests compare with."""
    sys.path.insert(0, host)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.k_diffusion.sampling as kd
    import comfy.sample
    import comfy.samplers

    refs = {"samplers": {}, "schedules": {}, "tables": {}, "noise": {}}
    for case in sampler_cases():
        fam, name, sched, den, shift, batch_index = case
        ms = _comfy_model_sampling(fam, shift)
        sigmas = _comfy_sigmas(ms, sched, STEPS, den, name)
        latent = latent_image(fam, den < 1)
        noise = comfy.sample.prepare_noise(latent, SEED, None if batch_index is None else list(batch_index))
        guider = _Guider(ms, fam)
        extra = {"seed": SEED, "model_options": {}}
        out = comfy.samplers.sampler_object(name).sample(guider, sigmas.clone(), extra, None, noise, latent, None, True)
        refs["samplers"][case] = {"sigmas": sigmas, "evals": guider.calls, "out": out}
    for case in schedule_cases():
        fam, sched, steps, den, sampler, shift = case
        refs["schedules"][case] = _comfy_sigmas(_comfy_model_sampling(fam, shift), sched, steps, den, sampler)
    probe = torch.tensor([0.02, 0.3, 0.5, 0.97, 1.0])
    for fam in FAMILIES:
        ms = _comfy_model_sampling(fam, None)
        sig = probe * float(ms.sigma_max)
        x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(5))
        refs["tables"][fam] = {
            "sigmas": ms.sigmas, "timestep": ms.timestep(sig), "sigma": ms.sigma(ms.timestep(sig)),
            "percent": [ms.percent_to_sigma(p) for p in (0.0, 1e-4, 0.3, 1.0)],
            "input": ms.calculate_input(sig[:2], x), "denoised": ms.calculate_denoised(sig[:2], x * 0.5, x),
            "scaled": ms.noise_scaling(sig[1], x, x * 0.3, False), "scaled_max": ms.noise_scaling(sig[-1], x, x * 0.3, True),
            "inverse": ms.inverse_noise_scaling(sig[1], x)}
    x = torch.zeros(BATCH, 16, HEIGHT, WIDTH)
    gauss = kd.default_noise_sampler(x, seed=SEED)
    tree = kd.BrownianTreeNoiseSampler(x, torch.tensor(0.03), torch.tensor(1.0), seed=SEED, cpu=True)
    refs["noise"] = {
        "gaussian": [gauss(None, None) for _ in range(3)],
        "brownian": [tree(torch.tensor(a), torch.tensor(b)) for a, b in ((1.0, 0.7), (0.7, 0.4), (0.7, 0.55))],
        "batch_index": comfy.sample.prepare_noise(x[:3], SEED, [3, 1, 1])}
    torch.save(refs, path)


# --- our side ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    from comfy_helpers import ensure_host

    host = ensure_host()
    path = tmp_path_factory.mktemp("comfy_refs") / "refs.pt"
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_sampling_comfy as t; "
            "t.write_references(sys.argv[3], sys.argv[4])")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(ROOT / "tests"), str(path), str(host)],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(path, weights_only=False)


def run_ours(family: str, name: str, sigmas: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
             shift=None, patchings=PATCHINGS) -> tuple[torch.Tensor, list[float]]:
    """Sample with our sampler on packed tokens, patch by patch, the model evaluated on the full latent."""
    ms = model_sampling_for(family, shift)
    b, c, h, w = latent.shape
    sampler = make_sampler(name, sigmas, ms, SamplerNoise((b, c, h, w), SEED, pack_latent))
    x = pack_latent(ms.start(sigmas, noise, latent))  # [B, S, 4C]
    for k, sigma in enumerate(sampler.evals):
        den = pack_latent(denoise(ms, unpack_latent(x, h, w), torch.full((b,), sigma), family))
        bands = patchings[k % len(patchings)]
        x = torch.cat([sampler.step(k, slice(i0, i1), x[:, i0:i1], den[:, i0:i1]) for i0, i1 in bands], dim=1)
    return unpack_latent(x, h, w), sampler.evals


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("case", sampler_cases(), ids=lambda c: "-".join(str(v) for v in c if v is not None))
def test_sampler_matches_comfyui(refs, case):
    fam, name, sched, den, shift, batch_index = case
    ref = refs["samplers"][case]
    ms = model_sampling_for(fam, shift)
    sigmas = scheduler_sigmas(ms, sched, STEPS, den, sampler=name)
    assert torch.equal(sigmas, ref["sigmas"])
    latent = latent_image(fam, den < 1)
    noise = initial_noise(tuple(latent.shape), SEED, None if batch_index is None else list(batch_index))
    out, evals = run_ours(fam, name, sigmas, latent, noise, shift)
    assert evals == ref["evals"]
    diff = rel_diff(out, ref["out"])
    print(f"{'/'.join(str(v) for v in case if v is not None)}: max rel diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("case", schedule_cases(), ids=lambda c: "-".join(str(v) for v in c if v is not None))
def test_scheduler_matches_comfyui(refs, case):
    fam, sched, steps, den, sampler, shift = case
    ours = scheduler_sigmas(model_sampling_for(fam, shift), sched, steps, den, sampler=sampler)
    ref = refs["schedules"][case]
    assert ours.dtype == torch.float32 and torch.equal(ours, ref.float()), (ours, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_sampling_matches_comfyui(refs, family):
    ref, ms = refs["tables"][family], model_sampling_for(family)
    assert torch.equal(ms.sigmas, ref["sigmas"])
    sig = torch.tensor([0.02, 0.3, 0.5, 0.97, 1.0]) * float(ms.sigma_max)
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ms.timestep(sig), ref["timestep"]) and torch.equal(ms.sigma(ms.timestep(sig)), ref["sigma"])
    assert [ms.percent_to_sigma(p) for p in (0.0, 1e-4, 0.3, 1.0)] == ref["percent"]
    assert torch.equal(ms.calculate_input(sig[:2], x), ref["input"])
    assert torch.equal(ms.calculate_denoised(sig[:2], x * 0.5, x), ref["denoised"])
    assert torch.equal(ms.noise_scaling(sig[1], x, x * 0.3, False), ref["scaled"])
    assert torch.equal(ms.noise_scaling(sig[-1], x, x * 0.3, True), ref["scaled_max"])
    assert torch.equal(ms.inverse_noise_scaling(sig[1], x), ref["inverse"])


def test_noise_streams_match_comfyui(refs):
    ref, shape = refs["noise"], (BATCH, 16, HEIGHT, WIDTH)
    gauss = SamplerNoise(shape, SEED).gaussian()
    for i, want in enumerate(ref["gaussian"]):
        assert torch.equal(gauss(i, None, None), want)
    tree = SamplerNoise(shape, SEED).brownian(torch.tensor(0.03), torch.tensor(1.0))
    for i, ((a, b), want) in enumerate(zip(((1.0, 0.7), (0.7, 0.4), (0.7, 0.55)), ref["brownian"])):
        assert torch.equal(tree(i, torch.tensor(a), torch.tensor(b)), want)
    assert torch.equal(initial_noise((3, 16, HEIGHT, WIDTH), SEED, [3, 1, 1]), ref["batch_index"])
