"""Qwen-Image's single file (as ComfyUI's UNETLoader takes it, e.g. qwen_image_bf16.safetensors) and its
diffusers shards share diffusers' key names: the adapter is the identity, written out so that the loader can
tell a complete file from a truncated one, and the configuration comes from the shapes.

    img_in [D, 64], txt_norm [3584], txt_in [D, 3584], time_text_embed.timestep_embedder.linear_1/2
    transformer_blocks.N   img_mod.1, txt_mod.1, attn.{to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,
                           to_out.0,to_add_out,norm_q,norm_k,norm_added_q,norm_added_k}, img_mlp/txt_mlp.net.{0.proj,2}
    norm_out.linear, proj_out
ComfyUI (comfy/model_detection.py) keys the family on ``txt_norm.weight`` and reads only the input channels
and the depth; it builds 24 heads of 128 over Qwen2.5-VL's 3584 wide states whatever the file holds. We read
the width, head dimension (``attn.norm_q``) and text width from the shapes, so small test files work too.
"""
from __future__ import annotations

from .detect import DetectError, block_count, rope_axes
from .keymap import KeyMap, rename

MARKERS = ("txt_norm.weight", "img_in.weight", "transformer_blocks.0.img_mod.1.weight")


def is_qwen_image(keys) -> bool:
    return all(k in keys for k in MARKERS)


def block(out: KeyMap, i: int) -> None:
    t = f"transformer_blocks.{i}"
    for name in ("img_mod.1", "txt_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                 "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
                 "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"):
        rename(out, f"{t}.{name}", f"{t}.{name}")
    for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        rename(out, f"{t}.attn.{norm}", f"{t}.attn.{norm}", bias=False)


def original_map(config: dict) -> KeyMap:
    """diffusers key -> stored key (the same name), for the whole model."""
    out: KeyMap = {}
    for name in ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
                 "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out"):
        rename(out, name, name)
    rename(out, "txt_norm", "txt_norm", bias=False)
    for i in range(config["num_layers"]):
        block(out, i)
    return out


def config_from_shapes(shapes: dict, metadata: dict) -> dict:
    """QwenImageTransformer2DModel's keyword arguments from the tensor shapes."""
    if any(k.startswith("time_text_embed.addition_t_embedding") for k in shapes):
        raise DetectError("Qwen-Image with an additional timestep condition (Qwen-Image-Layered) is not supported")
    n = block_count(shapes, "transformer_blocks")
    width, channels = shapes["img_in.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0] if n else 128
    if width % head_dim:
        raise DetectError(f"width {width} is not a multiple of the head dimension {head_dim}")
    patch_out = shapes["proj_out.weight"][0]
    if channels % 4 or patch_out % 4:
        raise DetectError(f"img_in takes {channels} and proj_out gives {patch_out} channels: Qwen-Image packs "
                          "2x2 patches (a multiple of 4 each)")
    return dict(patch_size=2, in_channels=channels, out_channels=patch_out // 4, num_layers=n,
                attention_head_dim=head_dim, num_attention_heads=width // head_dim,
                joint_attention_dim=shapes["txt_in.weight"][1], axes_dims_rope=rope_axes(head_dim, metadata))


def variant(config: dict) -> str:
    size = "" if config["num_layers"] == 60 else f" ({config['num_layers']} blocks)"
    return f"Qwen-Image{size}"
