"""Flux.1 through diffusers' FluxTransformer2DModel: build, per-stage weights, and patch-wise blocks.

The module owns the weights (diffusers' classes); this file runs them on one *patch* of the joint
sequence ``[text; image]``: a block takes the patch's text tokens (or none) and image tokens, and its
attention goes through a K/V buffer (``attention.StaleKV``) that holds the whole sequence. With one patch
covering everything, this is exactly diffusers' own forward (tested against it).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb

LATENT_CHANNELS = 16
LATENT_SCALE = 0.3611
LATENT_SHIFT = 0.1159

# Built-in models with random weights, Flux.1's architecture at smaller sizes.
PRESETS: dict[str, dict] = {
    # tests: seconds
    "tiny": dict(config=dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=4,
                             joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                             axes_dims_rope=(4, 6, 6)),
                 text_tokens=8, height=128, width=128, steps=4),
    # the default of the benchmark: 4 strategies at 2 ranks well within a minute
    "small": dict(config=dict(num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=8,
                              joint_attention_dim=512, pooled_projection_dim=128, guidance_embeds=True,
                              axes_dims_rope=(8, 12, 12)),
                  text_tokens=64, height=256, width=256, steps=8),
    # the headline figure: >100M parameters, 1024 image tokens
    "mid": dict(config=dict(num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=10,
                            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                            axes_dims_rope=(8, 28, 28)),
                text_tokens=256, height=512, width=512, steps=28),
}


@dataclass(frozen=True)
class Block:
    """One transformer block in execution order."""

    kind: str  # "double" | "single"
    index: int  # index inside its ModuleList

    @property
    def prefix(self) -> str:
        return f"transformer_blocks.{self.index}" if self.kind == "double" else \
            f"single_transformer_blocks.{self.index}"


def blocks_of(model: FluxTransformer2DModel) -> list[Block]:
    return [Block("double", i) for i in range(len(model.transformer_blocks))] + \
           [Block("single", i) for i in range(len(model.single_transformer_blocks))]


def module_of(model: FluxTransformer2DModel, block: Block) -> torch.nn.Module:
    return model.get_submodule(block.prefix)


# Modules every rank needs (temb drives every block's AdaLN), those of the first stage, of the last one.
SHARED_MODULES = ("time_text_embed",)
FIRST_MODULES = ("x_embedder", "context_embedder")
LAST_MODULES = ("norm_out", "proj_out")


def build_meta(config: dict) -> FluxTransformer2DModel:
    """The whole model on the meta device: structure only, no memory."""
    with torch.device("meta"):
        return FluxTransformer2DModel(**config)


def _init_value(name: str, shape: torch.Size, seed: int, depth: int) -> torch.Tensor:
    """Deterministic synthetic weight for parameter ``name``: the same on every rank, any split."""
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) ^ seed) & 0x7FFFFFFF)
    x = torch.randn(shape, generator=g)
    if len(shape) == 1:
        return 1.0 + 0.05 * x if "norm" in name else 0.02 * x
    scale = shape[1] ** -0.5
    if name.endswith(("to_out.0.weight", "to_add_out.weight", "ff.net.2.weight",
                      "ff_context.net.2.weight")) or (name.startswith("single") and "proj_out" in name):
        scale /= (2 * depth) ** 0.5  # residual branches: keep the stream's scale over depth
    return scale * x


def materialize(model: FluxTransformer2DModel, names: list[str], device: torch.device, dtype: torch.dtype,
                seed: int) -> None:
    """Allocate and fill only the submodules ``names``; everything else stays on the meta device."""
    depth = len(blocks_of(model))
    for name in names:
        sub = model.get_submodule(name)
        sub.to_empty(device=device)
        for pname, p in sub.named_parameters(prefix=name):
            with torch.no_grad():
                p.copy_(_init_value(pname, p.shape, seed, depth))
        sub.to(dtype)


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this process actually holds (meta tensors hold none)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)


def block_cost(model: FluxTransformer2DModel, block: Block, balance: str) -> float:
    """Weight of a block for the stage split.

    'compute': a double block's image path (q, k, v, out, 4x MLP) and a single block's (q, k, v, MLP in,
    fused out) are both 12 d^2 multiply-adds per token, attention is the same, and the text path runs
    once per step rather than per patch; measured, both take the same time per token. So every block
    weighs 1. 'memory': the block's parameter count (a double block holds about 2.4x a single one).
    """
    if balance == "compute":
        return 1.0
    return float(sum(p.numel() for p in module_of(model, block).parameters()))


# ----------------------------------------------------------------------------------------- layout

def pack_latent(latent: torch.Tensor) -> torch.Tensor:
    """[B, 16, h, w] latent -> [B, (h/2)(w/2), 64] tokens, row-major, channels (c, ph, pw)."""
    b, c, h, w = latent.shape
    x = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latent(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latent`` for a latent of ``h`` x ``w``."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """Positions of the image tokens for RoPE: (0, row, col)."""  # [rows * cols, 3]
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


# ----------------------------------------------------------------------------------------- forward

class Embeddings:
    """What a job computes once per rank: text embedding (first stage) and the full RoPE table."""

    def __init__(self, model: FluxTransformer2DModel, txt: torch.Tensor | None, txt_ids: torch.Tensor,
                 img_ids: torch.Tensor) -> None:
        self.model = model
        cos, sin = model.pos_embed(torch.cat([txt_ids, img_ids]))  # [S, Dh] each
        self.rope = (cos, sin)
        self.n_txt = txt_ids.shape[0]
        self.txt = model.context_embedder(txt) if txt is not None else None  # [B, S_t, D]

    def rope_for(self, span) -> tuple[torch.Tensor, torch.Tensor]:
        idx = span.joint_index(self.n_txt).to(self.rope[0].device)
        return self.rope[0][idx], self.rope[1][idx]


def time_embedding(model: FluxTransformer2DModel, sigma: torch.Tensor, pooled: torch.Tensor,
                   guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """temb for one step, as diffusers' forward computes it (timestep and guidance scaled by 1000)."""
    t = sigma.to(dtype) * 1000  # [B]
    if model.config.guidance_embeds:
        return model.time_text_embed(t, guidance.to(dtype) * 1000, pooled)
    return model.time_text_embed(t, pooled)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # [B, L, H, Dh]


def _qkv(attn, x, to_q, to_k, to_v, norm_q, norm_k):
    q = norm_q(_heads(to_q(x), attn.head_dim))
    k = norm_k(_heads(to_k(x), attn.head_dim))
    return q, k, _heads(to_v(x), attn.head_dim)


def _rope(q, k, rope):
    return apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)


def _clip16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def double_block(blk, kv, span, txt, img, temb, rope):
    """A double-stream block on one patch. txt: [B, span.n_txt, D] or None; img: [B, span.n_img, D]."""
    attn = blk.attn
    n_img, g_msa, sh_mlp, sc_mlp, g_mlp = blk.norm1(img, emb=temb)
    q, k, v = _qkv(attn, n_img, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    if txt is not None:
        n_txt, c_g_msa, c_sh_mlp, c_sc_mlp, c_g_mlp = blk.norm1_context(txt, emb=temb)
        tq, tk, tv = _qkv(attn, n_txt, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                          attn.norm_added_q, attn.norm_added_k)
        q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
    q, k = _rope(q, k, rope)
    out = kv.attend(span, q, k, v).to(q.dtype)  # [B, L, D]
    t_out, i_out = out[:, :span.n_txt], out[:, span.n_txt:]

    img = img + g_msa.unsqueeze(1) * attn.to_out[0](i_out.contiguous())
    n2 = blk.norm2(img) * (1 + sc_mlp[:, None]) + sh_mlp[:, None]
    img = _clip16(img + g_mlp.unsqueeze(1) * blk.ff(n2))
    if txt is not None:
        txt = txt + c_g_msa.unsqueeze(1) * attn.to_add_out(t_out.contiguous())
        n2 = blk.norm2_context(txt) * (1 + c_sc_mlp[:, None]) + c_sh_mlp[:, None]
        txt = _clip16(txt + c_g_mlp.unsqueeze(1) * blk.ff_context(n2))
    return txt, img


def single_block(blk, kv, span, txt, img, temb, rope):
    """A single-stream block on one patch: text (if any) and image tokens share the weights."""
    x = img if txt is None else torch.cat([txt, img], 1)  # [B, L, D]
    normed, gate = blk.norm(x, emb=temb)
    mlp = blk.act_mlp(blk.proj_mlp(normed))
    attn = blk.attn
    q, k, v = _qkv(attn, normed, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    q, k = _rope(q, k, rope)
    out = kv.attend(span, q, k, v).to(q.dtype)
    x = _clip16(x + gate.unsqueeze(1) * blk.proj_out(torch.cat([out, mlp], 2)))
    return (None, x) if txt is None else (x[:, :span.n_txt], x[:, span.n_txt:])


def run_blocks(model, blocks: list[Block], kvs: list, span, txt, img, temb, rope):
    """Run ``blocks`` (one K/V buffer each) on one patch; returns (txt or None, img)."""
    for block, kv in zip(blocks, kvs):
        fn = double_block if block.kind == "double" else single_block
        txt, img = fn(module_of(model, block), kv, span, txt, img, temb, rope)
    return txt, img


def final_layer(model, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """Image tokens -> predicted velocity per token. [B, L, D] -> [B, L, 64]"""
    return model.proj_out(model.norm_out(img, temb))
