"""Checkpoints written in every layout the loader reads, from a diffusers state dict: the inverse of the key
adapters, so tests can make small synthetic files the way real ones are laid out (names, prefixes, dtypes,
shards with their index). Not used by the engine.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import detect
from .checkpoint import INDEX_SUFFIX, ORIGINAL_MAPS
from .keymap import invert


def _metadata(family: str, config: dict) -> dict[str, str]:
    """What a small model needs beyond its shapes: head dimensions and RoPE axes that differ from the real ones."""
    if family == "zimage":
        from .keys_zimage import metadata

        return metadata(config)
    head = config["attention_head_dim"]
    if family in ("flux", "chroma", "qwen_image", "flux2"):
        axes = tuple(config.get("axes_dims_rope", (32,) * 4 if family == "flux2" else (16, 56, 56)))
        try:
            default = detect.rope_axes(head, {}, len(axes))
        except detect.DetectError:
            default = None
        return {} if axes == default else {"pipefusion.axes_dims_rope": ",".join(map(str, axes))}
    default = 72 if family == "pixart" else (None if config.get("qk_norm") else 64)
    return {} if default in (None, head) else {detect.HEAD_DIM_KEY: str(head)}


def pixart_extras(config: dict, tokens: int) -> dict[str, torch.Tensor]:
    """The two tensors real PixArt files carry that diffusers does not load: the sin-cos table (its length is the
    sample size) and the empty-caption embedding (120 tokens for α, 300 for Σ)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    grid = config["sample_size"] // config["patch_size"]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    table = get_2d_sincos_pos_embed(width, grid, base_size=grid, interpolation_scale=1.0, output_type="pt")
    return {"pos_embed": table.float().unsqueeze(0),
            "y_embedder.y_embedding": torch.randn(tokens, config["caption_channels"]) / 10}


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, small_dtype: torch.dtype | None):
    """Weights (2-D and up) in ``dtype``; vectors in ``small_dtype`` (fp8 files often keep norms and biases wider)."""
    out = {}
    for k, v in tensors.items():
        want = dtype if v.dim() >= 2 else (small_dtype or dtype)
        out[k] = (v.to(want) if want is not None else v).detach().contiguous()
    return out


def write_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], family: str, config: dict, *,
                     layout: str = "original", prefix: str = "", dtype: torch.dtype | None = None,
                     small_dtype: torch.dtype | None = None, shards: int = 1,
                     extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``state_dict`` (diffusers keys) in ``layout`` ('original' or 'diffusers'); returns what to open:
    the file, or the index of ``shards`` > 1 diffusers shards (written next to it)."""
    path = Path(path)
    tensors = invert(state_dict, ORIGINAL_MAPS[family](config)) if layout == "original" else dict(state_dict)
    tensors.update(extra or {})
    tensors = {prefix + k: v for k, v in _cast(tensors, dtype, small_dtype).items()}
    metadata = _metadata(family, config)
    if shards <= 1:
        save_file(tensors, str(path), metadata=metadata)
        return path
    keys = list(tensors)
    per = math.ceil(len(keys) / shards)
    stem = path.name.removesuffix(".safetensors")
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(path.parent / name), metadata=metadata)
        weight_map.update({k: name for k in part})
    index = path.parent / f"{stem}{INDEX_SUFFIX}"
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return index


MIXED_BLOCKS = ("double_blocks.", "joint_blocks.")  # what write_scaled_fp8(mixed=True) quantises


def quantize_scaled(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale) with per-tensor absmax scaling, as ComfyUI's fp8_scaled files."""
    scale = (w.float().abs().amax() / 448.0).clamp(min=1e-12)
    return (w.float() / scale).to(torch.float8_e4m3fn), scale.reshape(())


def write_scaled_fp8(path: str | Path, state_dict: dict[str, torch.Tensor], family: str, config: dict, *,
                     prefix: str = "", mixed: bool = False, small_dtype: torch.dtype = torch.bfloat16) -> Path:
    """A ComfyUI scaled-fp8 single file (original layout): every Linear weight (2-D) in float8 with its
    ``scale_weight`` and the ``scaled_fp8`` marker; with ``mixed``, ComfyUI's mixed-precision layout instead:
    only the transformer blocks quantised (Flux's double blocks, SD3's joint blocks: ``weight_scale``, listed in
    ``_quantization_metadata``), the rest bf16."""
    path = Path(path)
    tensors = invert(state_dict, ORIGINAL_MAPS[family](config))
    out, layers = {}, {}
    for k, v in tensors.items():
        quantise = v.dim() == 2 and k.endswith(".weight") and (not mixed or k.startswith(MIXED_BLOCKS))
        if quantise:
            out[k], scale = quantize_scaled(v)
            out[k[:-len("weight")] + ("weight_scale" if mixed else "scale_weight")] = scale
            layers[k[:-len(".weight")]] = {"format": "float8_e4m3fn"}
        else:
            out[k] = v.to(small_dtype).contiguous()
    metadata = _metadata(family, config)
    if mixed:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    else:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file({prefix + k: v for k, v in out.items()}, str(path), metadata=metadata)
    return path


_ST_DTYPES = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.bfloat16: "BF16"}


def write_synthetic_scaled_fp8(path: str | Path, family: str, config: dict, *, prefix: str = "",
                               seed: int = 0) -> Path:
    """A ComfyUI scaled-fp8 single file (as ``write_scaled_fp8``) of a model too big to hold as a state dict,
    written one tensor at a time. Weights: one 64 Mi-value pattern of standard normals quantised to float8 once,
    each matrix a slice of it from its own seeded offset (repeating after 64 Mi values), with the scale
    ``family.synthetic_value`` gives such a matrix (fan-in ** -0.5); norm scales 1 + 0.05 x noise, in bf16. So a
    multi-GB file takes as long as its disk writes, not billions of random draws."""
    from . import family as families

    fam = families.get(family)
    stored = invert(fam.build_meta(config).state_dict(), ORIGINAL_MAPS[family](config))  # meta tensors: shapes
    plan = {}  # key -> (dtype, shape)
    for k, v in stored.items():
        if v.dim() == 2 and k.endswith(".weight"):
            plan[k], plan[k[:-len("weight")] + "scale_weight"] = (torch.float8_e4m3fn, v.shape), (torch.float32, ())
        else:
            plan[k] = (torch.bfloat16, v.shape)
    plan["scaled_fp8"] = (torch.float8_e4m3fn, (0,))
    header, offset = {}, 0
    for k, (dtype, shape) in plan.items():
        n = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        header[prefix + k] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = _metadata(family, config)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    g = torch.Generator().manual_seed(seed)
    pattern, unit = quantize_scaled(torch.randn(2**26, generator=g))  # float8 codes of N(0, 1) x 1 / unit
    codes = pattern.view(torch.uint8)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for k, (dtype, shape) in plan.items():
            if k == "scaled_fp8" or k.endswith(".scale_weight"):
                continue  # written with their weight
            n = math.prod(shape)
            if dtype == torch.float8_e4m3fn:
                start = int(torch.randint(len(codes), (1,), generator=g))
                rolled = torch.cat([codes[start:], codes[:start]])
                for i in range(0, n, len(codes)):
                    f.write(rolled[:min(len(codes), n - i)].numpy().tobytes())
                scale = (unit * shape[1] ** -0.5).float().reshape(1)
                f.write(scale.numpy().tobytes())
            else:
                f.write(families.synthetic_value(k, torch.Size(shape), seed, 1, False).to(dtype)
                        .view(torch.uint8).numpy().tobytes() if n else b"")
    return path
