"""Flux.1's original single-file layout (Black Forest Labs' ``flux`` package, as ComfyUI keeps it) mapped onto
diffusers' FluxTransformer2DModel, block by block.

    double_blocks.N    img_mod/txt_mod.lin, img_attn/txt_attn.{qkv, norm.query_norm/key_norm.scale, proj},
                       img_mlp/txt_mlp.{0, 2}               -> transformer_blocks.N
    single_blocks.N    modulation.lin, linear1 = [q; k; v; mlp in], norm.*_norm.scale, linear2
                                                            -> single_transformer_blocks.N
    img_in, txt_in, time_in, vector_in, guidance_in          -> x_embedder, context_embedder, time_text_embed
    final_layer.linear, final_layer.adaLN_modulation.1 (shift, scale)
                                                            -> proj_out, norm_out.linear (scale, shift)
"""
from __future__ import annotations

from .keymap import KeyMap, rename, split, swap_halves

MLP_RATIO = 4  # diffusers' Flux blocks have a fixed MLP ratio


def width(config: dict) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


def double_block(out: KeyMap, i: int, d: int) -> None:
    t, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
    rename(out, f"{t}.norm1.linear", f"{o}.img_mod.lin")
    rename(out, f"{t}.norm1_context.linear", f"{o}.txt_mod.lin")
    split(out, [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"], f"{o}.img_attn.qkv", [d] * 3)
    split(out, [f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"], f"{o}.txt_attn.qkv",
          [d] * 3)
    for norm, stream in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
        out[f"{t}.attn.{norm}.weight"] = ((f"{o}.{stream}.scale", 0, None),)
    rename(out, f"{t}.attn.to_out.0", f"{o}.img_attn.proj")
    rename(out, f"{t}.attn.to_add_out", f"{o}.txt_attn.proj")
    rename(out, f"{t}.ff.net.0.proj", f"{o}.img_mlp.0")
    rename(out, f"{t}.ff.net.2", f"{o}.img_mlp.2")
    rename(out, f"{t}.ff_context.net.0.proj", f"{o}.txt_mlp.0")
    rename(out, f"{t}.ff_context.net.2", f"{o}.txt_mlp.2")


def single_block(out: KeyMap, i: int, d: int) -> None:
    t, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
    rename(out, f"{t}.norm.linear", f"{o}.modulation.lin")
    split(out, [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"], f"{o}.linear1",
          [d, d, d, MLP_RATIO * d])
    out[f"{t}.attn.norm_q.weight"] = ((f"{o}.norm.query_norm.scale", 0, None),)
    out[f"{t}.attn.norm_k.weight"] = ((f"{o}.norm.key_norm.scale", 0, None),)
    rename(out, f"{t}.proj_out", f"{o}.linear2")


def original_map(config: dict) -> KeyMap:
    """diffusers key -> pieces of the original layout's tensors, for the whole model."""
    d, out = width(config), {}
    rename(out, "time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    rename(out, "time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    rename(out, "time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    rename(out, "time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if config.get("guidance_embeds", False):
        rename(out, "time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        rename(out, "time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    rename(out, "context_embedder", "txt_in")
    rename(out, "x_embedder", "img_in")
    for i in range(config["num_layers"]):
        double_block(out, i, d)
    for i in range(config["num_single_layers"]):
        single_block(out, i, d)
    rename(out, "proj_out", "final_layer.linear")
    swap_halves(out, "norm_out.linear", "final_layer.adaLN_modulation.1", d)
    return out
