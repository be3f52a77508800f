"""SD3 and PixArt in diffusers' own layout (a ``transformer/diffusion_pytorch_model.safetensors``, one file or
shards with their index, or such a file copied into ``models/diffusion_models``): the keys are the model's own,
so the adapter is the identity and only the configuration has to come from the shapes, as ``detect`` does for
the original layouts. The expected key set (what makes a file complete) is the original adapters' target set.
"""
from __future__ import annotations

import math

from .detect import DetectError, _head_dim, block_count, pixart_sample_size


def sd3_config(shapes: dict, metadata: dict) -> dict:
    """SD3Transformer2DModel's keyword arguments from a diffusers-layout file's shapes."""
    n = block_count(shapes, "transformer_blocks")
    width, channels, patch, _ = shapes["pos_embed.proj.weight"]
    qk = "transformer_blocks.0.attn.norm_q.weight" in shapes
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0] if qk else _head_dim(metadata, 64)
    if width % head_dim:
        raise DetectError(f"SD3 width {width} is not a multiple of the head dimension {head_dim}")
    if "pos_embed.pos_embed" not in shapes:
        raise DetectError("SD3 without its position table (pos_embed.pos_embed): the file is incomplete")
    positions = shapes["pos_embed.pos_embed"][1]
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise DetectError(f"SD3 pos_embed.pos_embed of {positions} positions is not a square grid")
    dual = sorted({int(k.split(".")[1]) for k in shapes if ".attn2." in k and k.startswith("transformer_blocks.")})
    return dict(sample_size=128, patch_size=patch, in_channels=channels, num_layers=n, attention_head_dim=head_dim,
                num_attention_heads=width // head_dim, joint_attention_dim=shapes["context_embedder.weight"][1],
                caption_projection_dim=width,
                pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
                out_channels=shapes["proj_out.weight"][0] // (patch * patch), pos_embed_max_size=grid,
                dual_attention_layers=tuple(dual), qk_norm="rms_norm" if qk else None)


def pixart_config(shapes: dict, metadata: dict, filename: str) -> dict:
    """PixArtTransformer2DModel's keyword arguments from a diffusers-layout file's shapes."""
    n = block_count(shapes, "transformer_blocks")
    width, channels, patch, _ = shapes["pos_embed.proj.weight"]
    head_dim = _head_dim(metadata, 72)
    if width % head_dim:
        raise DetectError(f"PixArt width {width} is not a multiple of the head dimension {head_dim}")
    return dict(num_attention_heads=width // head_dim, attention_head_dim=head_dim, in_channels=channels,
                out_channels=shapes["proj_out.weight"][0] // (patch * patch), num_layers=n,
                cross_attention_dim=width, attention_bias=True,
                sample_size=pixart_sample_size({}, patch, filename), patch_size=patch,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6,
                caption_channels=shapes["caption_projection.linear_1.weight"][1],
                use_additional_conditions="adaln_single.emb.resolution_embedder.linear_1.weight" in shapes)
