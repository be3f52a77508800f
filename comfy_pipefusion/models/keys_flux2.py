"""Flux.2's original single-file layout (Black Forest Labs' ``flux2`` package, as ComfyUI's UNETLoader takes it)
mapped onto diffusers' Flux2Transformer2DModel, and its configuration read from the shapes.

    img_in, txt_in                                   -> x_embedder, context_embedder
    time_in / guidance_in.{in,out}_layer             -> time_guidance_embed.{timestep,guidance}_embedder.linear_{1,2}
    double_stream_modulation_img/_txt.lin, single_stream_modulation.lin
                                                     -> the same names, ``.linear`` (shared by every block)
    double_blocks.N    img_attn/txt_attn.{qkv, norm.query_norm/key_norm.scale, proj},
                       img_mlp/txt_mlp.{0, 2}        -> transformer_blocks.N.attn.*, ff / ff_context.linear_{in,out}
    single_blocks.N    linear1 (q, k, v and the gated MLP input, fused in both layouts), linear2,
                       norm.*_norm.scale             -> single_transformer_blocks.N.attn.*
    final_layer.linear, final_layer.adaLN_modulation.1 (shift, scale)
                                                     -> proj_out, norm_out.linear (scale, shift)

No tensor has a bias. ComfyUI 0.3.75 (comfy/model_detection.py) keys the model on
``double_stream_modulation_img.lin.weight`` and fixes 48 heads, RoPE axes (32, 32, 32, 32), theta 2000 and MLP
ratio 3; it reads the width, latent channels and text width from the shapes. We read the head dimension from the
qk norms and the MLP ratio from the MLP's shape too, so small test files work; their RoPE split, when it is not
four equal parts, comes from the header metadata ``pipefusion.axes_dims_rope``.
"""
from __future__ import annotations

from .detect import DetectError, block_count, rope_axes
from .keymap import KeyMap, rename, split

ROPE_THETA = 2000  # ComfyUI's (and diffusers') for Flux.2; not in the file


def _w(out: KeyMap, target: str, source: str) -> None:
    rename(out, target, source, bias=False)


def double_block(out: KeyMap, i: int, d: int) -> None:
    t, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
    split(out, [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"], f"{o}.img_attn.qkv", [d] * 3, bias=False)
    split(out, [f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"], f"{o}.txt_attn.qkv",
          [d] * 3, bias=False)
    for norm, stream in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                         ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
        out[f"{t}.attn.{norm}.weight"] = ((f"{o}.{stream}.scale", 0, None),)
    _w(out, f"{t}.attn.to_out.0", f"{o}.img_attn.proj")
    _w(out, f"{t}.attn.to_add_out", f"{o}.txt_attn.proj")
    for ff, mlp in (("ff", "img_mlp"), ("ff_context", "txt_mlp")):
        _w(out, f"{t}.{ff}.linear_in", f"{o}.{mlp}.0")
        _w(out, f"{t}.{ff}.linear_out", f"{o}.{mlp}.2")


def single_block(out: KeyMap, i: int) -> None:
    t, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
    _w(out, f"{t}.attn.to_qkv_mlp_proj", f"{o}.linear1")
    _w(out, f"{t}.attn.to_out", f"{o}.linear2")
    out[f"{t}.attn.norm_q.weight"] = ((f"{o}.norm.query_norm.scale", 0, None),)
    out[f"{t}.attn.norm_k.weight"] = ((f"{o}.norm.key_norm.scale", 0, None),)


def original_map(config: dict) -> KeyMap:
    """diffusers key -> pieces of the original layout's tensors, for the whole model."""
    d, out = config["num_attention_heads"] * config["attention_head_dim"], {}
    _w(out, "x_embedder", "img_in")
    _w(out, "context_embedder", "txt_in")
    g = "time_guidance_embed"
    _w(out, f"{g}.timestep_embedder.linear_1", "time_in.in_layer")
    _w(out, f"{g}.timestep_embedder.linear_2", "time_in.out_layer")
    if config.get("guidance_embeds", True):
        _w(out, f"{g}.guidance_embedder.linear_1", "guidance_in.in_layer")
        _w(out, f"{g}.guidance_embedder.linear_2", "guidance_in.out_layer")
    for name in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        _w(out, f"{name}.linear", f"{name}.lin")
    for i in range(config["num_layers"]):
        double_block(out, i, d)
    for i in range(config["num_single_layers"]):
        single_block(out, i)
    _w(out, "proj_out", "final_layer.linear")
    src = "final_layer.adaLN_modulation.1.weight"  # (shift, scale) stored; diffusers' AdaLayerNormContinuous: (scale, shift)
    out["norm_out.linear.weight"] = ((src, d, 2 * d), (src, 0, d))
    return out


def config_from_shapes(shapes: dict, metadata: dict) -> dict:
    """Flux2Transformer2DModel's keyword arguments from the original layout's tensor shapes."""
    doubles, singles = block_count(shapes, "double_blocks"), block_count(shapes, "single_blocks")
    width, channels = shapes["img_in.weight"]
    if any(k.endswith(".bias") for k in shapes):
        raise DetectError(f"{next(k for k in shapes if k.endswith('.bias'))}: Flux.2 has no biases; this is "
                          "another model")
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if doubles else "single_blocks.0.norm.query_norm.scale"
    head_dim = shapes[norm][0]
    if head_dim < 1 or width % head_dim:
        raise DetectError(f"width {width} is not a multiple of the head dimension {head_dim}")
    mlp_in = shapes["double_blocks.0.img_mlp.0.weight"][0] if doubles else \
        shapes["single_blocks.0.linear1.weight"][0] - 3 * width
    hidden = mlp_in // 2
    if mlp_in % 2 or hidden % width:
        raise DetectError(f"gated MLP input of {mlp_in} rows for width {width}: Flux.2's MLP is 2 x (a whole "
                          "multiple of the width)")
    config = dict(patch_size=1, in_channels=channels, num_layers=doubles, num_single_layers=singles,
                  attention_head_dim=head_dim, num_attention_heads=width // head_dim,
                  joint_attention_dim=shapes["txt_in.weight"][1],
                  timestep_guidance_channels=shapes["time_in.in_layer.weight"][1], mlp_ratio=float(hidden // width),
                  axes_dims_rope=rope_axes(head_dim, metadata, 4), rope_theta=ROPE_THETA,
                  guidance_embeds="guidance_in.in_layer.weight" in shapes)
    out = shapes["final_layer.linear.weight"][0]
    if out != channels:
        config["out_channels"] = out
    return config


def variant(config: dict) -> str:
    depth = (config["num_layers"], config["num_single_layers"])
    name = "Flux.2-dev" if config["guidance_embeds"] else "Flux.2 (no guidance embedding)"
    return name if depth == (8, 48) else f"{name} ({depth[0]} double + {depth[1]} single blocks)"
