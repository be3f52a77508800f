"""What the engine needs from a model family, and the parts every family shares.

A family is a module (``flux``, ``sd3``, ``pixart``, ``chroma``, ``qwen_image``, ``zimage``, ``flux2``) with these
names; the engine only talks to them:

    NAME: str                          "flux" | "sd3" | "pixart" | "chroma" | "qwen_image" | "zimage" | "flux2"
    JOINT_TEXT: bool                   text tokens share the attention sequence ([text; image]: Flux, SD3)
                                       or enter by cross-attention (PixArt: spans carry no text tokens)
    SAMPLING: str (optional)           the model sampling's kind when it is not NAME (sampling/model_sampling.py)
    LATENT_FRAMES: bool (optional)     ComfyUI's LATENT carries a frame axis [B, C, 1, h, w] (video VAEs)
    text_tokens(n) -> int (optional)   text tokens in the attention sequence for n conditioning tokens, when
                                       the model pads them (Z-Image: to a multiple of 32); ``embeddings``
                                       then gives that many
    PRESETS: dict                      built-in random-weight models: {name: dict(config=..., text_tokens=,
                                       height=, width=, steps=)}
    SHARED_MODULES, FIRST_MODULES, LAST_MODULES
                                       names (submodules, or parameters of the root module) that every rank,
                                       the first stage, the last stage hold besides its blocks
    shared_modules(blocks) (optional)  the SHARED_MODULES a PipeFusion stage running ``blocks`` needs, when it
                                       is fewer (Flux.2: the double blocks' modulation only where they run)
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

Optional: ``condition_text(txt) -> txt``: the text states as the model takes them, applied to the positive and the
negative before they are batched (ComfyUI's model-side conditioning: Flux.2 pads them to 512 tokens).
``REFERENCES = True`` (and ``REFERENCE_METHOD``, ComfyUI's default placement) for a family that takes
reference latents (ComfyUI's ReferenceLatent: Flux.1 Kontext). Their tokens ride with the text stream: the
joint sequence is ``[text; references; image]`` and ``Problem.n_span_txt`` counts both, so every strategy
carries them unchanged; the family gets ``refs`` (each [MB, C, h, w], sampling space) and ``ref_method`` as
keyword arguments of ``embeddings`` and ``forward`` (only when a job has references), embeds them after
the text in ``.txt`` and runs them through the right weights in its blocks. ``DEFAULT_GUIDANCE``: the
guidance ComfyUI gives a conditioning without one (3.5 if absent; Chroma 0).
``TIME_FEATURES``: ((Linear weight name, first column, channels), ...) where the model reads sinusoidal features
of 1000 sigma (diffusers' ``get_timestep_embedding`` with ``flip_sin_to_cos``: cosines, then sines); a preset with
``smooth_time=R`` gets those weights' columns of features turning faster than R radians per unit of sigma zeroed
(``smooth_time``), so that its modulation is smooth in sigma as a trained model's is.
"""
from __future__ import annotations

import importlib
import math
import zlib
from dataclasses import dataclass, field

import torch

from . import diffusers_range

FAMILIES = ("flux", "sd3", "pixart", "chroma", "qwen_image", "zimage", "flux2")


def get(name: str):
    """The family module called ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}: supported are {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__package__}.{name}")


def sequence_text(fam, n_txt: int, n_ref: int = 0) -> int:
    """Tokens of the text stream a span sequence holds for ``n_txt`` conditioning tokens and ``n_ref`` reference
    tokens: the text as the model pads it (``text_tokens``: Flux.2 to 512, Z-Image to a multiple of 32), then the
    references unpadded; 0 for cross-attention families. The one count of these tokens: the problem, the memory
    estimate and the bench's cost model all take it from here."""
    if not fam.JOINT_TEXT:
        return 0
    return (fam.text_tokens(n_txt) if hasattr(fam, "text_tokens") else n_txt) + n_ref


def attention_shape(model) -> tuple[int, int]:
    """(heads, head dimension) of a family's diffusers model."""
    return config_attention(model.config)


def config_attention(config: dict) -> tuple[int | None, int | None]:
    """(heads, head dimension) a configuration names, None for what it does not: num_attention_heads and
    attention_head_dim in most, n_heads and dim (the width) in Z-Image's."""
    if "n_heads" in config and "dim" in config:  # Z-Image's (and Lumina's) names
        return config["n_heads"], config["dim"] // config["n_heads"]
    return config.get("num_attention_heads"), config.get("attention_head_dim")


def num_blocks(config: dict) -> int:
    """How many blocks ``blocks_of`` gives, from a configuration alone (no model built): Flux's double and
    single blocks, the others' layers, Z-Image's main layers and noise refiner (its context refiner runs once
    per job, outside the blocks)."""
    return sum(int(config.get(k, 0)) for k in ("num_layers", "num_single_layers", "n_layers", "n_refiner_layers"))


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
    """ComfyUI's latent format: LATENT = sampling / scale + shift, or, with per-channel ``mean`` and ``std``
    (the Wan 2.1 VAE's, Qwen-Image), LATENT = sampling * std / scale + mean."""

    channels: int
    scale: float
    shift: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    empty_node: str = field(default="EmptyLatentImage", compare=False)
    """The ComfyUI node that makes an empty latent of this format (named in the nodes' errors)."""
    patched: bool = False
    """ComfyUI's LATENT holds each 2x2 patch of this latent in its channels (Flux.2: [B, 4C, H/16, W/16], 128 = 32
    x 2 x 2): ``from_comfy`` unfolds it into the [B, C, H/8, W/8] latent the engine samples in, whose 2x2 packing
    (``pack_latent``) gives back exactly ComfyUI's per-pixel channel vectors, the model's tokens."""

    @property
    def comfy_channels(self) -> int:
        """Channels of ComfyUI's LATENT."""
        return 4 * self.channels if self.patched else self.channels

    def comfy_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """ComfyUI's LATENT shape for the engine's [B, C, h, w] (where ComfyUI draws its noise)."""
        b, c, h, w = shape
        return (b, 4 * c, h // 2, w // 2) if self.patched else tuple(shape)

    def pack_comfy(self, samples: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like ComfyUI's LATENT -> the engine's packed tokens [B, S, 4C]."""
        return pack_latent(self.from_comfy(samples))

    def from_comfy(self, samples: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like ComfyUI's LATENT (samples, noise, a prepared mask) in the engine's layout."""
        if not self.patched:
            return samples
        b, c, h, w = samples.shape  # channel c * 4 + ph * 2 + pw of pixel (y, x) -> channel c of (2y + ph, 2x + pw)
        x = samples.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // 4, 2 * h, 2 * w)

    def to_comfy(self, latent: torch.Tensor) -> torch.Tensor:
        """Inverse of ``from_comfy``."""
        if not self.patched:
            return latent
        b, c, h, w = latent.shape
        return pack_latent(latent).transpose(1, 2).reshape(b, 4 * c, h // 2, w // 2)

    def _stats(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.channels) + (1,) * (latent.ndim - 2)  # [1, C, 1, 1]
        return (torch.tensor(self.mean).view(shape).to(latent.device, latent.dtype),
                torch.tensor(self.std).view(shape).to(latent.device, latent.dtype))

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            mean, std = self._stats(latent)
            return (latent - mean) * self.scale / std
        return (latent - self.shift) * self.scale

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            mean, std = self._stats(latent)
            return latent * std / self.scale + mean
        return latent / self.scale + self.shift


def module_of(model: torch.nn.Module, block: Block) -> torch.nn.Module:
    return model.get_submodule(block.prefix)


def uniform_block_cost(model: torch.nn.Module, block: Block, balance: str) -> float:
    """``block_cost`` of a family whose blocks cost the same per image token: 'compute' 1 for every block,
    'memory' the block's parameter count."""
    if balance == "compute":
        return 1.0
    return float(sum(p.numel() for p in module_of(model, block).parameters()))


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


def meta_model(class_name: str, config: dict) -> torch.nn.Module:
    """diffusers' ``class_name`` (the installed release, checked: diffusers_range.py) built from ``config`` on
    the meta device: the structure only, no memory. A family's ``build_meta``."""
    cls = diffusers_range.model_class(class_name)
    with torch.device("meta"):
        return cls(**config)


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


def smooth_time(fam, model: torch.nn.Module, names: list[str], max_rate: float) -> None:
    """A built-in preset's stand-in for a trained model's smoothness in the timestep (random weights are not).

    A trained DiT's modulation changes little from one sampling step to the next: it is a smooth function of
    sigma, which is what stale K/V rely on. Random weights read every sinusoidal feature of 1000 sigma alike,
    and the fast ones turn by radians per step (Chroma's tiny approximator: 1000 rad per unit of sigma at its
    first frequency, 15 rad per step of 64), so a random model's K/V change about half per step however many
    steps it takes. Here the columns of ``fam.TIME_FEATURES`` that read features faster than ``max_rate``
    radians per unit of sigma are zeroed, on the names among ``names`` (this rank's) that hold them: the
    modulation then depends on sigma through the slow features only, and its change per step shrinks with the
    step size as a trained one's does. Deterministic, and the same on every rank and for any split."""
    held = tuple(n + "." for n in names)
    for weight, start, channels in getattr(fam, "TIME_FEATURES", ()):
        if not weight.startswith(held):
            continue
        half = channels // 2
        rate = 1000 * torch.exp(-math.log(10000) * torch.arange(half) / half)  # radians per unit of sigma
        fast = torch.nonzero(torch.cat([rate, rate]) > max_rate).flatten() + start  # [cos | sin] columns
        with torch.no_grad():
            model.get_parameter(weight)[:, fast] = 0


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this process actually holds (meta tensors hold none)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
