"""Chroma through diffusers' ChromaTransformer2DModel: Flux.1's blocks without their modulation layers.

Every block's shift/scale/gate come from one tensor per evaluation, computed by the modulation approximator
(``distilled_guidance_layer``) from the timestep, the guidance and a per-row index embedding: rows
``[3 x single blocks | 6 x double image | 6 x double text | 2 final]``. The blocks are Flux's (``flux.py``
runs them on a patch); this file hands each block its rows. There is no pooled text vector, and ComfyUI runs
Chroma with true CFG (a negative prompt).

ComfyUI's Chroma embeds 344 index rows whatever the depth (Chroma's 19 double and 38 single blocks need 344)
and reads the final layer's two rows at the end of them; diffusers sizes the table by depth. The two agree on
Chroma itself; for a smaller model (tests) this file follows ComfyUI, and the serial reference gives
diffusers' embedding the same table.
"""
from __future__ import annotations

import torch

from . import family, flux
from .family import Block, LatentFormat, module_of, pack_latent, param_bytes, unpack_latent  # noqa: F401

NAME = "chroma"
JOINT_TEXT = True
SAMPLING = "flux"  # ComfyUI's Chroma is a Flux model type: ModelSamplingFlux
LATENT = flux.LATENT
TEXT_ENCODERS = "the Chroma text encoder: CLIPLoader type chroma with t5xxl"
DEFAULT_GUIDANCE = 0.0  # ComfyUI's Chroma embeds a guidance of 0 unless FluxGuidance sets one
COMFY_ROWS = 344  # ComfyUI's mod_index_length

_TINY = dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
             axes_dims_rope=(4, 6, 6), approximator_num_channels=64, approximator_hidden_dim=32, approximator_layers=2)
PRESETS: dict[str, dict] = {
    "chroma-tiny": dict(config=_TINY, text_tokens=8, height=128, width=128, steps=4),
    # the same weights, the approximator reading sigma through its slow features only (family.smooth_time): the
    # drift tests' stand-in for a trained Chroma, whose modulation is smooth in sigma
    "chroma-smooth-tiny": dict(config=_TINY, text_tokens=8, height=128, width=128, steps=4, smooth_time=10.0),
}
# the approximator's input [timestep sin/cos (channels / 4) | guidance sin/cos | row index]: see time_embedding
TIME_FEATURES = (("distilled_guidance_layer.in_proj.weight", 0, 16),)

SHARED_MODULES = ("distilled_guidance_layer",)
FIRST_MODULES = ("x_embedder", "context_embedder")
LAST_MODULES = ("norm_out", "proj_out")

blocks_of = flux.blocks_of
block_cost = flux.block_cost
kv_buffers = flux.kv_buffers
embed_image = flux.embed_image
embeddings = flux.embeddings


def build_meta(config: dict):
    return family.meta_model("ChromaTransformer2DModel", config)


def materialize(model, names: list[str], device: torch.device, dtype: torch.dtype, seed: int) -> None:
    family.materialize(model, names, device, dtype, seed, len(blocks_of(model)), flux._residual)


def latent_format(config: dict) -> LatentFormat:
    return flux.latent_format(config)


def conditioning_dims(config: dict) -> tuple[int, None]:
    return config["joint_attention_dim"], None


def mod_rows(model) -> int:
    """Rows of the modulation tensor: ComfyUI's 344, or what a deeper model needs."""
    c = model.config
    return max(COMFY_ROWS, 3 * c.num_single_layers + 12 * c.num_layers + 2)


def _sincos(t: torch.Tensor, dim: int) -> torch.Tensor:
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


def index_table(model, device: torch.device) -> torch.Tensor:
    """The per-row index embedding, [rows, approximator channels / 2]."""
    rows, ch = mod_rows(model), model.config.approximator_num_channels
    return _sincos(torch.arange(rows, device=device) * 1000, ch // 2)


def time_embedding(model, emb, t: torch.Tensor, pooled, guidance: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """Every block's modulation for one evaluation, [MB, rows, D]: the approximator on (timestep, guidance,
    row index), as ComfyUI computes it (the timestep and guidance scaled by 1000 in float32)."""
    ch = model.config.approximator_num_channels // 4
    t = t.float() * 1000  # [MB]
    g = torch.zeros_like(t) if guidance is None else guidance.to(t.device).float() * 1000
    table = index_table(model, t.device)
    tg = torch.cat([_sincos(t, ch), _sincos(g, ch)], 1)  # [MB, ch / 2]
    vec = torch.cat([tg[:, None].expand(-1, table.shape[0], -1), table[None].expand(t.shape[0], -1, -1)], -1)
    return model.distilled_guidance_layer(vec.to(dtype))


def run_blocks(model, blocks: list[Block], kvs: list, span, txt, img, temb, pos):
    """Flux's blocks on one patch, each with its rows of the modulation tensor."""
    singles, doubles = len(model.single_transformer_blocks), len(model.transformer_blocks)
    for block, (kv,) in zip(blocks, kvs):
        blk = module_of(model, block)
        if block.kind == "double":
            i, j = 3 * singles + 6 * block.index, 3 * singles + 6 * doubles + 6 * block.index
            txt, img = flux.double_block(blk, kv, span, txt, img, (temb[:, i:i + 6], temb[:, j:j + 6]), pos)
        else:
            i = 3 * block.index
            txt, img = flux.single_block(blk, kv, span, txt, img, temb[:, i:i + 3], pos)
    return txt, img


def final_layer(model, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    return model.proj_out(model.norm_out(img, temb[:, -2:]))


def forward(model, x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, pooled, guidance: torch.Tensor | None,
            rows: int, cols: int) -> torch.Tensor:
    """diffusers' ChromaTransformer2DModel.forward: the serial reference, with ComfyUI's index table and
    guidance (diffusers embeds a guidance of 0; ComfyUI the conditioning's, 0 unless FluxGuidance set it)."""
    tte = model.time_text_embed
    tte.mod_proj = index_table(model, x.device)
    g = torch.zeros(x.shape[0], device=x.device) if guidance is None else guidance.to(x.device).float()
    hook = tte.guidance_proj.register_forward_hook(lambda mod, args, out: tte.time_proj(g * 1000).to(out))
    try:
        return model(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_ids=flux.image_ids(rows, cols).to(x.device),
                     txt_ids=torch.zeros(txt.shape[1], 3, device=x.device), return_dict=False)[0]
    finally:
        hook.remove()
