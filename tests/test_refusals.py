"""Refusals stay clear: a file of a family ComfyUI 0.3.75 runs but we do not is refused by name, from the keys
ComfyUI's own model_detection decides by, with the list of what is supported; the families we run are not
caught by those rules. Synthetic headers only (zero tensors of the right names)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_pipefusion.models.checkpoint import CheckpointError, open_checkpoint
from comfy_pipefusion.models.detect import identify

OTHERS = {
    "wan": ({"head.modulation": (1, 6, 8), "patch_embedding.weight": (8, 16, 1, 2, 2),
             "blocks.0.self_attn.q.weight": (8, 8)}, "Wan"),
    "wan-head-only": ({"head.modulation": (1, 6, 8), "head.head.weight": (64, 8)}, "Wan"),
    "hunyuan-video": ({"txt_in.individual_token_refiner.blocks.0.norm1.weight": (8,),
                       "img_in.proj.weight": (8, 16, 1, 2, 2)}, "HunyuanVideo"),
    "hidream": ({"caption_projection.0.linear.weight": (8, 8), "x_embedder.proj.weight": (8, 64)}, "HiDream"),
    "lumina2": ({"cap_embedder.1.weight": (8, 16), "layers.0.attention.qkv.weight": (24, 8),
                 "t_embedder.mlp.2.weight": (8, 8), "x_embedder.weight": (8, 64)}, "Lumina 2"),
    "auraflow": ({"double_layers.0.attn.w1q.weight": (8, 8)}, "AuraFlow"),
    "cosmos": ({"blocks.block0.blocks.0.block.attn.to_q.0.weight": (8, 8)}, "Cosmos"),
    "cosmos-predict2": ({"blocks.0.mlp.layer1.weight": (8, 8), "x_embedder.proj.1.weight": (8, 68)}, "Cosmos"),
    "ltxv": ({"adaln_single.emb.timestep_embedder.linear_1.bias": (8,),
              "transformer_blocks.0.attn2.to_k.weight": (8, 8)}, "LTX-Video"),
    "mochi": ({"t5_yproj.weight": (8, 8)}, "Mochi"),
    "hunyuan-dit": ({"mlp_t5.0.weight": (8, 8)}, "Hunyuan-DiT"),
    "stable-cascade": ({"clf.1.weight": (8, 8)}, "Stable Cascade"),
    "stable-audio": ({"transformer.rotary_pos_emb.inv_freq": (4,)}, "Stable Audio"),
    "omnigen2": ({"time_caption_embed.timestep_embedder.linear_1.bias": (8,)}, "OmniGen2"),
    "ace-step": ({"genre_embedder.weight": (8, 8)}, "ACE-Step"),
    "hunyuan3d": ({"latent_in.weight": (8, 64), "cond_in.weight": (8, 16)}, "Hunyuan3D"),
    "hunyuan3d-2.1": ({"t_embedder.mlp.2.weight": (8, 8), "x_embedder.weight": (8, 64),
                       "blocks.0.attn1.to_q.weight": (8, 8)}, "Hunyuan3D 2.1"),
}


@pytest.mark.parametrize("name", list(OTHERS))
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_refused_family_is_named_with_what_is_supported(tmp_path, name, prefix):
    keys, found = OTHERS[name]
    path = tmp_path / f"{name}.safetensors"
    save_file({prefix + k: torch.zeros(s, dtype=torch.float16) for k, s in keys.items()}, str(path))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(path)
    msg = str(err.value)
    assert f"{path.name}: this is a" in msg and found in msg, msg
    for supported in ("Flux.1", "SD3.5", "PixArt", "Qwen-Image", "Z-Image"):
        assert supported in msg.split("Supported:")[1], msg


def test_supported_families_pass_the_refusal_rules():
    """ComfyUI's rules for the others do not catch ours: Z-Image shares Lumina 2's and Hunyuan3D 2.1's keys."""
    zimage = {"cap_embedder.1.weight", "cap_pad_token", "t_embedder.mlp.2.weight", "x_embedder.weight",
              "layers.0.attention.qkv.weight"}
    assert identify(zimage) == ("zimage", "original")
    assert identify({"txt_norm.weight", "img_in.weight", "transformer_blocks.0.img_mod.1.weight"}) == \
        ("qwen_image", "original")
    assert identify({"joint_blocks.0.x_block.attn.qkv.weight", "t_embedder.mlp.2.weight"}) == ("sd3", "original")
    assert identify({"t_block.1.weight", "blocks.0.attn.qkv.weight", "t_embedder.mlp.2.weight"}) == \
        ("pixart", "original")
