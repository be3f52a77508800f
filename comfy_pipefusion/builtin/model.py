"""The built-in model: Flux.1's architecture at a small size, and where its trained weights live.

The committed file ``shapes-flux.safetensors`` (next to this module) is a Flux checkpoint in diffusers'
layout, which the engine's loader and ComfyUI's PipeFusion loader read like any other Flux file (family
detection sees 48 input channels: the pixel latent of latent.py), plus the text embedding (text.py).
It has no guidance embedding, so it samples with Flux schnell's model sampling (shift 1, sigma = t).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from . import latent, text

WEIGHTS = Path(__file__).resolve().parent / "shapes-flux.safetensors"
WIDTH_TEXT = 32
CONFIG = dict(in_channels=4 * latent.CHANNELS, num_layers=2, num_single_layers=2, attention_head_dim=32,
              num_attention_heads=2, joint_attention_dim=WIDTH_TEXT, pooled_projection_dim=WIDTH_TEXT,
              guidance_embeds=False, axes_dims_rope=(4, 14, 14))
STEPS = 8  # the demo's default step count


def build(config: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised model (diffusers' own initialisation, from ``seed``) for training."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**(config or CONFIG))


def save(model: torch.nn.Module, table: torch.Tensor, path: str | Path, dtype: torch.dtype = torch.float32,
         extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the model (diffusers layout) and the text table into one safetensors file."""
    from safetensors.torch import save_file

    from ..models.checkpoint_write import _metadata

    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    tensors[text.KEY] = table.detach().float().contiguous()
    meta = {**_metadata("flux", dict(model.config)), text.VOCAB_KEY: " ".join(text.vocabulary()),
            **(extra_metadata or {})}
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def load_text(path: str | Path = WEIGHTS) -> tuple[torch.Tensor, list[str]]:
    """(embedding table [V, WIDTH], vocabulary) stored in a built-in checkpoint."""
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        if text.KEY not in fh.keys() or text.VOCAB_KEY not in meta:
            raise ValueError(f"{path} has no built-in text embedding ({text.KEY} and metadata {text.VOCAB_KEY}); "
                             "captions can only be encoded for the built-in model's checkpoint")
        return fh.get_tensor(text.KEY), meta[text.VOCAB_KEY].split()


def load_trainable(path: str | Path = WEIGHTS) -> tuple[torch.nn.Module, torch.Tensor]:
    """The whole model with its weights (float32, trainable) and the text table, e.g. to fine-tune."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    table = tensors.pop(text.KEY)
    model = build()
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model, table.float()
