"""Z-Image's single file as ComfyUI's UNETLoader takes it (z_image_turbo_bf16.safetensors: the authors' names,
ComfyUI's Lumina 2 model with z_image_modulation) mapped onto diffusers' ZImageTransformer2DModel.

    x_embedder, final_layer.{linear, adaLN_modulation.1}     -> all_x_embedder.2-1, all_final_layer.2-1
    {noise_refiner, context_refiner, layers}.N.attention.qkv -> attention.to_q / to_k / to_v (thirds, no bias)
    ...attention.out, attention.q_norm / k_norm              -> attention.to_out.0, attention.norm_q / norm_k
    everything else (t_embedder, cap_embedder, pad tokens, feed_forward, norms, adaLN_modulation): same name
ComfyUI (comfy/model_detection.py) keys Lumina 2 on ``cap_embedder.1.weight`` and takes width 3840 for Z-Image
(30 heads of 128, RoPE axes 32/48/48, theta 256); ``cap_pad_token`` marks the padding Z-Image uses. We read the
width, head dimension (``q_norm``), depth and caption width from the shapes, so small test files work too.
"""
from __future__ import annotations

from .detect import DetectError, block_count
from .keymap import KeyMap, rename, split

AXES_KEY = "pipefusion.axes_dims_rope"
REAL_AXES = (32, 48, 48)


def block(out: KeyMap, name: str, width: int, modulation: bool) -> None:
    split(out, [f"{name}.attention.to_q", f"{name}.attention.to_k", f"{name}.attention.to_v"],
          f"{name}.attention.qkv", [width] * 3, bias=False)
    rename(out, f"{name}.attention.to_out.0", f"{name}.attention.out", bias=False)
    rename(out, f"{name}.attention.norm_q", f"{name}.attention.q_norm", bias=False)
    rename(out, f"{name}.attention.norm_k", f"{name}.attention.k_norm", bias=False)
    for n in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention_norm1", "attention_norm2",
              "ffn_norm1", "ffn_norm2"):
        rename(out, f"{name}.{n}", f"{name}.{n}", bias=False)
    if modulation:
        rename(out, f"{name}.adaLN_modulation.0", f"{name}.adaLN_modulation.0")


def original_map(config: dict) -> KeyMap:
    """diffusers key -> pieces of the single file's tensors, for the whole model."""
    d, out = config["dim"], {}
    rename(out, "all_x_embedder.2-1", "x_embedder")
    rename(out, "all_final_layer.2-1.linear", "final_layer.linear")
    rename(out, "all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1")
    for name in ("t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1"):
        rename(out, name, name)
    rename(out, "cap_embedder.0", "cap_embedder.0", bias=False)
    for token in ("x_pad_token", "cap_pad_token"):
        out[token] = ((token, 0, None),)
    for i in range(config["n_refiner_layers"]):
        block(out, f"noise_refiner.{i}", d, True)
        block(out, f"context_refiner.{i}", d, False)
    for i in range(config["n_layers"]):
        block(out, f"layers.{i}", d, True)
    return out


def config_from_shapes(shapes: dict, metadata: dict) -> dict:
    """ZImageTransformer2DModel's keyword arguments from the tensor shapes."""
    if any(k.startswith("siglip_") for k in shapes):
        raise DetectError("Z-Image Omni (SigLIP image conditioning) is not supported")
    n, refiners = block_count(shapes, "layers"), block_count(shapes, "noise_refiner")
    if block_count(shapes, "context_refiner") != refiners:
        raise DetectError(f"{refiners} noise refiner blocks but a different number of context refiner blocks")
    dim, cap_dim = shapes["cap_embedder.1.weight"]
    channels = shapes["x_embedder.weight"][1] // 4
    head_dim = shapes["layers.0.attention.q_norm.weight"][0] if n else 128
    if dim % head_dim:
        raise DetectError(f"width {dim} is not a multiple of the head dimension {head_dim}")
    axes = REAL_AXES
    if AXES_KEY in metadata:
        try:
            axes = tuple(int(v) for v in str(metadata[AXES_KEY]).split(","))
        except ValueError:
            axes = ()
    if len(axes) != 3 or any(a < 2 or a % 2 for a in axes) or sum(axes) != head_dim:
        raise DetectError(f"RoPE axes {axes} do not split the head dimension {head_dim} (Z-Image uses 128 = "
                          f"32 + 48 + 48; a small model names its split in metadata {AXES_KEY})")
    return dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=channels, dim=dim, n_layers=n,
                n_refiner_layers=refiners, n_heads=dim // head_dim, n_kv_heads=dim // head_dim, norm_eps=1e-5,
                qk_norm=True, cap_feat_dim=cap_dim, rope_theta=256.0, t_scale=1000.0, axes_dims=axes,
                axes_lens=(1536, 512, 512))


def metadata(config: dict) -> dict[str, str]:
    """What a small model's file needs beyond its shapes: its RoPE split."""
    axes = tuple(config["axes_dims"])
    return {} if axes == REAL_AXES else {AXES_KEY: ",".join(map(str, axes))}


def variant(config: dict) -> str:
    size = "" if config["n_layers"] == 30 else f" ({config['n_layers']} layers)"
    return f"Z-Image{size}"
