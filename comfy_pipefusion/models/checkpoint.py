"""Flux checkpoints on disk: detect the configuration from key names and shapes, and load one rank's
modules straight from the safetensors file (memory-mapped, tensor by tensor).

Layout read here: diffusers' FluxTransformer2DModel state dict in one file (``transformer_blocks.N.*``,
``single_transformer_blocks.N.*``, ``x_embedder``, ...). Anything else is refused before any worker
starts, with what was found and what is supported.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

SUPPORTED = "Flux.1 transformer in diffusers layout (one .safetensors file)"
_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.")


class CheckpointError(ValueError):
    """The file is not a checkpoint we can load; the message says what was found and what is supported."""


def read_shapes(path: str | Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """{key: shape} and the header metadata, without reading any tensor data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except CheckpointError:
        raise
    except Exception as exc:  # truncated, not safetensors, ...
        raise CheckpointError(f"{path.name} is not a readable safetensors file ({exc}); "
                              f"supported: {SUPPORTED}") from exc


def rope_axes(head_dim: int, metadata: dict) -> tuple[int, int, int]:
    """RoPE split of a head: Flux.1's (16, 56, 56) for 128, the same proportions otherwise."""
    if "pipefusion.axes_dims_rope" in metadata:
        return tuple(int(v) for v in metadata["pipefusion.axes_dims_rope"].split(","))
    a0 = head_dim // 8
    a1 = (head_dim - a0) // 2
    if a0 % 2 or a1 % 2 or a0 + 2 * a1 != head_dim:
        raise CheckpointError(f"head dimension {head_dim} has no Flux RoPE split (Flux.1 uses 128)")
    return a0, a1, a1


def detect_flux(shapes: dict[str, list[int]], metadata: dict, name: str = "checkpoint") -> dict:
    """FluxTransformer2DModel kwargs from key names and shapes."""
    if "x_embedder.weight" not in shapes or "context_embedder.weight" not in shapes:
        found = ", ".join(sorted(shapes)[:4]) or "no tensors"
        raise CheckpointError(f"{name} is not a {SUPPORTED}: found keys like {found}")
    doubles = {int(m.group(1)) for k in shapes if (m := _DOUBLE.match(k))}
    singles = {int(m.group(1)) for k in shapes if (m := _SINGLE.match(k))}
    if doubles != set(range(len(doubles))) or singles != set(range(len(singles))) or not doubles | singles:
        raise CheckpointError(f"{name}: block indices are not contiguous (double {sorted(doubles)}, "
                              f"single {sorted(singles)}); the file looks truncated")
    width, channels = shapes["x_embedder.weight"]
    norm = "transformer_blocks.0.attn.norm_q.weight" if doubles else "single_transformer_blocks.0.attn.norm_q.weight"
    head_dim = shapes[norm][0]
    return dict(in_channels=channels, num_layers=len(doubles), num_single_layers=len(singles),
                attention_head_dim=head_dim, num_attention_heads=width // head_dim,
                joint_attention_dim=shapes["context_embedder.weight"][1],
                pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
                guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in shapes),
                axes_dims_rope=rope_axes(head_dim, metadata))


def inspect_checkpoint(path: str | Path) -> dict:
    """Detected configuration of ``path`` (reads the header only); raises CheckpointError."""
    shapes, metadata = read_shapes(path)
    return detect_flux(shapes, metadata, Path(path).name)


def load_modules(model: torch.nn.Module, path: str | Path, names: list[str], device: torch.device,
                 dtype: torch.dtype) -> None:
    """Fill the submodules ``names`` of a meta-device model from ``path``; others stay on meta."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        for name in names:
            sub = model.get_submodule(name)
            sub.to_empty(device=device)
            for pname, p in sub.named_parameters(prefix=name):
                if pname not in keys:
                    raise CheckpointError(f"{Path(path).name} has no tensor {pname}: the file is incomplete")
                with torch.no_grad():
                    p.copy_(f.get_tensor(pname))
            sub.to(dtype)


def save_checkpoint(model: torch.nn.Module, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write a full model in the layout ``load_modules`` reads (used for tests and examples)."""
    from safetensors.torch import save_file

    axes = ",".join(str(a) for a in model.config.axes_dims_rope)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"pipefusion.axes_dims_rope": axes})
