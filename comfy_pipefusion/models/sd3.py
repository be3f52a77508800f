"""SD3 / SD3.5 through diffusers' SD3Transformer2DModel: the family protocol of ``family.py``.

MMDiT joint blocks attend over ``[text; image]`` like Flux's double blocks, without RoPE: positions are a
sincos table added once at patch embedding, cropped from a ``pos_embed_max_size`` square grid around the
centre. That table lives in the model as the *buffer* ``pos_embed.pos_embed``, and real checkpoints store
it (key ``pos_embed``): it is not the table diffusers would compute from the config, so it is read from
the buffer, never recomputed. Synthetic models get diffusers' table written there by ``materialize``.

The last block is ``context_pre_only`` (its text tokens only give K/V). SD3.5 medium's first blocks have
a second, image-only self-attention (``attn2``): its buffer is of kind "image". Attention order does not
matter without a mask or RoPE, so our ``[text; image]`` buffer equals diffusers' ``[image; text]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import family
from .family import Block, LatentFormat, module_of, pack_latent, param_bytes, unpack_latent  # noqa: F401
from ..patches import Span

NAME = "sd3"
JOINT_TEXT = True
LATENT = LatentFormat(channels=16, scale=1.5305, shift=0.0609,  # ComfyUI's latent_formats.SD3
                      empty_node="EmptySD3LatentImage")
TEXT_ENCODERS = "the SD3 text encoders: TripleCLIPLoader (clip_l, clip_g, t5xxl)"

_TINY = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
             pos_embed_max_size=12)  # 12 > 8 token rows: the crop is off-centre-safe and really crops

# Built-in models with random weights, SD3's architecture at smaller sizes.
PRESETS: dict[str, dict] = {
    "sd3-tiny": dict(config=dict(_TINY, num_layers=2), text_tokens=8, height=128, width=128, steps=4),
    # SD3.5 medium's features: dual attention in the first blocks, RMS qk norm; the last block is plain
    "sd3.5m-tiny": dict(config=dict(_TINY, num_layers=3, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
                        text_tokens=8, height=128, width=128, steps=4),
    # sized like Flux's "small": 6 blocks of width 256, 256 image tokens
    "sd3-small": dict(config=dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=6,
                                  attention_head_dim=32, num_attention_heads=8, joint_attention_dim=512,
                                  caption_projection_dim=256, pooled_projection_dim=128, pos_embed_max_size=24),
                      text_tokens=64, height=256, width=256, steps=8),
}

# temb drives every block's AdaLN; the first stage embeds image and text; the last predicts.
SHARED_MODULES = ("time_text_embed",)
FIRST_MODULES = ("pos_embed", "context_embedder")
LAST_MODULES = ("norm_out", "proj_out")


def build_meta(config: dict):
    """The whole model on the meta device: structure only, no memory."""
    return family.meta_model("SD3Transformer2DModel", config)


def blocks_of(model) -> list[Block]:
    return [Block("joint", i, f"transformer_blocks.{i}") for i in range(len(model.transformer_blocks))]


def _residual(name: str) -> bool:
    return name.endswith(("attn.to_out.0.weight", "attn.to_add_out.weight", "attn2.to_out.0.weight",
                          "ff.net.2.weight", "ff_context.net.2.weight"))


def default_positions(model) -> torch.Tensor:
    """The table diffusers builds from the config: [M * M, D] for M = pos_embed_max_size."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    cfg = model.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    return get_2d_sincos_pos_embed(width, cfg.pos_embed_max_size, base_size=cfg.sample_size // cfg.patch_size,
                                   interpolation_scale=1.0, output_type="pt")


def materialize(model, names: list[str], device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Allocate and fill only ``names`` with synthetic weights; the position table gets diffusers' values."""
    family.materialize(model, names, device, dtype, seed, len(blocks_of(model)), _residual)
    if "pos_embed" in names:
        with torch.no_grad():
            model.pos_embed.pos_embed.copy_(default_positions(model)[None])


def block_cost(model, block: Block, balance: str) -> float:
    """'compute': a joint block's image path is 12 d^2 multiply-adds per token (q, k, v, out, 4x MLP); a
    dual-attention block adds 4 d^2 (attn2's projections), so it weighs 4/3. The text path runs once per
    step, not per patch, and is left out. 'memory': the block's parameter count."""
    if balance == "compute":
        return 4 / 3 if module_of(model, block).attn2 is not None else 1.0
    return float(sum(p.numel() for p in module_of(model, block).parameters()))


def latent_format(config: dict) -> LatentFormat:
    return LATENT


def conditioning_dims(config: dict) -> tuple[int, int | None]:
    return config.get("joint_attention_dim", 4096), config.get("pooled_projection_dim", 2048)


# ----------------------------------------------------------------------------------------- forward

@dataclass
class Embeddings:
    """Once per job and rank: the embedded text (first stage) and, on first use, the image positions.

    ``extra["positions"]``: [rows * cols, D], the model's table cropped to this latent, row-major.
    """

    rows: int
    cols: int
    txt: torch.Tensor | None  # [B, S_t, D]
    extra: dict = field(default_factory=dict)

    def for_span(self, span) -> None:
        return None  # positions enter once, at patch embedding

    def positions(self, model) -> torch.Tensor:
        if "positions" not in self.extra:
            self.extra["positions"] = cropped_positions(model, self.rows, self.cols)
        return self.extra["positions"]


def cropped_positions(model, rows: int, cols: int) -> torch.Tensor:
    """The centre ``rows`` x ``cols`` of the model's position table, as diffusers' PatchEmbed crops it."""
    table = model.pos_embed.pos_embed  # [1, M * M, D]
    if table.is_meta:
        raise ValueError("pos_embed.pos_embed holds no values: load it from the checkpoint (key 'pos_embed')")
    m = model.config.pos_embed_max_size
    if rows > m or cols > m:
        raise ValueError(f"a latent of {rows}x{cols} tokens exceeds pos_embed_max_size {m}: the image is too "
                         f"large for this model (at most {m * 16} pixels a side)")
    top, left = (m - rows) // 2, (m - cols) // 2
    return table.reshape(m, m, -1)[top:top + rows, left:left + cols].reshape(rows * cols, -1)


def embeddings(model, txt: torch.Tensor | None, n_txt: int, rows: int, cols: int, device: torch.device,
               dtype: torch.dtype) -> Embeddings:
    emb_txt = model.context_embedder(txt.to(device, dtype)) if txt is not None else None
    return Embeddings(rows, cols, emb_txt)


def time_embedding(model, emb, t: torch.Tensor, pooled: torch.Tensor, guidance, dtype: torch.dtype):
    """temb [B, D] for one evaluation; ``t`` is already SD3's timestep (sigma * 1000), embedded in float32
    as ComfyUI and diffusers' forward do (a bfloat16 ``t`` would move 123.456 to 123.5)."""
    return model.time_text_embed(t.float(), pooled.to(dtype))


def embed_image(model, emb: Embeddings, x: torch.Tensor, span) -> torch.Tensor:
    """Packed latent tokens [B, L, 4C], channels (c, ph, pw) -> hidden states [B, L, D] with positions.

    The 2x2 stride-2 conv is a linear over each token's 2x2 patch, its weight [D, C, 2, 2] flattened in
    the same (c, ph, pw) order as the packing."""
    proj = model.pos_embed.proj
    h = F.linear(x, proj.weight.flatten(1), proj.bias)
    return (h + emb.positions(model)[span.i0:span.i1]).to(h.dtype)


def kv_buffers(model, block: Block, make) -> tuple:
    """(joint buffer,) or, with dual attention, (joint buffer, image-only buffer for attn2): a tuple of
    real buffers only, since the engine walks every buffer of a block (DistriFusion's mode and finish)."""
    if module_of(model, block).attn2 is None:
        return (make("joint"),)
    return make("joint"), make("image")


def _qkv(attn, x, to_q, to_k, to_v, norm_q, norm_k):
    def heads(y):
        return y.unflatten(-1, (attn.heads, -1))  # [B, L, H, Dh]

    q, k = heads(to_q(x)), heads(to_k(x))
    q = norm_q(q) if norm_q is not None else q
    k = norm_k(k) if norm_k is not None else k
    return q, k, heads(to_v(x))


def joint_block(blk, kvs, span, txt, img, temb):
    """One MMDiT block on one patch. txt: [B, span.n_txt, D] or None; img: [B, span.n_img, D].

    Returns (txt or None, img); the ``context_pre_only`` block returns no text."""
    kv = kvs[0]
    attn = blk.attn
    if blk.use_dual_attention:
        n_img, g_msa, sh_mlp, sc_mlp, g_mlp, n_img2, g_msa2 = blk.norm1(img, emb=temb)
    else:
        n_img, g_msa, sh_mlp, sc_mlp, g_mlp = blk.norm1(img, emb=temb)
    q, k, v = _qkv(attn, n_img, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    if txt is not None:
        if blk.context_pre_only:
            n_txt = blk.norm1_context(txt, temb)
        else:
            n_txt, c_g_msa, c_sh_mlp, c_sc_mlp, c_g_mlp = blk.norm1_context(txt, emb=temb)
        tq, tk, tv = _qkv(attn, n_txt, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                          attn.norm_added_q, attn.norm_added_k)
        q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
    out = kv.attend(span, q, k, v).to(q.dtype)  # [B, L, D]
    t_out, i_out = out[:, :span.n_txt], out[:, span.n_txt:]
    img = img + g_msa.unsqueeze(1) * attn.to_out[0](i_out.contiguous())

    if blk.use_dual_attention:
        a2 = blk.attn2
        q2, k2, v2 = _qkv(a2, n_img2, a2.to_q, a2.to_k, a2.to_v, a2.norm_q, a2.norm_k)
        out2 = kvs[1].attend(Span(0, 0, span.i0, span.i1), q2, k2, v2).to(q2.dtype)  # image tokens only
        img = img + g_msa2.unsqueeze(1) * a2.to_out[0](out2)

    n2 = blk.norm2(img) * (1 + sc_mlp[:, None]) + sh_mlp[:, None]
    img = img + g_mlp.unsqueeze(1) * blk.ff(n2)
    if txt is None or blk.context_pre_only:
        return None, img
    txt = txt + c_g_msa.unsqueeze(1) * attn.to_add_out(t_out.contiguous())
    n2 = blk.norm2_context(txt) * (1 + c_sc_mlp[:, None]) + c_sh_mlp[:, None]
    return txt + c_g_mlp.unsqueeze(1) * blk.ff_context(n2), img


def run_blocks(model, blocks: list[Block], kvs: list, span, txt, img, temb, pos):
    """Run ``blocks`` (one ``kv_buffers`` tuple each) on one patch; returns (txt or None, img)."""
    for block, kv in zip(blocks, kvs):
        txt, img = joint_block(module_of(model, block), kv, span, txt, img, temb)
    return txt, img


def _to_packed(out: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """proj_out's per-token layout (ph, pw, c) -> the latent packing (c, ph, pw)."""
    return out.unflatten(-1, (p, p, channels)).permute(0, 1, 4, 2, 3).flatten(2)


def final_layer(model, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """Image tokens -> predicted velocity, packed like the latent. [B, L, D] -> [B, L, 4C]"""
    out = model.proj_out(model.norm_out(img, temb))
    return _to_packed(out, model.config.patch_size, model.out_channels)


def forward(model, x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor, guidance,
            rows: int, cols: int) -> torch.Tensor:
    """diffusers' SD3Transformer2DModel.forward over the whole packed latent [B, S, 4C]: the reference."""
    latent = unpack_latent(x, 2 * rows, 2 * cols)
    out = model(hidden_states=latent, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                return_dict=False)[0]
    return pack_latent(out)
