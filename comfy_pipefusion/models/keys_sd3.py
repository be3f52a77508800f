"""SD3 / SD3.5's original single-file layout (Stability's MMDiT, as ComfyUI keeps it) mapped onto diffusers'
SD3Transformer2DModel, block by block.

    joint_blocks.N.x_block        attn.{qkv, ln_q, ln_k, proj}, attn2.* (SD3.5 medium's dual attention),
                                  adaLN_modulation.1, mlp.fc1/fc2          -> transformer_blocks.N (image side)
    joint_blocks.N.context_block  attn.{qkv, ln_q, ln_k, proj}, adaLN_modulation.1, mlp.fc1/fc2
                                                                           -> transformer_blocks.N (text side)
    the last block's context_block is "pre only": no attn.proj and no mlp, and its adaLN_modulation holds
    (shift, scale), which diffusers keeps as (scale, shift); the same swap for final_layer.adaLN_modulation.1.
    pos_embed, x_embedder.proj, t_embedder.mlp, y_embedder.mlp, context_embedder, final_layer.linear
                                                 -> pos_embed.{pos_embed, proj}, time_text_embed, proj_out
"""
from __future__ import annotations

from .keymap import KeyMap, rename, split, swap_halves


def width(config: dict) -> int:
    return config["num_attention_heads"] * config["attention_head_dim"]


def joint_block(out: KeyMap, i: int, d: int, last: bool, dual: bool, qk_norm: bool) -> None:
    t, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
    split(out, [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"], f"{x}.attn.qkv", [d] * 3)
    split(out, [f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"], f"{c}.attn.qkv", [d] * 3)
    if qk_norm:
        for norm, src in (("attn.norm_q", f"{x}.attn.ln_q"), ("attn.norm_k", f"{x}.attn.ln_k"),
                          ("attn.norm_added_q", f"{c}.attn.ln_q"), ("attn.norm_added_k", f"{c}.attn.ln_k")):
            rename(out, f"{t}.{norm}", src, bias=False)
    rename(out, f"{t}.attn.to_out.0", f"{x}.attn.proj")
    if dual:
        split(out, [f"{t}.attn2.to_q", f"{t}.attn2.to_k", f"{t}.attn2.to_v"], f"{x}.attn2.qkv", [d] * 3)
        if qk_norm:
            rename(out, f"{t}.attn2.norm_q", f"{x}.attn2.ln_q", bias=False)
            rename(out, f"{t}.attn2.norm_k", f"{x}.attn2.ln_k", bias=False)
        rename(out, f"{t}.attn2.to_out.0", f"{x}.attn2.proj")
    rename(out, f"{t}.norm1.linear", f"{x}.adaLN_modulation.1")
    rename(out, f"{t}.ff.net.0.proj", f"{x}.mlp.fc1")
    rename(out, f"{t}.ff.net.2", f"{x}.mlp.fc2")
    if last:
        swap_halves(out, f"{t}.norm1_context.linear", f"{c}.adaLN_modulation.1", d)
        return
    rename(out, f"{t}.attn.to_add_out", f"{c}.attn.proj")
    rename(out, f"{t}.norm1_context.linear", f"{c}.adaLN_modulation.1")
    rename(out, f"{t}.ff_context.net.0.proj", f"{c}.mlp.fc1")
    rename(out, f"{t}.ff_context.net.2", f"{c}.mlp.fc2")


def original_map(config: dict) -> KeyMap:
    """diffusers key -> pieces of the original layout's tensors, for the whole model."""
    d, n, out = width(config), config["num_layers"], {}
    out["pos_embed.pos_embed"] = (("pos_embed", 0, None),)
    rename(out, "pos_embed.proj", "x_embedder.proj")
    rename(out, "time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    rename(out, "time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    rename(out, "time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    rename(out, "time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    rename(out, "context_embedder", "context_embedder")
    dual = set(config.get("dual_attention_layers", ()))
    for i in range(n):
        joint_block(out, i, d, i == n - 1, i in dual, config.get("qk_norm") is not None)
    rename(out, "proj_out", "final_layer.linear")
    swap_halves(out, "norm_out.linear", "final_layer.adaLN_modulation.1", d)
    return out
