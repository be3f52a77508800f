"""What the engine needs from a model family, and the parts every family shares.

A family is a module (``flux``, ``sd3``, ``pixart``) with these names; the engine only talks to them:

    NAME: str                          "flux" | "sd3" | "pixart"
    JOINT_TEXT: bool                   text tokens share the attention sequence ([text; image]: Flux, SD3)
                                       or enter by cross-attention (PixArt: spans carry no text tokens)
    PRESETS: dict                      built-in random-weight models: {name: dict(config=..., text_tokens=,
                                       height=, width=, steps=)}
    SHARED_MODULES, FIRST_MODULES, LAST_MODULES
                                       names (submodules, or parameters of the root module) that every rank,
                                       the first stage, the last stage hold besides its blocks
    build_meta(config) -> nn.Module    the diffusers model on the meta device
    blocks_of(model) -> list[Block]    transformer blocks in execution order
    block_cost(model, block, balance) -> float
    TEXT_ENCODERS: str                 which ComfyUI text encoders make this family's CONDITIONING (the
                                       nodes' hint when a prompt's width does not fit)
    latent_format(config) -> LatentFormat
                                       channels, scale and shift of the LATENT, and the ComfyUI node that
                                       makes an empty one (``empty_node``: the nodes' hint)
    conditioning_dims(config) -> (text width, pooled width or None)
    kv_buffers(model, block, make) -> tuple
                                       the block's attention state, always a tuple of buffers (no None
                                       entries; SD3.5's dual-attention blocks hold two); ``make(kind)``
                                       builds one buffer over the "joint" sequence or the "image" tokens
                                       only; "image" buffers are written with text-free spans
    embeddings(model, txt, n_txt, rows, cols, device, dtype) -> object
                                       once per job and rank: ``.txt`` (embedded text, or None when ``txt`` is
                                       None: the engine passes the text only where it is needed, i.e. on the
                                       first stage for JOINT_TEXT families and on every rank otherwise),
                                       ``.for_span(span)`` (what the blocks need for a span's positions,
                                       e.g. RoPE: passed to run_blocks as ``pos``), ``.extra`` (anything else)
    time_embedding(model, emb, t, pooled, guidance, dtype) -> object
                                       per evaluation; ``t`` is the model sampling's timestep [MB] (what
                                       diffusers' forward takes); the object may carry per-job state
    embed_image(model, emb, x, span) -> [B, L, D]
                                       packed latent tokens of the span -> hidden states (with positions)
    run_blocks(model, blocks, kvs, span, txt, img, temb, pos) -> (txt or None, img)
    final_layer(model, img, temb) -> [MB, L, C]  the model output (velocity or eps), packed like the
                                       latent; the model sampling turns it into a denoised latent
    forward(model, x, t, txt, pooled, guidance, rows, cols) -> [B, S, C]
                                       diffusers' own forward over the whole latent: the serial reference
"""
from __future__ import annotations

import importlib
import zlib
from dataclasses import dataclass, field

import torch

FAMILIES = ("flux", "sd3", "pixart")


def get(name: str):
    """The family module called ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: supported are {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__package__}.{name}")


def find_preset(preset: str) -> tuple[object, dict]:
    """(family module, preset) for a built-in model name such as ``tiny``, ``sd3-tiny``, ``pixart-tiny``."""
    names = []
    for fam_name in FAMILIES:
        fam = get(fam_name)
        if preset in fam.PRESETS:
            return fam, fam.PRESETS[preset]
        names += list(fam.PRESETS)
    raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(names)}")


@dataclass(frozen=True)
class Block:
    """One transformer block in execution order: ``prefix`` is its module name in the model."""

    kind: str
    index: int
    prefix: str


@dataclass(frozen=True)
class LatentFormat:
    """ComfyUI's latent format: LATENT = sampling / scale + shift."""

    channels: int
    scale: float
    shift: float = 0.0
    empty_node: str = field(default="EmptyLatentImage", compare=False)
    """The ComfyUI node that makes an empty latent of this format (named in the nodes' errors)."""

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.shift) * self.scale

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale + self.shift


def module_of(model: torch.nn.Module, block: Block) -> torch.nn.Module:
    return model.get_submodule(block.prefix)


def pack_latent(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latent -> [B, (h/2)(w/2), 4C] tokens, row-major, channels (c, ph, pw)."""
    b, c, h, w = latent.shape
    x = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latent(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latent`` for a latent of ``h`` x ``w``."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def holds(model: torch.nn.Module, name: str) -> bool:
    """Whether ``name`` names something with weights (a submodule with parameters, or a parameter)."""
    try:
        return any(True for _ in model.get_submodule(name).parameters())
    except AttributeError:
        return isinstance(getattr(model, name, None), torch.nn.Parameter)


def all_names(model: torch.nn.Module) -> list[str]:
    """Every top-level name holding weights: what a rank that holds the whole model materialises."""
    subs = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    return subs + [n for n, _ in model.named_parameters(recurse=False)]


def named_tensors(model: torch.nn.Module, name: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(full name, parameter) under ``name``: a submodule's parameters or the root parameter itself."""
    param = getattr(model, name, None)
    if isinstance(param, torch.nn.Parameter):
        return [(name, param)]
    return list(model.get_submodule(name).named_parameters(prefix=name))


def allocate(model: torch.nn.Module, name: str, device: torch.device) -> None:
    """Give ``name`` real (uninitialised) storage on ``device``; other names stay on the meta device."""
    param = getattr(model, name, None)
    if isinstance(param, torch.nn.Parameter):
        setattr(model, name, torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=False))
    else:
        model.get_submodule(name).to_empty(device=device)


def cast(model: torch.nn.Module, name: str, dtype: torch.dtype) -> None:
    param = getattr(model, name, None)
    if isinstance(param, torch.nn.Parameter):
        setattr(model, name, torch.nn.Parameter(param.data.to(dtype), requires_grad=False))
    else:
        model.get_submodule(name).to(dtype)


def synthetic_value(name: str, shape: torch.Size, seed: int, depth: int, residual: bool) -> torch.Tensor:
    """Deterministic weight for parameter ``name``: the same on every rank, for any split.

    Norm scales near 1, other vectors small, matrices scaled by fan-in; ``residual`` branches are scaled
    down with depth so the residual stream keeps its scale.
    """
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) ^ seed) & 0x7FFFFFFF)
    x = torch.randn(shape, generator=g)
    if len(shape) == 1:
        return 1.0 + 0.05 * x if "norm" in name else 0.02 * x
    scale = shape[1] ** -0.5 if len(shape) == 2 else (x[0].numel()) ** -0.5
    if residual:
        scale /= (2 * depth) ** 0.5
    return scale * x


def materialize(model: torch.nn.Module, names: list[str], device: torch.device, dtype: torch.dtype,
                seed: int, depth: int, residual) -> None:
    """Allocate and fill only ``names`` with synthetic weights; ``residual(param_name)`` marks the
    parameters that end a residual branch."""
    for name in names:
        allocate(model, name, device)
        for pname, p in named_tensors(model, name):
            with torch.no_grad():
                p.copy_(synthetic_value(pname, p.shape, seed, depth, residual(pname)))
        cast(model, name, dtype)


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this process actually holds (meta tensors hold none)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
