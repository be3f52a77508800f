"""Checkpoint detection and per-module loading on small synthetic files in every layout and dtype.

Files are written from a random diffusers state dict by the inverse adapters (checkpoint_write), opened from
their header and loaded module by module into a meta-device model; the loaded tensors must equal the state
dict exactly (after the stored dtype's rounding). Real widths and diffusers' own converters are in
test_checkpoint_real.py.
"""
from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from safetensors.torch import save_file

from comfy_pipefusion.models import fp8
from comfy_pipefusion.models.checkpoint import (CheckpointError, CheckpointInfo, inspect_checkpoint, load_modules,
                                                open_checkpoint, save_checkpoint, sources_for)
from comfy_pipefusion.models.checkpoint_write import pixart_extras, write_checkpoint
from comfy_pipefusion.models.keys_pixart import original_map as pixart_map

CPU = torch.device("cpu")
CLASSES = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel, "pixart": PixArtTransformer2DModel}
CONFIGS = {
    "flux": dict(num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    "flux-schnell": dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=False,
                         axes_dims_rope=(4, 6, 6)),
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=24,
                out_channels=16, pos_embed_max_size=12, dual_attention_layers=(), qk_norm=None),
    "sd3.5": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=24,
                  out_channels=16, pos_embed_max_size=12, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "pixart-alpha": dict(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
                         cross_attention_dim=48, attention_bias=True, sample_size=32, patch_size=2,
                         activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                         norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=40,
                         use_additional_conditions=True),
}
CONFIGS["pixart-sigma"] = {**CONFIGS["pixart-alpha"], "use_additional_conditions": False, "sample_size": 64}
# (family key, layout, prefix, shards)
LAYOUTS = [("flux", "original", "", 1), ("flux", "original", "model.diffusion_model.", 1),
           ("flux", "diffusers", "", 1), ("flux", "diffusers", "", 3), ("flux-schnell", "original", "", 1),
           ("sd3", "original", "", 1), ("sd3", "original", "model.diffusion_model.", 1),
           ("sd3.5", "original", "", 1), ("sd3.5", "original", "model.diffusion_model.", 1),
           ("pixart-alpha", "original", "", 1), ("pixart-sigma", "original", "", 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]


def family(key: str) -> str:
    return key.split("-")[0].split(".")[0]


def meta_model(fam: str, config: dict):
    with torch.device("meta"):
        return CLASSES[fam](**config)


def random_state(fam: str, config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in meta_model(fam, config).state_dict().items()}


def all_names(model) -> list[str]:
    return [n for n, _ in model.named_children()] + [n for n, _ in model.named_parameters(recurse=False)]


def write(tmp_path, key, layout="original", prefix="", shards=1, dtype=None, small_dtype=None, seed=0):
    fam, config = family(key), CONFIGS[key]
    sd = random_state(fam, config, seed)
    extra = pixart_extras(config, 120 if "alpha" in key else 300) if fam == "pixart" else None
    name = "diffusion_pytorch_model" if layout == "diffusers" else f"{key}-{layout}"
    path = write_checkpoint(tmp_path / f"{name}.safetensors", sd, fam, config, layout=layout, prefix=prefix,
                            dtype=dtype, small_dtype=small_dtype, shards=shards, extra=extra)
    return path, sd


def load_all(info: CheckpointInfo, dtype=torch.float32):
    model = meta_model(info.family, info.config)
    load_modules(model, info, all_names(model), CPU, dtype)
    return model


def same_config(got: dict, want: dict, fam: str = "flux") -> bool:
    """Both configs give the same diffusers model: every config value of the built classes agrees."""
    norm = lambda c: {k: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
                      for k, v in dict(meta_model(fam, c).config).items() if not k.startswith("_")}
    return norm(got) == norm(want)


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("key,layout,prefix,shards", LAYOUTS)
def test_every_layout_detects_its_config_and_loads_exactly(tmp_path, key, layout, prefix, shards):
    path, sd = write(tmp_path, key, layout, prefix, shards)
    info = open_checkpoint(path)
    assert (info.family, info.prefix, info.dtype) == (family(key), prefix, torch.float32)
    assert info.layout == (layout if shards == 1 else "diffusers-sharded")
    assert same_config(info.config, CONFIGS[key], info.family), (info.config, CONFIGS[key])
    got = load_all(info).state_dict()
    assert set(got) == set(sd)
    for k in sd:
        assert torch.equal(got[k], sd[k]), k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key", ["flux", "sd3.5", "pixart-sigma"])
def test_every_stored_dtype_loads_as_the_compute_dtype(tmp_path, key, dtype):
    path, sd = write(tmp_path, key, dtype=dtype)
    info = open_checkpoint(path)
    assert info.dtype == dtype
    model = load_all(info, torch.bfloat16)
    got = model.state_dict()
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if type(m) in (torch.nn.Linear,
                                                                                     fp8.StoredFp8Linear)}
    for k, v in sd.items():
        stored = v.to(dtype)
        if dtype in fp8.FP8 and k in linear_weights:
            assert got[k].dtype == dtype, k  # kept 8-bit
            assert torch.equal(got[k].view(torch.uint8), stored.view(torch.uint8)), k
        else:
            assert got[k].dtype == torch.bfloat16, k
            assert torch.equal(got[k], stored.to(torch.bfloat16)), k


def test_fp8_files_with_wider_norms_and_biases(tmp_path):
    """Many fp8 files keep vectors in bf16: mixed stored dtypes load, Linear weights stay 8-bit."""
    path, sd = write(tmp_path, "flux", dtype=torch.float8_e4m3fn, small_dtype=torch.bfloat16)
    info = open_checkpoint(path)
    assert info.dtype == torch.float8_e4m3fn
    model = load_all(info, torch.float32)
    blk = model.transformer_blocks[0]
    assert type(blk.attn.to_q) is fp8.StoredFp8Linear and blk.attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert blk.attn.to_q.bias.dtype == torch.float32
    assert torch.equal(blk.attn.norm_q.weight, sd["transformer_blocks.0.attn.norm_q.weight"].to(torch.bfloat16).float())
    held = fp8.stored_bytes(model)
    assert held[torch.float8_e4m3fn] > 4 * held[torch.float32]  # the weights dominate and stay 1 byte each


def test_fp8_linear_computes_in_the_input_dtype():
    lin = torch.nn.Linear(16, 8)
    w8 = lin.weight.detach().to(torch.float8_e4m3fn)
    lin.weight = torch.nn.Parameter(w8, requires_grad=False)
    fp8.keep_stored(lin)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x, w8.to(torch.bfloat16), lin.bias.to(torch.bfloat16)))
    assert lin.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("mode", ["cast", "upcast"])
def test_fp8_model_matches_the_upcast_model(tmp_path, mode):
    """A whole Flux forward with 8-bit weights equals the same weights upcast to the compute dtype, whether
    each weight is cast per call or the stage keeps an upcast copy (fp8.set_compute)."""
    path, _ = write(tmp_path, "flux", dtype=torch.float8_e4m3fn)
    info = open_checkpoint(path)
    ours = load_all(info, torch.float32)
    held = fp8.set_compute(ours, mode, torch.float32)
    layers = fp8.stored_layers(ours)
    assert layers and all((m.upcast is not None) == (mode == "upcast") for m in layers)
    assert held == (sum(m.weight.numel() * 4 for m in layers) if mode == "upcast" else 0)
    assert "upcast" not in " ".join(ours.state_dict())  # the copy is no weight of the model
    ref = meta_model("flux", info.config)
    ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items()}, assign=True)
    g = torch.Generator().manual_seed(1)
    x, txt = torch.randn(1, 16, 64, generator=g), torch.randn(1, 5, 32, generator=g)
    kw = dict(hidden_states=x, encoder_hidden_states=txt, pooled_projections=torch.randn(1, 24, generator=g),
              timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3),
              txt_ids=torch.zeros(5, 3), return_dict=False)
    with torch.no_grad():
        assert torch.equal(ours(**kw)[0], ref(**kw)[0])


# ------------------------------------------------------------------------------------------ per-module loading

def test_a_rank_fills_only_its_modules(tmp_path):
    path, sd = write(tmp_path, "flux")
    info = open_checkpoint(path)
    model = meta_model("flux", info.config)
    load_modules(model, info, ["time_text_embed", "single_transformer_blocks.1"], CPU, torch.float32)
    for k, v in model.state_dict().items():
        held = k.startswith(("time_text_embed.", "single_transformer_blocks.1."))
        assert v.is_meta != held, k
        if held:
            assert torch.equal(v, sd[k])


def test_pixart_root_parameter_and_recomputed_position_table(tmp_path):
    path, sd = write(tmp_path, "pixart-sigma")
    info = open_checkpoint(path)
    model = meta_model("pixart", info.config)
    load_modules(model, info, ["scale_shift_table", "pos_embed"], CPU, torch.float32)
    assert torch.equal(model.scale_shift_table, sd["scale_shift_table"])
    built = PixArtTransformer2DModel(**info.config)  # diffusers' own sin-cos table, computed at construction
    assert torch.equal(model.pos_embed.pos_embed, built.pos_embed.pos_embed)


def test_block_adapters_name_their_sources(tmp_path):
    flux_path, _ = write(tmp_path, "flux")
    src = sources_for(open_checkpoint(flux_path), "single_transformer_blocks.2")
    d = 64
    assert src["single_transformer_blocks.2.attn.to_k.weight"] == (("single_blocks.2.linear1.weight", d, 2 * d),)
    assert src["single_transformer_blocks.2.proj_mlp.bias"] == (("single_blocks.2.linear1.bias", 3 * d, 7 * d),)
    assert sources_for(open_checkpoint(flux_path), "norm_out")["norm_out.linear.weight"] == (
        ("final_layer.adaLN_modulation.1.weight", d, 2 * d), ("final_layer.adaLN_modulation.1.weight", 0, d))
    sd3_path, _ = write(tmp_path, "sd3.5")
    last = sources_for(open_checkpoint(sd3_path), "transformer_blocks.2")
    assert "transformer_blocks.2.ff_context.net.0.proj.weight" not in last  # the last text block is pre-only
    assert last["transformer_blocks.2.norm1_context.linear.bias"][0] == (
        "joint_blocks.2.context_block.adaLN_modulation.1.bias", 64, 128)


# ------------------------------------------------------------------------------------------ PixArt key facts

def test_pixart_map_matches_the_published_key_names():
    """Facts from the PixArt repositories' nets and their diffusers conversion (also ComfyUI's pixart map)."""
    config = {**CONFIGS["pixart-alpha"], "num_layers": 1}
    m = pixart_map(config)
    d = 48
    want = {
        "pos_embed.proj.weight": (("x_embedder.proj.weight", 0, None),),
        "adaln_single.emb.timestep_embedder.linear_2.bias": (("t_embedder.mlp.2.bias", 0, None),),
        "adaln_single.emb.resolution_embedder.linear_1.weight": (("csize_embedder.mlp.0.weight", 0, None),),
        "adaln_single.emb.aspect_ratio_embedder.linear_2.weight": (("ar_embedder.mlp.2.weight", 0, None),),
        "adaln_single.linear.weight": (("t_block.1.weight", 0, None),),
        "caption_projection.linear_1.weight": (("y_embedder.y_proj.fc1.weight", 0, None),),
        "caption_projection.linear_2.bias": (("y_embedder.y_proj.fc2.bias", 0, None),),
        "transformer_blocks.0.scale_shift_table": (("blocks.0.scale_shift_table", 0, None),),
        "transformer_blocks.0.attn1.to_q.weight": (("blocks.0.attn.qkv.weight", 0, d),),
        "transformer_blocks.0.attn1.to_v.bias": (("blocks.0.attn.qkv.bias", 2 * d, 3 * d),),
        "transformer_blocks.0.attn1.to_out.0.weight": (("blocks.0.attn.proj.weight", 0, None),),
        "transformer_blocks.0.attn2.to_q.weight": (("blocks.0.cross_attn.q_linear.weight", 0, None),),
        "transformer_blocks.0.attn2.to_k.weight": (("blocks.0.cross_attn.kv_linear.weight", 0, d),),
        "transformer_blocks.0.attn2.to_v.weight": (("blocks.0.cross_attn.kv_linear.weight", d, 2 * d),),
        "transformer_blocks.0.attn2.to_out.0.bias": (("blocks.0.cross_attn.proj.bias", 0, None),),
        "transformer_blocks.0.ff.net.0.proj.weight": (("blocks.0.mlp.fc1.weight", 0, None),),
        "transformer_blocks.0.ff.net.2.weight": (("blocks.0.mlp.fc2.weight", 0, None),),
        "proj_out.weight": (("final_layer.linear.weight", 0, None),),
        "scale_shift_table": (("final_layer.scale_shift_table", 0, None),),
    }
    for k, v in want.items():
        assert m[k] == v, k
    assert set(m) == set(meta_model("pixart", config).state_dict())  # covers diffusers' model exactly


# ------------------------------------------------------------------------------------------ refusals

def refused(path, *found: str) -> str:
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    msg = str(err.value)
    for word in found:
        assert word in msg, msg
    assert "Supported:" in msg and "PixArt" in msg and "SD3.5" in msg, msg
    return msg


def save(path, keys: dict[str, tuple], dtype=torch.float16):
    save_file({k: torch.zeros(s, dtype=dtype) for k, s in keys.items()}, str(path))
    return path


@pytest.mark.parametrize("keys,found", [
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 8), "lora_unet_x.alpha": ()}, "LoRA"),
    ({"transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": (4, 8)}, "LoRA"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
      "model.diffusion_model.label_emb.0.0.weight": (8, 8)}, "SDXL UNet"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)}, "SD1.x/SD2.x UNet"),
    ({"patch_embedding.weight": (8, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": (8, 8)}, "Wan"),
    ({"img_in.proj.weight": (8, 16, 1, 2, 2), "double_blocks.0.img_attn_qkv.weight": (24, 8)}, "HunyuanVideo"),
    ({"patchify_proj.weight": (8, 128), "adaln_single.linear.weight": (48, 8)}, "LTX-Video"),
    ({"encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3)}, "VAE"),
    ({"foo.weight": (2, 2), "bar.bias": (2,)}, "no known diffusion transformer"),
])
def test_other_models_are_refused_by_name(tmp_path, keys, found):
    refused(save(tmp_path / "other.safetensors", keys), found)


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    path, _ = write(tmp_path, "flux", dtype=torch.bfloat16)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    refused(tmp_path / "cut.safetensors", "truncated")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    refused(tmp_path / "tiny.safetensors", "too short")
    n = struct.unpack("<Q", data[:8])[0]
    (tmp_path / "bad.safetensors").write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:])
    refused(tmp_path / "bad.safetensors", "corrupt")
    (tmp_path / "model.pth").write_bytes(b"PK\x03\x04")
    refused(tmp_path / "model.pth", ".pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nothing.safetensors")


def test_missing_blocks_and_tensors_are_refused(tmp_path):
    path, sd = write(tmp_path, "sd3.5")
    from safetensors.torch import load_file

    stored = load_file(str(path))
    no_block = {k: v for k, v in stored.items() if not k.startswith("joint_blocks.1.")}
    save_file(no_block, str(tmp_path / "gap.safetensors"))
    refused(tmp_path / "gap.safetensors", "blocks [1] are missing")
    no_tensor = {k: v for k, v in stored.items() if k != "joint_blocks.2.x_block.mlp.fc2.weight"}
    save_file(no_tensor, str(tmp_path / "hole.safetensors"))
    refused(tmp_path / "hole.safetensors", "joint_blocks.2.x_block.mlp.fc2.weight", "incomplete")
    fat = dict(stored)
    fat["joint_blocks.0.x_block.attn.qkv.weight"] = torch.zeros(3 * 64 + 1, 64)
    save_file(fat, str(tmp_path / "odd.safetensors"))
    refused(tmp_path / "odd.safetensors", "joint_blocks.0.x_block.attn.qkv.weight")


def test_shards_open_from_the_index_or_any_shard(tmp_path):
    index, sd = write(tmp_path, "flux", layout="diffusers", shards=3)
    shard = tmp_path / "diffusion_pytorch_model-00002-of-00003.safetensors"
    for path in (index, shard, tmp_path):
        info = open_checkpoint(path)
        assert info.layout == "diffusers-sharded" and len(info.files) == 3
        assert torch.equal(load_all(info).state_dict()["proj_out.weight"], sd["proj_out.weight"])
    index.unlink()
    refused(shard, "shard 2 of 3")
    index.write_text(json.dumps({"weight_map": {"proj_out.weight": "gone.safetensors"}}))
    refused(index, "gone.safetensors")


# ------------------------------------------------------------------------------------------ today's API

def test_inspect_and_load_by_path_keep_working_for_flux(tmp_path):
    model = FluxTransformer2DModel(**CONFIGS["flux"])
    save_checkpoint(model, tmp_path / "flux.safetensors")
    config = inspect_checkpoint(tmp_path / "flux.safetensors")
    assert same_config(config, CONFIGS["flux"])
    meta = meta_model("flux", config)
    load_modules(meta, str(tmp_path / "flux.safetensors"), all_names(meta), CPU, torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(meta.state_dict()[k], v), k
    sd3, _ = write(tmp_path, "sd3")
    with pytest.raises(CheckpointError, match="Flux.1 only"):
        inspect_checkpoint(sd3)
