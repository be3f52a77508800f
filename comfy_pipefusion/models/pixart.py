"""PixArt-α / Σ through diffusers' PixArtTransformer2DModel: the family protocol of ``family.py``.

A block is self-attention over the image tokens (a buffer of kind "image": spans carry no text), then
cross-attention to the caption, then an MLP, all modulated by one AdaLN-single embedding of the timestep
shared by every block (``adaln_single``; α at 1024 adds resolution and aspect ratio). The caption's K/V
depend only on the caption and the block, so they are computed once per job and never go stale.

Positions are a sincos table over the *whole* latent, added at patch embedding: it is computed for the
full latent and each band takes its rows. Its grid follows ComfyUI (what users compare against): the
base size follows the input's resolution, ``round(c_res / 64) * 64 / patch`` with c_res the mean latent
side, where diffusers keeps the checkpoint's ``sample_size / patch``; both agree at the native size.
The table is never read from the model's ``pos_embed`` buffer, which is not persistent and stays
uninitialised on a model built on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import family
from .family import Block, LatentFormat, module_of, pack_latent, param_bytes, unpack_latent  # noqa: F401

NAME = "pixart"
JOINT_TEXT = False
ALPHA_LATENT = LatentFormat(channels=4, scale=0.18215)  # ComfyUI: PixArtAlpha uses latent_formats.SD15
SIGMA_LATENT = LatentFormat(channels=4, scale=0.13025)  # PixArtSigma uses latent_formats.SDXL
TEXT_ENCODERS = "the PixArt text encoder: CLIPLoader type pixart with t5xxl"

_TINY = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=4,
             attention_head_dim=24, cross_attention_dim=96, caption_channels=32)  # width 96: α's size
# embedding splits it in thirds

# Built-in models with random weights, PixArt's architecture at smaller sizes.
PRESETS: dict[str, dict] = {
    "pixart-tiny": dict(config=dict(_TINY, use_additional_conditions=False),  # Σ-like
                        text_tokens=8, height=128, width=128, steps=4),
    # α at 1024: resolution and aspect ratio enter the time embedding
    "pixart-alpha-tiny": dict(config=dict(_TINY, use_additional_conditions=True),
                              text_tokens=8, height=128, width=128, steps=4),
    # sized like Flux's "small": 6 blocks of width 256, 256 image tokens
    "pixart-small": dict(config=dict(sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=6,
                                     num_attention_heads=8, attention_head_dim=32, cross_attention_dim=256,
                                     caption_channels=512, use_additional_conditions=False),
                         text_tokens=64, height=256, width=256, steps=8),
}

# Every block is modulated by adaln_single and reads the projected caption; the first stage embeds the
# image; the last one holds the final modulation (a root parameter) and projection.
SHARED_MODULES = ("adaln_single", "caption_projection")
FIRST_MODULES = ("pos_embed",)
LAST_MODULES = ("scale_shift_table", "proj_out")


def build_meta(config: dict):
    """The whole model on the meta device: structure only, no memory."""
    return family.meta_model("PixArtTransformer2DModel", config)


def blocks_of(model) -> list[Block]:
    return [Block("pixart", i, f"transformer_blocks.{i}") for i in range(len(model.transformer_blocks))]


def _residual(name: str) -> bool:
    return name.endswith(("attn1.to_out.0.weight", "attn2.to_out.0.weight", "ff.net.2.weight"))


def materialize(model, names: list[str], device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Allocate and fill only ``names`` with synthetic weights; the rest stays on the meta device."""
    family.materialize(model, names, device, dtype, seed, len(blocks_of(model)), _residual)


block_cost = family.uniform_block_cost  # every block is the same


def _micro_conditioned(config: dict) -> bool:
    """diffusers' rule: resolution conditions when asked, or by default at sample size 128 (α-1024)."""
    flag = config.get("use_additional_conditions")
    return flag if flag is not None else config.get("sample_size", 128) == 128


def latent_format(config: dict) -> LatentFormat:
    """ComfyUI's rule: a model with resolution conditioning is α (SD1.5 VAE), any other Σ (SDXL VAE)."""
    return ALPHA_LATENT if _micro_conditioned(config) else SIGMA_LATENT


def conditioning_dims(config: dict) -> tuple[int, int | None]:
    return config.get("caption_channels", 4096), None


def positions(config, rows: int, cols: int) -> torch.Tensor:
    """Sincos positions of a latent of ``rows`` x ``cols`` tokens: [rows * cols, D], row-major, float32.

    Interpolation scale: the config's, else sample_size // 64 (at least 1). Base size: ComfyUI's, from
    the input's mean latent side; latents under 32 pixels (only the tiny test models) give 0 there, and
    then the model's own sample size is used, as diffusers does."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    p, sample = config["patch_size"], config["sample_size"]
    interp = config.get("interpolation_scale") or max(sample // 64, 1)
    c_res = (rows * p + cols * p) // 2
    base = round(c_res / 64) * 64 // p or sample // p
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return get_2d_sincos_pos_embed(width, (rows, cols), base_size=base, interpolation_scale=interp,
                                   output_type="pt").float()


def _added_conditions(model, rows: int, cols: int, batch: int, device) -> dict:
    """α's micro-conditions as ComfyUI and diffusers' pipeline give them: image size (h, w) in pixels
    and aspect ratio h / w."""
    if not model.config.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    h, w = rows * model.config.patch_size * 8, cols * model.config.patch_size * 8
    return {"resolution": torch.tensor([[float(h), float(w)]], device=device).repeat(batch, 1),
            "aspect_ratio": torch.tensor([[h / w]], device=device).repeat(batch, 1)}


# ----------------------------------------------------------------------------------------- forward

class CaptionKV:
    """Cross-attention K/V of the caption per block, computed on first use: [B, N, H, Dh] each."""

    def __init__(self, caption: torch.Tensor | None) -> None:
        self.caption = caption  # [B, N, D], projected
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, prefix: str, attn) -> tuple[torch.Tensor, torch.Tensor]:
        if prefix not in self.kv:
            if self.caption is None:
                raise ValueError("PixArt blocks need the caption on every rank (JOINT_TEXT is False)")
            self.kv[prefix] = (_heads(attn, attn.to_k(self.caption)), _heads(attn, attn.to_v(self.caption)))
        return self.kv[prefix]


@dataclass
class Embeddings:
    """Once per job and rank: the projected caption (``txt``), and in ``extra`` the caption K/V cache
    (``"caption_kv"``: CaptionKV) and, on first use by the first stage, ``"positions"`` [S, D]."""

    rows: int
    cols: int
    config: dict
    txt: torch.Tensor | None  # [B, N, D]
    extra: dict = field(default_factory=dict)

    def for_span(self, span) -> None:
        return None  # positions enter once, at patch embedding

    def positions(self, device) -> torch.Tensor:
        if "positions" not in self.extra:
            self.extra["positions"] = positions(self.config, self.rows, self.cols).to(device)
        return self.extra["positions"]


@dataclass(frozen=True)
class Conditioning:
    """One evaluation's conditioning: ``mod`` [B, 6D] (every block's AdaLN-single), ``t_emb`` [B, D] (the
    final layer's modulation), ``caption`` the job's caption K/V cache."""

    mod: torch.Tensor
    t_emb: torch.Tensor
    caption: CaptionKV


def embeddings(model, txt: torch.Tensor | None, n_txt: int, rows: int, cols: int, device: torch.device,
               dtype: torch.dtype) -> Embeddings:
    caption = model.caption_projection(txt.to(device, dtype)) if txt is not None else None
    emb = Embeddings(rows, cols, dict(model.config), caption)
    emb.extra["caption_kv"] = CaptionKV(caption)
    return emb


def time_embedding(model, emb: Embeddings, t: torch.Tensor, pooled, guidance, dtype: torch.dtype) -> Conditioning:
    """AdaLN-single of the discrete timestep ``t`` [B] (0..999), with α's size conditions."""
    added = _added_conditions(model, emb.rows, emb.cols, t.shape[0], t.device)
    mod, t_emb = model.adaln_single(t, added, batch_size=t.shape[0], hidden_dtype=dtype)
    return Conditioning(mod, t_emb, emb.extra["caption_kv"])


def embed_image(model, emb: Embeddings, x: torch.Tensor, span) -> torch.Tensor:
    """Packed latent tokens [B, L, 4C], channels (c, ph, pw) -> hidden states [B, L, D] with positions:
    the 2x2 stride-2 conv as a linear with its weight [D, C, 2, 2] flattened in the packing's order."""
    proj = model.pos_embed.proj
    h = F.linear(x, proj.weight.flatten(1), proj.bias)
    return (h + emb.positions(h.device)[span.i0:span.i1]).to(h.dtype)


def kv_buffers(model, block: Block, make) -> tuple:
    return (make("image"),)


def _heads(attn, y: torch.Tensor) -> torch.Tensor:
    return y.unflatten(-1, (attn.heads, -1))  # [B, L, H, Dh]


def pixart_block(blk, prefix: str, kv, span, img: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """One block on one band of image tokens. img: [B, span.n_img, D]."""
    b = img.shape[0]
    sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = (blk.scale_shift_table[None] + cond.mod.reshape(b, 6, -1)
                                                    ).chunk(6, dim=1)  # [B, 1, D] each
    a1 = blk.attn1
    n = blk.norm1(img) * (1 + sc_msa) + sh_msa
    out = kv.attend(span, _heads(a1, a1.to_q(n)), _heads(a1, a1.to_k(n)), _heads(a1, a1.to_v(n)))
    img = img + g_msa * a1.to_out[0](out.to(img.dtype))

    a2 = blk.attn2  # cross-attention, PixArt applies no norm before it
    k, v = cond.caption.get(prefix, a2)
    q = _heads(a2, a2.to_q(img))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    img = img + a2.to_out[0](out.transpose(1, 2).flatten(2).to(img.dtype))

    n = blk.norm2(img) * (1 + sc_mlp) + sh_mlp
    return img + g_mlp * blk.ff(n)


def run_blocks(model, blocks: list[Block], kvs: list, span, txt, img, temb: Conditioning, pos):
    """Run ``blocks`` (one ``kv_buffers`` tuple each: one image buffer) on one band; spans carry no text:
    returns (None, img)."""
    for block, (kv,) in zip(blocks, kvs):
        img = pixart_block(module_of(model, block), block.prefix, kv, span, img, temb)
    return None, img


def final_layer(model, img: torch.Tensor, temb: Conditioning) -> torch.Tensor:
    """Image tokens -> predicted noise (eps), packed like the latent. [B, L, D] -> [B, L, 4 * in_channels]

    With learned sigma the projection gives 2 x in_channels per pixel; ComfyUI uses only the first half."""
    shift, scale = (model.scale_shift_table[None] + temb.t_emb[:, None]).chunk(2, dim=1)  # [B, 1, D]
    out = model.proj_out(model.norm_out(img) * (1 + scale) + shift)  # [B, L, p * p * C_out], (ph, pw, c)
    p, c = model.config.patch_size, model.config.in_channels
    out = out.unflatten(-1, (p, p, model.out_channels))[..., :c]
    return out.permute(0, 1, 4, 2, 3).flatten(2)


def forward(model, x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, pooled, guidance, rows: int,
            cols: int) -> torch.Tensor:
    """diffusers' PixArtTransformer2DModel.forward over the whole packed latent [B, S, 4C] -> eps, packed.

    Its PatchEmbed is given this latent's position table for the call (its own buffer is uninitialised
    on a meta-built model, and its base size is the checkpoint's, not ComfyUI's)."""
    pe = model.pos_embed
    saved = pe.pos_embed, pe.height, pe.width
    pe.pos_embed, pe.height, pe.width = positions(dict(model.config), rows, cols).to(x.device)[None], rows, cols
    try:
        latent = unpack_latent(x, rows * model.config.patch_size, cols * model.config.patch_size)
        added = _added_conditions(model, rows, cols, x.shape[0], x.device)
        out = model(hidden_states=latent, encoder_hidden_states=txt, timestep=t, added_cond_kwargs=added,
                    return_dict=False)[0]
    finally:
        pe.pos_embed, pe.height, pe.width = saved
    return pack_latent(out[:, :model.config.in_channels])
