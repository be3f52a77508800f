"""The timestep features our time embeddings feed their MLPs equal ComfyUI 0.3.75's own, in bfloat16
(issue 10): Flux scales the timestep by 1000 in float32 (ComfyUI's ``timestep_embedding``) and the guidance
after its cast to the compute dtype; SD3 and PixArt embed the float32 timestep. Casting the timestep to
bfloat16 first (what diffusers' Flux forward does) moves sigma 0.123456 to 123.5 instead of 123.456.

ComfyUI is imported in a subprocess (importing comfy configures its device management), which computes its
features for the same timesteps; ours are captured at the input of the real timestep MLPs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from comfy_pipefusion.models import family

ROOT = Path(__file__).resolve().parent.parent
BF16 = torch.bfloat16
# what the runtime passes (model_sampling.timestep): Flux sigma, SD3 sigma * 1000, PixArt a discrete t
TIMESTEPS = {"flux": [0.7, 0.123456, 0.98765, 0.0421], "sd3": [700.0, 123.456, 987.65, 42.1],
             "pixart": [999.0, 733.61, 123.456, 4.5]}
GUIDANCE = 3.5


def comfy_features(path: str, host: str) -> None:
    """In ComfyUI's process: its timestep features in bfloat16 for TIMESTEPS, saved to ``path``."""
    sys.path.insert(0, host)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from comfy.ldm.flux.layers import timestep_embedding as flux_embedding
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    out = {}
    t = torch.tensor(TIMESTEPS["flux"])  # model_base: t = model_sampling.timestep(t).float(); guidance cast
    g = torch.full_like(t, GUIDANCE).to(BF16)
    out["flux"] = flux_embedding(t, 256).to(BF16)  # flux/model.py: time_in(timestep_embedding(...).to(img.dtype))
    out["flux_guidance"] = flux_embedding(g, 256).to(BF16)
    for fam in ("sd3", "pixart"):  # mmdit / pixartms TimestepEmbedder: timestep_embedding(t, 256).to(dtype)
        out[fam] = timestep_embedding(torch.tensor(TIMESTEPS[fam]), 256).to(BF16)
    torch.save(out, path)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from comfy_helpers import ensure_host

    host = ensure_host()
    path = tmp_path_factory.mktemp("temb") / "comfy.pt"
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_time_embedding as t; "
            "t.comfy_features(sys.argv[3], sys.argv[4])")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(ROOT / "tests"), str(path), str(host)],
                          cwd=str(ROOT), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(path)


def ours(preset: str, mlps: list[str], t: torch.Tensor) -> list[torch.Tensor]:
    """The inputs of the timestep MLPs ``mlps`` when our time_embedding runs in bfloat16."""
    fam, p = family.find_preset(preset)
    model = fam.build_meta(p["config"])
    fam.materialize(model, family.all_names(model), torch.device("cpu"), BF16, 0)
    seen: dict[str, torch.Tensor] = {}
    for name in mlps:
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0]))
    pooled = torch.zeros(t.shape[0], model.config.get("pooled_projection_dim") or 1, dtype=BF16)
    emb = SimpleNamespace(rows=8, cols=8, extra={"caption_kv": None})
    with torch.no_grad():
        fam.time_embedding(model, emb, t, pooled, torch.full_like(t, GUIDANCE), BF16)
    return [seen[n] for n in mlps]


def test_flux_time_embedding_in_bf16_equals_comfyui(comfy):
    t = torch.tensor(TIMESTEPS["flux"])
    got_t, got_g = ours("tiny", ["time_text_embed.timestep_embedder", "time_text_embed.guidance_embedder"], t)
    assert got_t.dtype == BF16 and torch.equal(got_t, comfy["flux"]), (got_t - comfy["flux"]).abs().max()
    assert torch.equal(got_g, comfy["flux_guidance"])
    # the bug this catches: bfloat16 before x1000 gives other features (sigma 0.123456 -> 123.5)
    from diffusers.models.embeddings import get_timestep_embedding
    early = get_timestep_embedding(t.to(BF16) * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=0).to(BF16)
    assert not torch.equal(early, comfy["flux"])


@pytest.mark.parametrize("fam,preset,mlp", [("sd3", "sd3-tiny", "time_text_embed.timestep_embedder"),
                                            ("pixart", "pixart-tiny", "adaln_single.emb.timestep_embedder")])
def test_sd3_and_pixart_time_embedding_in_bf16_equals_comfyui(comfy, fam, preset, mlp):
    (got,) = ours(preset, [mlp], torch.tensor(TIMESTEPS[fam]))
    assert got.dtype == BF16 and torch.equal(got, comfy[fam]), (got.float() - comfy[fam].float()).abs().max()
