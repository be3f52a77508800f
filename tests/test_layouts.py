"""Checkpoints in every layout users keep (original single files with and without ComfyUI's prefix,
diffusers files, sharded diffusers, fp8 weights), written by the test from built-in models, loaded per
stage by a real 2-rank group: synchronous runs equal the serial reference on the same file, and stale runs
stay closer to it than bands that never see each other."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.config import ParallelConfig, SampleSpec
from comfy_pipefusion.oneshot import run_jobs
from comfy_pipefusion.job import synthetic_problem
from comfy_pipefusion.models import family
from comfy_pipefusion.models.checkpoint_write import pixart_extras, write_checkpoint
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.parallel.serial import run_serial

# name: (preset, layout, prefix, dtype, shards)
CASES = {
    "flux-original": ("tiny", "original", "", torch.float32, 1),
    "flux-prefixed": ("tiny", "original", "model.diffusion_model.", torch.float32, 1),
    "flux-diffusers": ("tiny", "diffusers", "", torch.float32, 1),
    "flux-sharded": ("tiny", "diffusers", "", torch.float32, 3),
    "flux-fp8": ("tiny", "original", "", torch.float8_e4m3fn, 1),
    "sd3-original": ("sd3-tiny", "original", "", torch.float32, 1),
    "sd3.5m-prefixed": ("sd3.5m-tiny", "original", "model.diffusion_model.", torch.float32, 1),
    "pixart-sigma-original": ("pixart-tiny", "original", "", torch.float32, 1),
    "pixart-alpha-original": ("pixart-alpha-tiny", "original", "", torch.float32, 1),
}
STEPS, STALE_STEPS, TOL = 3, 8, 1e-5


def _spec(preset: str, steps: int) -> dict:
    p = family.find_preset(preset)[1]
    return {"height": p["height"], "width": p["width"], "steps": steps, "sampler": "euler"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root, out = tmp_path_factory.mktemp("layouts"), {}
    for name, (preset, layout, prefix, dtype, shards) in CASES.items():
        fam, p = family.find_preset(preset)
        model = fam.build_meta(p["config"])
        fam.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
        sd = {k: v for k, v in model.state_dict().items() if k != "pos_embed.pos_embed" or fam.NAME == "sd3"}
        extra = pixart_extras(dict(model.config), 8) if fam.NAME == "pixart" else None
        folder = root / name
        folder.mkdir()
        out[name] = str(write_checkpoint(folder / "model.safetensors", sd, fam.NAME, dict(model.config),
                                         layout=layout, prefix=prefix, dtype=dtype,
                                         small_dtype=torch.bfloat16 if dtype == torch.float8_e4m3fn else None,
                                         shards=shards, extra=extra))
    return out


@pytest.fixture(scope="module")
def results(files):
    jobs = []
    for name, (preset, *_rest) in CASES.items():
        model = {"checkpoint": files[name], "seed": 0}
        for job, parallel, steps in (("pf_full", {"strategy": "pipefusion", "warmup_steps": STEPS}, STEPS),
                                     ("df_full", {"strategy": "distrifusion", "warmup_steps": STEPS}, STEPS),
                                     ("stale_pf", {"strategy": "pipefusion", "warmup_steps": 1}, STALE_STEPS),
                                     ("stale_naive", {"strategy": "naive_patch", "warmup_steps": 1}, STALE_STEPS)):
            jobs.append({"name": f"{name}--{job}", "model": model, "sample": _spec(preset, steps),
                         "parallel": parallel, "text_tokens": 8})
    return run_jobs(None, 0, jobs, world_size=2, timeout=1200)


def _serial(path: str, preset: str, steps: int) -> torch.Tensor:
    source = ModelSource(checkpoint=path)
    fam, config = source.describe()
    model, _ = load_rank_model(source, ParallelConfig("serial", 1), 0, torch.device("cpu"), torch.float32)
    problem = synthetic_problem(fam, config, SampleSpec(**_spec(preset, steps)), 8)
    with torch.inference_mode():
        return problem.finish(run_serial(model, problem, torch.float32, torch.device("cpu")))


@pytest.mark.parametrize("name", list(CASES))
def test_layout_through_the_engine(name, files, results):
    preset = CASES[name][0]
    fam = family.find_preset(preset)[0]
    assert ModelSource(checkpoint=files[name]).describe()[0] is fam
    ref = _serial(files[name], preset, STEPS)
    assert float(ref.abs().max()) > 0.05
    for job in ("pf_full", "df_full"):
        got = results[f"{name}--{job}"][0]
        assert float((got - ref).abs().max()) <= TOL * max(1.0, float(ref.abs().max())), job
    stale_ref = _serial(files[name], preset, STALE_STEPS)
    rel = [float((results[f"{name}--{j}"][0] - stale_ref).norm() / stale_ref.norm()) for j in ("stale_pf", "stale_naive")]
    assert 0 < rel[0] <= 0.75 * rel[1], rel
