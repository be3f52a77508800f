"""The diffusers layouts of SD3 and PixArt (a transformer's diffusion_pytorch_model.safetensors, one file or
shards with their index): detected with their configuration from the shapes, loaded per stage like the single
files, and the loaded model is the model that was written (diffusers' own forward, bit for bit)."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.models import family
from comfy_pipefusion.models.checkpoint import CheckpointError, load_modules, open_checkpoint
from comfy_pipefusion.models.checkpoint_write import write_checkpoint
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model

CPU = torch.device("cpu")
PIXART = dict(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=3,
              cross_attention_dim=48, attention_bias=True, sample_size=128, patch_size=2,
              activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
              norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=40, use_additional_conditions=True)
SD3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
           num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=24,
           pos_embed_max_size=12, dual_attention_layers=(), qk_norm=None)
CASES = {"sd3": ("sd3", SD3), "sd3.5m": ("sd3", dict(SD3, dual_attention_layers=(0, 1), qk_norm="rms_norm")),
         "pixart-alpha": ("pixart", PIXART), "pixart-sigma": ("pixart", dict(PIXART, use_additional_conditions=False))}


def _model(fam_name: str, config: dict, seed: int = 3):
    fam = family.get(fam_name)
    model = fam.build_meta(config)
    fam.materialize(model, family.all_names(model), CPU, torch.float32, seed)
    return fam, model


def _same(a, b) -> bool:
    norm = lambda c: {k: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
                      for k, v in dict(c).items() if not k.startswith("_")}
    return norm(a.config) == norm(b.config)


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_layouts_diffusers_sd3_pixart_detect_and_load_per_stage(tmp_path, case, shards):
    fam_name, config = CASES[case]
    fam, model = _model(fam_name, config)
    sd = model.state_dict()
    path = write_checkpoint(tmp_path / "diffusion_pytorch_model.safetensors", sd, fam_name, config,
                            layout="diffusers", shards=shards, dtype=torch.bfloat16)
    info = open_checkpoint(tmp_path if shards == 1 else path)  # a diffusers folder, or the index
    assert (info.family, info.layout) == (fam_name, "diffusers" if shards == 1 else "diffusers-sharded")
    assert _same(fam.build_meta(info.config), model), (info.config, config)
    # the last of 2 PipeFusion stages reads its blocks and the output layers, nothing else
    part, _ = load_rank_model(ModelSource(checkpoint=str(path)), ParallelConfig("pipefusion", 2, patches=2), 1,
                              CPU, torch.float32)
    held = {n for n, p in part.named_parameters() if not p.is_meta}
    assert held and not any(n.startswith(("transformer_blocks.0.", "pos_embed.proj"))
                            for n in held)
    for n in held:
        assert torch.equal(part.get_parameter(n), sd[n].to(torch.bfloat16).float()), n
    loaded = fam.build_meta(info.config)
    load_modules(loaded, info, family.all_names(loaded), CPU, torch.float32)
    for k, v in loaded.state_dict().items():
        if not v.is_meta:
            assert torch.equal(v, sd[k].to(torch.bfloat16).float()), k


def test_layouts_diffusers_truncated_file_is_refused(tmp_path):
    _, model = _model("sd3", CASES["sd3.5m"][1])
    sd = dict(model.state_dict())
    del sd["transformer_blocks.1.attn2.to_k.weight"]
    write_checkpoint(tmp_path / "diffusion_pytorch_model.safetensors", sd, "sd3", CASES["sd3.5m"][1],
                     layout="diffusers")
    with pytest.raises(CheckpointError, match="transformer_blocks.1.attn2.to_k.weight"):
        open_checkpoint(tmp_path / "diffusion_pytorch_model.safetensors")
