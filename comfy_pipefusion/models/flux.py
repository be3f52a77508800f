"""Flux.1 (and Flux.1 Kontext) through diffusers' FluxTransformer2DModel: build, per-stage weights, and
patch-wise blocks.

The module owns the weights (diffusers' classes); this file runs them on one *patch* of the joint
sequence ``[text; image]``: a block takes the patch's text tokens (or none) and image tokens, and its
attention goes through a K/V buffer (``attention.StaleKV``) that holds the whole sequence. With one patch
covering everything, this is exactly diffusers' own forward (tested against it).

Kontext: reference latents (``references.py``) join the sequence as ``[text; references; image]``. They ride
with the text stream (the engine treats them as text tokens), but a double block runs them through the
image stream's weights, as the model was trained: ``Positions.n_text`` tells where text ends in a span.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import family, references
from .family import Block, LatentFormat, module_of, pack_latent, param_bytes, unpack_latent  # noqa: F401

NAME = "flux"
JOINT_TEXT = True
REFERENCES = True  # takes ComfyUI's reference latents (Flux.1 Kontext)
REFERENCE_METHOD = "offset"  # ComfyUI's default placement of them for Flux.1
LATENT = LatentFormat(channels=16, scale=0.3611, shift=0.1159, empty_node="EmptySD3LatentImage")
TEXT_ENCODERS = "the Flux text encoders: DualCLIPLoader type flux"
LATENT_CHANNELS, LATENT_SCALE, LATENT_SHIFT = LATENT.channels, LATENT.scale, LATENT.shift

# Built-in models with random weights, Flux.1's architecture at smaller sizes.
PRESETS: dict[str, dict] = {
    # tests: seconds
    "tiny": dict(config=dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=4,
                             joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                             axes_dims_rope=(4, 6, 6)),
                 text_tokens=8, height=128, width=128, steps=4),
    # tests of 3 ranks splitting heads (Ulysses): tiny with 6 heads
    "tiny-h6": dict(config=dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=6,
                                joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                                axes_dims_rope=(4, 6, 6)),
                    text_tokens=8, height=128, width=128, steps=4),
    # tests of heads that the ranks do not divide (Ulysses over 2, 3 or 4 ranks): tiny with 5 heads
    "tiny-h5": dict(config=dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=5,
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
    # Kontext: "tiny" with two reference latents (one of odd height, padded as ComfyUI pads it)
    "kontext-tiny": dict(config=dict(num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=4,
                                     joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                                     axes_dims_rope=(4, 6, 6)),
                         text_tokens=8, height=128, width=128, steps=4, references=((12, 8), (9, 6))),
}


def blocks_of(model) -> list[Block]:
    """Double-stream blocks ("double", ``transformer_blocks.N``), then single-stream ones."""
    return [Block("double", i, f"transformer_blocks.{i}") for i in range(len(model.transformer_blocks))] + \
           [Block("single", i, f"single_transformer_blocks.{i}") for i in range(len(model.single_transformer_blocks))]


# Modules every rank needs (temb drives every block's AdaLN), those of the first stage, of the last one.
SHARED_MODULES = ("time_text_embed",)
FIRST_MODULES = ("x_embedder", "context_embedder")
LAST_MODULES = ("norm_out", "proj_out")


def build_meta(config: dict):
    """The whole model on the meta device: structure only, no memory."""
    return family.meta_model("FluxTransformer2DModel", config)


def _residual(name: str) -> bool:
    return name.endswith(("to_out.0.weight", "to_add_out.weight", "ff.net.2.weight", "ff_context.net.2.weight")) \
        or (name.startswith("single") and "proj_out" in name)


def materialize(model, names: list[str], device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Allocate and fill only the submodules ``names`` with synthetic weights; the rest stays on meta."""
    family.materialize(model, names, device, dtype, seed, len(blocks_of(model)), _residual)


def block_cost(model, block: Block, balance: str) -> float:
    """Weight of a block for the stage split.

    'compute': a double block's image path (q, k, v, out, 4x MLP) and a single block's (q, k, v, MLP in,
    fused out) are both 12 d^2 multiply-adds per token, attention is the same, and the text path runs
    once per step rather than per patch; measured, both take the same time per token. So every block
    weighs 1. 'memory': the block's parameter count (a double block holds about 2.4x a single one).
    """
    if balance == "compute":
        return 1.0
    return float(sum(p.numel() for p in module_of(model, block).parameters()))


def latent_format(config: dict) -> LatentFormat:
    """Flux.1's 16-channel latent; a model with other input channels owns its latent (the built-in model's
    12-channel pixel latent, comfy_pipefusion/builtin/latent.py: sampling space = LATENT)."""
    channels = config.get("in_channels", 64) // 4
    return LATENT if channels == LATENT.channels else LatentFormat(
        channels=channels, scale=1.0, shift=0.0, empty_node="its own empty latent, e.g. PipeFusion Built-in Caption")


def conditioning_dims(config: dict) -> tuple[int, int | None]:
    return config["joint_attention_dim"], config["pooled_projection_dim"]


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """Positions of the image tokens for RoPE: (0, row, col)."""  # [rows * cols, 3]
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


# ----------------------------------------------------------------------------------------- forward

class Positions(NamedTuple):
    """A span's RoPE (cos, sin: [L, Dh] each) and how many of its text-stream tokens are text (the rest
    are reference tokens)."""

    cos: torch.Tensor
    sin: torch.Tensor
    n_text: int


class Embeddings:
    """What a job computes once per rank: text (and reference) embedding on the first stage, and the full
    RoPE table over ``[text; references; image]``."""

    def __init__(self, model, txt: torch.Tensor | None, n_txt: int, rows: int, cols: int, device: torch.device,
                 dtype: torch.dtype, refs=(), ref_method: str = "offset") -> None:
        ref_ids = references.positions(refs, ref_method, rows, cols)
        self.n_text, self.n_txt = n_txt, n_txt + len(ref_ids)
        ids = torch.cat([torch.zeros(n_txt, 3), ref_ids, image_ids(rows, cols)]).to(device)
        self.rope = model.pos_embed(ids)  # (cos, sin): [S, Dh] each
        self.txt = None
        if txt is not None:
            self.txt = model.context_embedder(txt.to(device, dtype))  # [B, S_t, D]
            if refs:  # [B, S_t + S_ref, D]
                ref = model.x_embedder(references.tokens(refs).to(device, dtype))
                self.txt = torch.cat([self.txt, ref], 1)
        self.extra = None

    def for_span(self, span) -> Positions:
        idx = span.joint_index(self.n_txt).to(self.rope[0].device)
        n_text = min(max(self.n_text - span.t0, 0), span.n_txt)
        return Positions(self.rope[0][idx], self.rope[1][idx], n_text)


def embeddings(model, txt: torch.Tensor | None, n_txt: int, rows: int, cols: int, device: torch.device,
               dtype: torch.dtype, refs=(), ref_method: str = "offset") -> Embeddings:
    """``refs``: reference latents [MB, C, h, w] in the sampling space (Kontext), placed by ``ref_method``."""
    return Embeddings(model, txt, n_txt, rows, cols, device, dtype, refs, ref_method)


def time_embedding(model, emb, t: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """temb for one evaluation, as ComfyUI computes it: the timestep scaled by 1000 in float32, the guidance
    cast to the compute dtype first (ComfyUI casts its extra conditions), then scaled. diffusers' forward
    (the serial reference) casts the timestep first, which in bfloat16 moves sigma 0.123456 to 123.5."""
    t = t.float() * 1000  # [B]
    if model.config.guidance_embeds:
        return model.time_text_embed(t, guidance.to(dtype) * 1000, pooled)
    return model.time_text_embed(t, pooled)


def embed_image(model, emb, x: torch.Tensor, span) -> torch.Tensor:
    return model.x_embedder(x)  # [B, L, D]; positions enter through RoPE


def kv_buffers(model, block: Block, make) -> tuple:
    return (make("joint"),)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # [B, L, H, Dh]


def _qkv(attn, x, to_q, to_k, to_v, norm_q, norm_k):
    q = norm_q(_heads(to_q(x), attn.head_dim))
    k = norm_k(_heads(to_k(x), attn.head_dim))
    return q, k, _heads(to_v(x), attn.head_dim)


def _rope(q, k, pos):
    from diffusers.models.embeddings import apply_rotary_emb

    rope = (pos[0], pos[1])
    return apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)


def _clip16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def double_block(blk, kv, span, txt, img, temb, pos):
    """A double-stream block on one patch. txt: [B, span.n_txt, D] or None; img: [B, span.n_img, D].
    Reference tokens at the end of ``txt`` go through the image stream's weights (they are image tokens)."""
    n_ref = 0 if txt is None else txt.shape[1] - pos.n_text
    if n_ref:
        txt, img = (txt[:, :pos.n_text] if pos.n_text else None), torch.cat([txt[:, pos.n_text:], img], 1)
    n_t = 0 if txt is None else txt.shape[1]
    temb, c_temb = temb if isinstance(temb, tuple) else (temb, temb)  # Chroma: each stream its own rows
    attn = blk.attn
    n_img, g_msa, sh_mlp, sc_mlp, g_mlp = blk.norm1(img, emb=temb)
    q, k, v = _qkv(attn, n_img, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    if txt is not None:
        n_txt, c_g_msa, c_sh_mlp, c_sc_mlp, c_g_mlp = blk.norm1_context(txt, emb=c_temb)
        tq, tk, tv = _qkv(attn, n_txt, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                          attn.norm_added_q, attn.norm_added_k)
        q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
    q, k = _rope(q, k, pos)
    out = kv.attend(span, q, k, v).to(q.dtype)  # [B, L, D]
    t_out, i_out = out[:, :n_t], out[:, n_t:]

    img = img + g_msa.unsqueeze(1) * attn.to_out[0](i_out.contiguous())
    n2 = blk.norm2(img) * (1 + sc_mlp[:, None]) + sh_mlp[:, None]
    img = _clip16(img + g_mlp.unsqueeze(1) * blk.ff(n2))
    if txt is not None:
        txt = txt + c_g_msa.unsqueeze(1) * attn.to_add_out(t_out.contiguous())
        n2 = blk.norm2_context(txt) * (1 + c_sc_mlp[:, None]) + c_sh_mlp[:, None]
        txt = _clip16(txt + c_g_mlp.unsqueeze(1) * blk.ff_context(n2))
    if n_ref:
        ref, img = img[:, :n_ref], img[:, n_ref:]
        txt = ref if txt is None else torch.cat([txt, ref], 1)
    return txt, img


def single_block(blk, kv, span, txt, img, temb, pos):
    """A single-stream block on one patch: text (if any) and image tokens share the weights."""
    x = img if txt is None else torch.cat([txt, img], 1)  # [B, L, D]
    normed, gate = blk.norm(x, emb=temb)
    mlp = blk.act_mlp(blk.proj_mlp(normed))
    attn = blk.attn
    q, k, v = _qkv(attn, normed, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    q, k = _rope(q, k, pos)
    out = kv.attend(span, q, k, v).to(q.dtype)
    x = _clip16(x + gate.unsqueeze(1) * blk.proj_out(torch.cat([out, mlp], 2)))
    return (None, x) if txt is None else (x[:, :span.n_txt], x[:, span.n_txt:])


def run_blocks(model, blocks: list[Block], kvs: list, span, txt, img, temb, pos):
    """Run ``blocks`` (one ``kv_buffers`` tuple each: one joint buffer) on one patch; returns (txt or None, img)."""
    for block, (kv,) in zip(blocks, kvs):
        fn = double_block if block.kind == "double" else single_block
        txt, img = fn(module_of(model, block), kv, span, txt, img, temb, pos)
    return txt, img


def final_layer(model, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """Image tokens -> predicted velocity per token. [B, L, D] -> [B, L, 64]"""
    return model.proj_out(model.norm_out(img, temb))


def forward(model, x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, pooled: torch.Tensor,
            guidance: torch.Tensor | None, rows: int, cols: int, refs=(), ref_method: str = "offset") -> torch.Tensor:
    """diffusers' FluxTransformer2DModel.forward over the whole packed latent: the serial reference. Reference
    latents join the image tokens at their end (as ComfyUI's Kontext does); their outputs are dropped."""
    n_txt, ids = txt.shape[1], image_ids(rows, cols)
    if refs:
        x = torch.cat([x, references.tokens(refs).to(x)], 1)
        ids = torch.cat([ids, references.positions(refs, ref_method, rows, cols)])
    out = model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                img_ids=ids.to(x.device), txt_ids=torch.zeros(n_txt, 3, device=x.device),
                guidance=guidance if model.config.guidance_embeds else None, return_dict=False)[0]
    return out[:, :rows * cols]
