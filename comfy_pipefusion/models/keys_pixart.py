"""PixArt-α / PixArt-Σ's original checkpoint layout (the PixArt repositories' ``PixArt``/``PixArtMS`` nets, as
ComfyUI keeps them) mapped onto diffusers' PixArtTransformer2DModel, block by block.

    blocks.N           scale_shift_table, attn.qkv = [q; k; v], attn.proj, cross_attn.q_linear,
                       cross_attn.kv_linear = [k; v], cross_attn.proj, mlp.fc1/fc2   -> transformer_blocks.N
    x_embedder.proj                                        -> pos_embed.proj
    t_embedder.mlp, csize_embedder.mlp, ar_embedder.mlp    -> adaln_single.emb.{timestep, resolution,
                                                              aspect_ratio}_embedder (α 1024 has the last two)
    t_block.1                                              -> adaln_single.linear
    y_embedder.y_proj.fc1/fc2                              -> caption_projection.linear_1/2
    final_layer.linear, final_layer.scale_shift_table      -> proj_out, scale_shift_table (a root parameter)
Not loaded: ``pos_embed`` (a fixed sin-cos table diffusers recomputes; its length gives the sample size) and
``y_embedder.y_embedding`` (the learned empty caption used for training dropout; its length tells α, 120
tokens, from Σ, 300).
"""
from __future__ import annotations

from .keymap import KeyMap, rename, split


def width(config: dict) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


def block(out: KeyMap, i: int, d: int) -> None:
    t, o = f"transformer_blocks.{i}", f"blocks.{i}"
    out[f"{t}.scale_shift_table"] = ((f"{o}.scale_shift_table", 0, None),)
    split(out, [f"{t}.attn1.to_q", f"{t}.attn1.to_k", f"{t}.attn1.to_v"], f"{o}.attn.qkv", [d] * 3)
    rename(out, f"{t}.attn1.to_out.0", f"{o}.attn.proj")
    rename(out, f"{t}.attn2.to_q", f"{o}.cross_attn.q_linear")
    split(out, [f"{t}.attn2.to_k", f"{t}.attn2.to_v"], f"{o}.cross_attn.kv_linear", [d] * 2)
    rename(out, f"{t}.attn2.to_out.0", f"{o}.cross_attn.proj")
    rename(out, f"{t}.ff.net.0.proj", f"{o}.mlp.fc1")
    rename(out, f"{t}.ff.net.2", f"{o}.mlp.fc2")


def original_map(config: dict) -> KeyMap:
    """diffusers key -> pieces of the original layout's tensors, for the whole model."""
    d, out = width(config), {}
    rename(out, "pos_embed.proj", "x_embedder.proj")
    rename(out, "adaln_single.emb.timestep_embedder.linear_1", "t_embedder.mlp.0")
    rename(out, "adaln_single.emb.timestep_embedder.linear_2", "t_embedder.mlp.2")
    if config.get("use_additional_conditions"):
        for ours, theirs in (("resolution_embedder", "csize_embedder"), ("aspect_ratio_embedder", "ar_embedder")):
            rename(out, f"adaln_single.emb.{ours}.linear_1", f"{theirs}.mlp.0")
            rename(out, f"adaln_single.emb.{ours}.linear_2", f"{theirs}.mlp.2")
    rename(out, "adaln_single.linear", "t_block.1")
    rename(out, "caption_projection.linear_1", "y_embedder.y_proj.fc1")
    rename(out, "caption_projection.linear_2", "y_embedder.y_proj.fc2")
    for i in range(config["num_layers"]):
        block(out, i, d)
    rename(out, "proj_out", "final_layer.linear")
    out["scale_shift_table"] = (("final_layer.scale_shift_table", 0, None),)
    return out
