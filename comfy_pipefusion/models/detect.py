"""What a checkpoint is, from its key names and tensor shapes alone (headers only, no tensor data).

``identify`` names the family and layout, or refuses with what was found; ``*_config`` turn shapes into the
keyword arguments of the diffusers class. Width, depth, channels, caption and pooled widths, guidance
embedding, dual attention layers, qk norm and the position-embedding grid are all in the shapes; the head
dimension is in the shapes where the file has qk norms (Flux, SD3.5) and is otherwise each family's constant
(SD3 64, PixArt 72), overridable by the header metadata ``pipefusion.attention_head_dim`` for small test models.
"""
from __future__ import annotations

import math
import re

SUPPORTED = ("Flux.1 dev/schnell/Kontext (original single file, with or without the 'model.diffusion_model.' "
             "prefix; diffusers transformer, one file or shards with their index), Chroma (original single file, "
             "with or without the prefix; diffusers transformer), SD3 medium / SD3.5 medium / SD3.5 large "
             "(original single file, with or without the prefix; diffusers transformer), PixArt-α 512/1024 and "
             "PixArt-Σ 512/1024/2K (original layout; diffusers transformer), Qwen-Image (ComfyUI's single file, "
             "with or without the prefix, or diffusers shards), Z-Image / Z-Image Turbo (ComfyUI's single file, "
             "with or without the prefix), Flux.2 dev (ComfyUI's single file, with or without the prefix); "
             ".safetensors, weights in bf16, fp16, fp32 or float8_e4m3fn, ComfyUI's scaled-fp8 and mixed-precision "
             "files included")
PREFIXES = ("model.diffusion_model.", "module.")
HEAD_DIM_KEY = "pipefusion.attention_head_dim"


class DetectError(ValueError):
    """Not a checkpoint we can load: the message names what was found."""


def _has(keys, *names: str) -> bool:
    return all(n in keys for n in names)


def _any(keys, *parts: str) -> bool:
    return any(p in k for k in keys for p in parts)


def strip_prefix(keys) -> str:
    """The prefix the model's keys carry ('' if none): full checkpoints keep the DiT under model.diffusion_model."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def _dit_markers(keys) -> bool:
    """Keys only a supported DiT has (what ``identify`` decides the family by)."""
    return ("double_blocks.0.img_attn.qkv.weight" in keys or "double_stream_modulation_img.lin.weight" in keys or "single_blocks.0.linear1.weight" in keys
            or "distilled_guidance_layer.in_proj.weight" in keys
            or _has(keys, "x_embedder.weight", "context_embedder.weight") or _any(keys, "joint_blocks.0.x_block.")
            or (_has(keys, "t_block.1.weight") and _any(keys, "blocks.0.attn.qkv."))
            or _has(keys, "txt_norm.weight", "img_in.weight") or _has(keys, "cap_embedder.1.weight", "cap_pad_token"))


def what_else(keys: set[str]) -> str | None:
    """A name for the things we refuse (adapters, UNets, video models, other DiTs), or None.

    A VAE or text encoder riding along in an unprefixed DiT file (``vae.decoder...``) is not refused: the
    file is decided by what it holds for the diffusion model, and the loader reads only the model's keys,
    as ComfyUI's UNETLoader does."""
    lower = {k.lower() for k in keys}
    if _any(lower, "lora_", ".lora.", "lora.up", "lora.down", "lora_a.", "lora_b.", ".hada_", ".lokr_"):
        return "a LoRA / LyCORIS adapter (lora_* tensors), not a model"
    if "input_blocks.0.0.weight" in keys:
        return "an SDXL UNet" if "label_emb.0.0.weight" in keys else "an SD1.x/SD2.x UNet"
    if _has(keys, "conv_in.weight") and _any(keys, "down_blocks."):
        return "a UNet in diffusers layout"
    if (_has(keys, "patch_embedding.weight") and _any(keys, "self_attn.q.weight")) or "head.modulation" in keys:
        return "a Wan video model"
    if _any(keys, "individual_token_refiner") or "img_in.proj.weight" in keys:
        return "a HunyuanVideo model"
    if _has(keys, "patchify_proj.weight") or (_any(keys, "adaln_single.") and _any(keys, "scale_shift_table")
                                              and "pos_embed.proj.weight" not in keys):
        return "an LTX-Video model"
    if _any(keys, "t5_y_embedder."):
        return "a Mochi video model"
    if _any(keys, "nerf_blocks."):
        return "a Chroma Radiance model (pixel space), which is not supported: use Chroma"
    other = _comfy_family(keys)
    if other:
        return other
    if _dit_markers(keys):
        return None
    if _any(keys, "encoder.down.", "decoder.up."):
        return "a VAE"
    if _any(keys, "encoder.block.", "text_model.encoder."):
        return "a text encoder"
    return None


SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale")
"""Per-tensor scales of ComfyUI's scaled-fp8 files (``scale_weight``, with the marker tensor ``scaled_fp8``) and
of its mixed-precision files (``weight_scale`` on the quantised layers only, listed in the header's
``_quantization_metadata``): weight = stored float8 x scale."""
SCALED_MARKER = "scaled_fp8"


def model_keys(keys) -> set[str]:
    """The keys that are the model's tensors (without scaled-fp8 scales and marker)."""
    return {k for k in keys if k != SCALED_MARKER and not k.endswith(SCALE_SUFFIXES)}


# Families ComfyUI 0.3.75 detects (comfy/model_detection.py, by these keys) that we do not run.
COMFY_ONLY = (
    (("double_layers.0.attn.w1q.weight",), "an AuraFlow model"),
    (("mlp_t5.0.weight",), "a Hunyuan-DiT model"),
    (("clf.1.weight",), "a Stable Cascade model"),
    (("transformer.rotary_pos_emb.inv_freq",), "a Stable Audio model"),
    (("t5_yproj.weight",), "a Mochi video model"),
    (("genre_embedder.weight",), "an ACE-Step audio model"),
    (("blocks.block0.blocks.0.block.attn.to_q.0.weight",), "a Cosmos video model"),
    (("blocks.0.mlp.layer1.weight",), "a Cosmos Predict2 model"),
    (("caption_projection.0.linear.weight",), "a HiDream model"),
    (("time_caption_embed.timestep_embedder.linear_1.bias",), "an OmniGen2 model"),
    (("latent_in.weight", "cond_in.weight"), "a Hunyuan3D 2 model"),
    (("t_embedder.mlp.2.weight", "x_embedder.weight"), "a Hunyuan3D 2.1 model"),
)


def _comfy_family(keys) -> str | None:
    """A family ComfyUI runs and we do not, named from ComfyUI's own detection keys."""
    if "cap_embedder.1.weight" in keys:  # ComfyUI's Lumina 2 key (Z-Image also has t_embedder and x_embedder)
        if "cap_pad_token" in keys:
            return None
        return "a Lumina 2 model (Z-Image, which pads its caption with cap_pad_token, is supported)"
    for needed, name in COMFY_ONLY:
        if _has(keys, *needed):
            return name
    if "adaln_single.emb.timestep_embedder.linear_1.bias" in keys and "pos_embed.proj.bias" not in keys:
        return "an LTX-Video model"
    return None


def identify(keys: set[str]) -> tuple[str, str]:
    """(family, layout) of the unprefixed ``keys``: family flux|chroma|sd3|pixart|qwen_image|zimage|flux2, layout
    original|diffusers."""
    other = what_else(keys)
    if other:
        raise DetectError(f"this is {other}")
    keys = model_keys(keys)  # a scaled-fp8 file's scales and marker belong to its weights (checkpoint.py)
    if "double_stream_modulation_img.lin.weight" in keys:  # ComfyUI's Flux.2 marker (it also has Flux.1's keys)
        return "flux2", "original"
    if "double_stream_modulation_img.linear.weight" in keys:
        raise DetectError("this is Flux.2 in diffusers layout, which is not read yet: use ComfyUI's single file "
                          "(flux2_dev_fp8mixed.safetensors or the bf16 one)")
    if "distilled_guidance_layer.in_proj.weight" in keys:  # Chroma: Flux blocks, no modulation layers
        return "chroma", "original" if _any(keys, "double_blocks.", "single_blocks.") else "diffusers"
    if "double_blocks.0.img_attn.qkv.weight" in keys or "single_blocks.0.linear1.weight" in keys:
        return "flux", "original"
    if _has(keys, "x_embedder.weight", "context_embedder.weight") and _any(keys, "transformer_blocks."):
        return "flux", "diffusers"
    if _has(keys, "txt_norm.weight", "img_in.weight"):  # ComfyUI's marker; its file has diffusers' names
        return "qwen_image", "original"
    if _has(keys, "cap_embedder.1.weight", "cap_pad_token"):  # ComfyUI's Lumina 2 marker + Z-Image's padding
        if "all_x_embedder.2-1.weight" in keys:
            raise DetectError("this is Z-Image in diffusers layout, which is not read yet: use ComfyUI's single "
                              "file (z_image_turbo_bf16.safetensors)")
        return "zimage", "original"
    if _any(keys, "joint_blocks.0.x_block."):
        return "sd3", "original"
    if _has(keys, "t_block.1.weight") and _any(keys, "blocks.0.attn.qkv."):
        return "pixart", "original"
    if _has(keys, "pos_embed.proj.weight", "context_embedder.weight"):
        return "sd3", "diffusers"
    if _has(keys, "adaln_single.linear.weight", "pos_embed.proj.weight"):
        return "pixart", "diffusers"
    sample = ", ".join(sorted(keys)[:5])
    raise DetectError(f"no known diffusion transformer: {len(keys)} tensors with keys like {sample}")


def block_count(keys, prefix: str) -> int:
    """N for contiguous ``prefix.0. .. prefix.N-1.``; raises if an index is missing or N is beyond any model."""
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d{{1,9}})\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    if len(found) > BOUNDS["num_layers"][1] or max(found, default=0) >= 10 * BOUNDS["num_layers"][1]:
        raise DetectError(f"{prefix}: {len(found)} blocks numbered up to {max(found)}; no supported model has "
                          f"more than {BOUNDS['num_layers'][1]}")
    if found != set(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise DetectError(f"{prefix}: blocks {missing[:8]} are missing among 0..{max(found)}; the file is "
                          "incomplete or truncated")
    return len(found)


# Every value that sizes the model, with its bounds: a header sizes what the loader builds (on the meta device
# in ComfyUI's process, then for real on every rank), so a value beyond any real model is refused. Real
# models: width <= 3072 (Flux), blocks <= 57 (Flux 19 + 38), heads of 64..128, 16 latent channels.
BOUNDS = {"num_layers": (0, 512), "num_single_layers": (0, 512), "attention_head_dim": (1, 1024),
          "num_attention_heads": (1, 256), "in_channels": (1, 1024), "out_channels": (1, 1024),
          "joint_attention_dim": (1, 65536), "pooled_projection_dim": (1, 65536), "caption_projection_dim": (1, 65536),
          "cross_attention_dim": (1, 65536), "caption_channels": (1, 65536), "patch_size": (1, 16),
          "sample_size": (1, 4096), "pos_embed_max_size": (1, 4096), "approximator_num_channels": (2, 4096),
          "approximator_hidden_dim": (1, 65536), "approximator_layers": (1, 64), "dim": (1, 65536),
          "n_layers": (0, 512), "n_refiner_layers": (0, 64), "n_heads": (1, 256), "cap_feat_dim": (1, 65536)}
MAX_WIDTH = 65536  # heads x head dimension


def check_bounds(config: dict) -> None:
    """Refuse a configuration with a value no real model has (the message names it and the bounds)."""
    for key, (lo, hi) in BOUNDS.items():
        v = config.get(key)
        if v is not None and not (isinstance(v, int) and lo <= v <= hi):
            raise DetectError(f"{key} = {v!r} is outside {lo}..{hi}; the header does not describe a real model")
    width = config["dim"] if "dim" in config else config["attention_head_dim"] * config["num_attention_heads"]
    if width > MAX_WIDTH:
        raise DetectError(f"width {width} (heads x head dimension) is beyond {MAX_WIDTH}; the header does not "
                          "describe a real model")
    if config.get("num_layers", 0) + config.get("num_single_layers", 0) + config.get("n_layers", 0) < 1:
        raise DetectError("the header describes a model without blocks")


def _meta_int(metadata: dict, key: str, default: int) -> int:
    """An integer from the header's metadata (small test models set their head dimension), bounded."""
    raw = metadata.get(key, default)
    try:
        v = int(raw)
    except (TypeError, ValueError):
        raise DetectError(f"metadata {key} = {raw!r} is not an integer") from None
    lo, hi = BOUNDS["attention_head_dim"]
    if not lo <= v <= hi:
        raise DetectError(f"metadata {key} = {raw!r} is outside {lo}..{hi}")
    return v


def _head_dim(metadata: dict, default: int) -> int:
    return _meta_int(metadata, HEAD_DIM_KEY, default)


def rope_axes(head_dim: int, metadata: dict, count: int = 3) -> tuple[int, ...]:
    """RoPE split of a head: Flux.1's (16, 56, 56) for 128, the same proportions otherwise; with ``count`` 4,
    Flux.2's four equal parts ((32, 32, 32, 32) for 128). Small test files give theirs in the metadata."""
    if "pipefusion.axes_dims_rope" in metadata:
        raw = metadata["pipefusion.axes_dims_rope"]
        try:
            axes = tuple(int(v) for v in str(raw).split(","))
        except ValueError:
            axes = ()
        if len(axes) != count or any(a < 2 or a % 2 for a in axes) or sum(axes) != head_dim:
            raise DetectError(f"metadata pipefusion.axes_dims_rope = {raw!r} is not {count} even positive sizes "
                              f"that sum to the head dimension {head_dim}")
        return axes
    if count == 4:
        if head_dim % 8:
            raise DetectError(f"head dimension {head_dim} has no Flux.2 RoPE split (four equal even parts; Flux.2 "
                              "uses 128)")
        return (head_dim // 4,) * 4
    a0 = head_dim // 8
    a1 = (head_dim - a0) // 2
    if a0 % 2 or a1 % 2 or a0 + 2 * a1 != head_dim:
        raise DetectError(f"head dimension {head_dim} has no Flux RoPE split (Flux.1 uses 128)")
    return a0, a1, a1


def _flux(width, head_dim, channels, out_channels, doubles, singles, joint, pooled, guidance, metadata) -> dict:
    if head_dim < 1 or width % head_dim:
        raise DetectError(f"width {width} is not a multiple of the head dimension {head_dim}")
    config = dict(in_channels=channels, num_layers=doubles, num_single_layers=singles,
                  attention_head_dim=head_dim, num_attention_heads=width // head_dim, joint_attention_dim=joint,
                  pooled_projection_dim=pooled, guidance_embeds=guidance, axes_dims_rope=rope_axes(head_dim, metadata))
    if out_channels != channels:
        config["out_channels"] = out_channels
    return config


def flux_original_config(shapes: dict, metadata: dict) -> dict:
    doubles, singles = block_count(shapes, "double_blocks"), block_count(shapes, "single_blocks")
    width, channels = shapes["img_in.weight"]
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if doubles else "single_blocks.0.norm.query_norm.scale"
    if doubles and shapes["double_blocks.0.img_mlp.0.weight"][0] != 4 * width:
        raise DetectError(f"MLP width {shapes['double_blocks.0.img_mlp.0.weight'][0]} for width {width}: "
                          "diffusers' Flux has MLP ratio 4")
    return _flux(width, shapes[norm][0], channels, shapes["final_layer.linear.weight"][0], doubles, singles,
                 shapes["txt_in.weight"][1], shapes["vector_in.in_layer.weight"][1],
                 "guidance_in.in_layer.weight" in shapes, metadata)


def flux_diffusers_config(shapes: dict, metadata: dict) -> dict:
    doubles = block_count(shapes, "transformer_blocks")
    singles = block_count(shapes, "single_transformer_blocks")
    width, channels = shapes["x_embedder.weight"]
    norm = "transformer_blocks.0.attn.norm_q.weight" if doubles else "single_transformer_blocks.0.attn.norm_q.weight"
    return _flux(width, shapes[norm][0], channels, shapes["proj_out.weight"][0], doubles, singles,
                 shapes["context_embedder.weight"][1], shapes["time_text_embed.text_embedder.linear_1.weight"][1],
                 any(k.startswith("time_text_embed.guidance_embedder.") for k in shapes), metadata)


def chroma_config(shapes: dict, metadata: dict, layout: str) -> dict:
    """ChromaTransformer2DModel's arguments from either layout (the approximator's sizes are in its shapes)."""
    g = "distilled_guidance_layer"
    hidden, channels = shapes[f"{g}.in_proj.weight"]
    if layout == "original":
        doubles, singles = block_count(shapes, "double_blocks"), block_count(shapes, "single_blocks")
        width, latent = shapes["img_in.weight"]
        norm = "double_blocks.0.img_attn.norm.query_norm.scale" if doubles else "single_blocks.0.norm.query_norm.scale"
        joint, out = shapes["txt_in.weight"][1], shapes["final_layer.linear.weight"][0]
    else:
        doubles, singles = block_count(shapes, "transformer_blocks"), block_count(shapes, "single_transformer_blocks")
        width, latent = shapes["x_embedder.weight"]
        norm = "transformer_blocks.0.attn.norm_q.weight" if doubles else "single_transformer_blocks.0.attn.norm_q.weight"
        joint, out = shapes["context_embedder.weight"][1], shapes["proj_out.weight"][0]
    head_dim = shapes[norm][0]
    if shapes[f"{g}.out_proj.weight"][0] != width:
        raise DetectError(f"Chroma's approximator gives width {shapes[f'{g}.out_proj.weight'][0]} for blocks of "
                          f"width {width}")
    if head_dim < 1 or width % head_dim:
        raise DetectError(f"width {width} is not a multiple of the head dimension {head_dim}")
    config = dict(in_channels=latent, num_layers=doubles, num_single_layers=singles, attention_head_dim=head_dim,
                  num_attention_heads=width // head_dim, joint_attention_dim=joint,
                  axes_dims_rope=rope_axes(head_dim, metadata), approximator_num_channels=channels,
                  approximator_hidden_dim=hidden, approximator_layers=block_count(shapes, f"{g}.layers"))
    if out != latent:
        config["out_channels"] = out
    return config


def sd3_original_config(shapes: dict, metadata: dict) -> dict:
    n = block_count(shapes, "joint_blocks")
    width, channels, patch, _ = shapes["x_embedder.proj.weight"]
    qk = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
    if "joint_blocks.0.x_block.attn.ln_q.bias" in shapes:
        raise DetectError("SD3 with LayerNorm qk norms (ln_q.bias): only RMS qk norms (SD3.5) are supported")
    head_dim = shapes["joint_blocks.0.x_block.attn.ln_q.weight"][0] if qk else _head_dim(metadata, 64)
    grid = math.isqrt(shapes["pos_embed"][1])
    if grid * grid != shapes["pos_embed"][1]:
        raise DetectError(f"SD3 pos_embed of {shapes['pos_embed'][1]} positions is not a square grid")
    dual = sorted({int(k.split(".")[1]) for k in shapes if ".x_block.attn2." in k})
    return dict(sample_size=128, patch_size=patch, in_channels=channels, num_layers=n, attention_head_dim=head_dim,
                num_attention_heads=width // head_dim, joint_attention_dim=shapes["context_embedder.weight"][1],
                caption_projection_dim=width, pooled_projection_dim=shapes["y_embedder.mlp.0.weight"][1],
                out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch), pos_embed_max_size=grid,
                dual_attention_layers=tuple(dual), qk_norm="rms_norm" if qk else None)


def sd3_variant(config: dict) -> str:
    n, dual = config["num_layers"], bool(config["dual_attention_layers"])
    names = {(24, False): "SD3 medium", (24, True): "SD3.5 medium", (38, False): "SD3.5 large"}
    return names.get((n, dual), f"SD3-family MMDiT ({n} blocks{', dual attention' if dual else ''})")


PIXART_SIZES = {"256": 32, "512": 64, "1024": 128, "2048": 256, "2k": 256}


def pixart_sample_size(shapes: dict, patch: int, filename: str) -> int:
    """Latent size the model was trained at: from its stored sin-cos table, else the file name, else 1024's."""
    if "pos_embed" in shapes:
        grid = math.isqrt(shapes["pos_embed"][1])
        return grid * patch
    m = re.search(r"(?<![0-9a-z])(256|512|1024|2048|2k)(?![0-9])", filename.lower())
    return PIXART_SIZES[m.group(1)] if m else 128


def pixart_original_config(shapes: dict, metadata: dict, filename: str) -> dict:
    if any(".attn.q_norm." in k for k in shapes):
        raise DetectError("PixArt with qk norms (attn.q_norm): diffusers' PixArtTransformer2DModel has none")
    if any(".attn.sr." in k for k in shapes):
        raise DetectError("PixArt-Σ with KV compression (attn.sr): diffusers' PixArtTransformer2DModel has none")
    n = block_count(shapes, "blocks")
    width, channels, patch, _ = shapes["x_embedder.proj.weight"]
    head_dim = _head_dim(metadata, 72)
    if width % head_dim:
        raise DetectError(f"PixArt width {width} is not a multiple of the head dimension {head_dim}")
    return dict(num_attention_heads=width // head_dim, attention_head_dim=head_dim, in_channels=channels,
                out_channels=shapes["final_layer.linear.weight"][0] // (patch * patch), num_layers=n,
                cross_attention_dim=width, attention_bias=True,
                sample_size=pixart_sample_size(shapes, patch, filename), patch_size=patch,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6,
                caption_channels=shapes["y_embedder.y_proj.fc1.weight"][1],
                use_additional_conditions="csize_embedder.mlp.0.weight" in shapes)


def pixart_variant(shapes: dict, config: dict) -> str:
    """α (120 caption tokens, SD1.5 latents) or Σ (300 tokens, SDXL latents), and its resolution."""
    tokens = shapes.get("y_embedder.y_embedding", [None])[0]
    version = {120: "α", 300: "Σ"}.get(tokens) or ("α" if config["use_additional_conditions"] else "α or Σ")
    size = config["sample_size"] * 8
    return f"PixArt-{version} {'2K' if size == 2048 else size}"
