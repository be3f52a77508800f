"""Checkpoints at the real widths.

1. Our per-block adapters against diffusers' own converters (``convert_flux_transformer_checkpoint_to_diffusers``,
   ``convert_sd3_transformer_checkpoint_to_diffusers``, which hard-code real widths): one or two blocks of the
   real width in bf16, written in the original layout; the converter reads the whole file, we load module by
   module; every tensor must be equal. (~1 GB files; run one at a time on a small machine.)
2. Detection of the released models: full-size headers over sparse files (no data on disk), the configs
   diffusers publishes for Flux.1 dev/schnell, SD3 medium, SD3.5 medium/large, PixArt-α/Σ at each size.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch
from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                 convert_sd3_transformer_checkpoint_to_diffusers)
from safetensors.torch import load_file

from comfy_pipefusion.models.checkpoint import ORIGINAL_MAPS, open_checkpoint
from comfy_pipefusion.models.checkpoint_write import write_checkpoint
from comfy_pipefusion.models.keymap import invert
from test_checkpoint import CPU, all_names, meta_model, same_config

FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=(),
                  qk_norm=None)
SD35_MEDIUM = {**SD3_MEDIUM, "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)),
               "qk_norm": "rms_norm"}
SD35_LARGE = {**SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
              "qk_norm": "rms_norm"}
PIXART = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              cross_attention_dim=1152, attention_bias=True, patch_size=2, activation_fn="gelu-approximate",
              num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
              caption_channels=4096)


def random_bf16(fam: str, config: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.bfloat16)
            for k, v in meta_model(fam, config).state_dict().items()}


def converter_matches(tmp_path, fam: str, config: dict, convert, prefix: str) -> None:
    sd = random_bf16(fam, config)
    path = write_checkpoint(tmp_path / "real.safetensors", sd, fam, config, prefix=prefix)
    del sd
    info = open_checkpoint(path)
    assert same_config(info.config, config, fam)
    model = meta_model(fam, info.config)
    load_modules_all(model, info)
    ours = model.state_dict()
    theirs = convert(load_file(str(path)))
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    path.unlink()


def load_modules_all(model, info) -> None:
    from comfy_pipefusion.models.checkpoint import load_modules

    for name in all_names(model):  # module by module, as ranks do
        load_modules(model, info, [name], CPU, torch.bfloat16)


def test_flux_adapters_equal_diffusers_converter(tmp_path):
    config = {**FLUX_DEV, "num_layers": 1, "num_single_layers": 1}
    converter_matches(tmp_path, "flux", config, convert_flux_transformer_checkpoint_to_diffusers, "")


def test_flux_schnell_with_prefix_equals_diffusers_converter(tmp_path):
    config = {**FLUX_DEV, "num_layers": 1, "num_single_layers": 1, "guidance_embeds": False}
    converter_matches(tmp_path, "flux", config, convert_flux_transformer_checkpoint_to_diffusers,
                      "model.diffusion_model.")


@pytest.mark.parametrize("name,config,prefix", [
    ("sd3-medium", {**SD3_MEDIUM, "num_layers": 2}, ""),
    ("sd3.5-medium", {**SD35_MEDIUM, "num_layers": 2, "dual_attention_layers": (0,)}, "model.diffusion_model."),
    ("sd3.5-large", {**SD35_LARGE, "num_layers": 2}, ""),
])
def test_sd3_adapters_equal_diffusers_converter(tmp_path, name, config, prefix):
    converter_matches(tmp_path, "sd3", config, convert_sd3_transformer_checkpoint_to_diffusers, prefix)


# ------------------------------------------------------------------------------------------ full-size headers

def sparse_checkpoint(path, tensors: dict[str, torch.Size], dtype: str = "BF16") -> None:
    """A safetensors file with full-size tensors whose data is a hole: the header is real, the disk stays empty."""
    header, offset = {}, 0
    for k, shape in tensors.items():
        n = 2 * torch.Size(shape).numel()
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)


def original_shapes(fam: str, config: dict) -> dict[str, torch.Size]:
    stored = invert(meta_model(fam, config).state_dict(), ORIGINAL_MAPS[fam](config))
    return {k: v.shape for k, v in stored.items()}


@pytest.mark.parametrize("name,fam,config,extra,variant", [
    ("flux1-dev.safetensors", "flux", FLUX_DEV, {}, "Flux.1-dev"),
    ("flux1-schnell.safetensors", "flux", {**FLUX_DEV, "guidance_embeds": False}, {}, "Flux.1-schnell"),
    ("sd3_medium.safetensors", "sd3", SD3_MEDIUM, {}, "SD3 medium"),
    ("sd3.5_medium.safetensors", "sd3", SD35_MEDIUM, {}, "SD3.5 medium"),
    ("sd3.5_large.safetensors", "sd3", SD35_LARGE, {}, "SD3.5 large"),
    ("PixArt-XL-2-512x512.safetensors", "pixart", {**PIXART, "sample_size": 64, "use_additional_conditions": False},
     {"pos_embed": (1, 1024, 1152), "y_embedder.y_embedding": (120, 4096)}, "PixArt-α 512"),
    ("PixArt-XL-2-1024-MS.safetensors", "pixart", {**PIXART, "sample_size": 128, "use_additional_conditions": True},
     {"pos_embed": (1, 4096, 1152), "y_embedder.y_embedding": (120, 4096)}, "PixArt-α 1024"),
    ("PixArt-Sigma-XL-2-512-MS.safetensors", "pixart", {**PIXART, "sample_size": 64,
                                                       "use_additional_conditions": False},
     {"pos_embed": (1, 1024, 1152), "y_embedder.y_embedding": (300, 4096)}, "PixArt-Σ 512"),
    ("PixArt-Sigma-XL-2-1024-MS.safetensors", "pixart", {**PIXART, "sample_size": 128,
                                                        "use_additional_conditions": False},
     {"y_embedder.y_embedding": (300, 4096)}, "PixArt-Σ 1024"),  # no table: the size comes from the name
    ("PixArt-Sigma-XL-2-2K-MS.safetensors", "pixart", {**PIXART, "sample_size": 256,
                                                      "use_additional_conditions": False},
     {"pos_embed": (1, 16384, 1152), "y_embedder.y_embedding": (300, 4096)}, "PixArt-Σ 2K"),
])
def test_released_models_are_detected_from_their_headers(tmp_path, name, fam, config, extra, variant):
    shapes = {**original_shapes(fam, config), **{k: torch.Size(v) for k, v in extra.items()}}
    sparse_checkpoint(tmp_path / name, shapes)
    info = open_checkpoint(tmp_path / name)
    assert (info.family, info.layout, info.variant, info.dtype) == (fam, "original", variant, torch.bfloat16)
    assert same_config(info.config, config, fam), info.config


def test_full_checkpoint_with_prefix_and_other_components(tmp_path):
    """A 'full' file: the DiT under model.diffusion_model., next to a VAE and text encoders that are ignored."""
    shapes = {f"model.diffusion_model.{k}": v for k, v in original_shapes("sd3", SD35_LARGE).items()}
    shapes.update({"first_stage_model.encoder.down.0.block.0.conv1.weight": torch.Size([128, 128, 3, 3]),
                   "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight":
                       torch.Size([49408, 768])})
    sparse_checkpoint(tmp_path / "sd3.5_large_full.safetensors", shapes)
    info = open_checkpoint(tmp_path / "sd3.5_large_full.safetensors")
    assert (info.prefix, info.variant) == ("model.diffusion_model.", "SD3.5 large")
    assert same_config(info.config, SD35_LARGE, "sd3")
