"""Flux.2 (dev) through diffusers' Flux2Transformer2DModel: the family protocol of ``family.py``.

Flux.1's structure (double-stream blocks, then single-stream blocks over ``[text; image]``) with three changes the
engine sees: the modulation is shared ("global"): three layers turn the time/guidance vector into every double
block's image and text shift/scale/gate and every single block's, once per evaluation (``Modulation``); the MLPs
are SiLU-gated and nothing has a bias; RoPE has four axes (image token (r, c) at (0, r, c, 0), text token i at
(0, 0, 0, i)), theta 2000.

As ComfyUI 0.3.75 runs it (comfy/ldm/flux/model.py, comfy/model_base.py ``Flux2``): the text states of the
Mistral 3 encoder (three layers stacked: 15360 wide) are padded at the front with zeros to 512 tokens
(``condition_text``); the timestep is sigma (ModelSamplingFlux, shift 2.02) and the guidance FluxGuidance's,
both embedded x1000. Its LATENT holds 128 channels at 1/16 of the image: the 32-channel VAE latent with each 2x2
patch folded into the channels (``LatentFormat.patched``); the engine samples the unfolded latent, whose 2x2
packing gives exactly the 128-channel vectors the model takes (patch size 1), with no scale or shift.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from typing import NamedTuple

from . import family, flux, references
from .family import Block, LatentFormat, module_of, pack_latent, param_bytes, unpack_latent  # noqa: F401

NAME = "flux2"
JOINT_TEXT = True
REFERENCES = True  # ComfyUI's reference latents (Flux.2 editing): they ride with the text stream, as Kontext's
REFERENCE_METHOD = "index"  # ComfyUI's default placement for Flux.2: reference i at time index 10 (i + 1)
REF_INDEX_SCALE = 10.0
SAMPLING = "flux2"  # ModelSamplingFlux at Flux.2's shift 2.02
LATENT = LatentFormat(channels=32, scale=1.0, shift=0.0, patched=True, empty_node="EmptyFlux2LatentImage")
TEXT_ENCODERS = "the Flux.2 text encoder: CLIPLoader type flux2 with a Mistral 3 Small file"
TEXT_LENGTH = 512  # ComfyUI's Flux2.extra_conds pads shorter text states (at the front, with zeros) to this
REAL = dict(patch_size=1, in_channels=128, attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
            mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True)  # ComfyUI's

_TINY = dict(patch_size=1, in_channels=128, num_layers=2, num_single_layers=4, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=48, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)
PRESETS: dict[str, dict] = {
    # tests and the bench's exactness check: seconds (the text is padded to 512 tokens, as ComfyUI does)
    "flux2-tiny": dict(config=_TINY, text_tokens=8, height=256, width=256, steps=4),
    # the same weights, the time embedding reading sigma through its slow features only (family.smooth_time):
    # the drift tests' stand-in for a trained Flux.2, whose modulation is smooth in sigma
    "flux2-smooth-tiny": dict(config=_TINY, text_tokens=8, height=256, width=256, steps=4, smooth_time=10.0),
    # Flux.2 editing: the tiny model with two reference latents (ComfyUI's [1, 128, h, w]), placed by "index"
    "flux2-edit-tiny": dict(config=_TINY, text_tokens=8, height=256, width=256, steps=4, references=((8, 6), (5, 9))),
}

TIME_FEATURES = (("time_guidance_embed.timestep_embedder.linear_1.weight", 0, 256),)  # diffusers' time_proj
MODULATIONS = {"double": ("double_stream_modulation_img", "double_stream_modulation_txt"),
               "single": ("single_stream_modulation",)}
SHARED_MODULES = ("time_guidance_embed", *MODULATIONS["double"], *MODULATIONS["single"])
FIRST_MODULES = ("x_embedder", "context_embedder")
LAST_MODULES = ("norm_out", "proj_out")

def shared_modules(blocks: list[Block]) -> tuple[str, ...]:
    """What a stage running ``blocks`` needs of SHARED_MODULES: the time/guidance embedding (every block's and the
    final layer's modulation start there) and the modulation layers of its kinds of block (Flux.2 dev's: 0.45 B
    parameters for the double blocks, 0.11 B for the single ones)."""
    kinds = {b.kind for b in blocks}
    return (SHARED_MODULES[0], *(m for kind in ("double", "single") if kind in kinds for m in MODULATIONS[kind]))


blocks_of = flux.blocks_of
block_cost = flux.block_cost
kv_buffers = flux.kv_buffers
embed_image = flux.embed_image


def build_meta(config: dict):
    return family.meta_model("Flux2Transformer2DModel", config)


def _residual(name: str) -> bool:
    return name.endswith(("attn.to_out.0.weight", "to_add_out.weight", "linear_out.weight")) \
        or (name.startswith("single") and name.endswith("attn.to_out.weight"))


def materialize(model, names: list[str], device: torch.device, dtype: torch.dtype, seed: int) -> None:
    family.materialize(model, names, device, dtype, seed, len(blocks_of(model)), _residual)


def latent_format(config: dict) -> LatentFormat:
    return LATENT


def conditioning_dims(config: dict) -> tuple[int, None]:
    return config.get("joint_attention_dim", REAL["joint_attention_dim"]), None


def condition_text(txt: torch.Tensor) -> torch.Tensor:
    """[B, n, D] -> [B, max(n, 512), D]: zeros in front, as ComfyUI's Flux2 model conditions its text."""
    return F.pad(txt, (0, 0, max(0, TEXT_LENGTH - txt.shape[1]), 0))


def text_tokens(n_txt: int) -> int:
    """Text tokens in the attention sequence for ``n_txt`` conditioning tokens (``condition_text``'s padding)."""
    return max(n_txt, TEXT_LENGTH)


def position_ids(rows: int, cols: int, n_txt: int) -> torch.Tensor:
    """ComfyUI's RoPE ids of ``[text; image]``: [n_txt + rows * cols, 4]."""
    txt = torch.zeros(n_txt, 4)
    txt[:, 3] = torch.arange(n_txt)
    img = torch.zeros(rows, cols, 4)
    img[..., 1] = torch.arange(rows)[:, None]
    img[..., 2] = torch.arange(cols)[None, :]
    return torch.cat([txt, img.reshape(rows * cols, 4)])


def reference_ids(refs, method: str, rows: int, cols: int) -> torch.Tensor:
    """ComfyUI's RoPE ids of the reference tokens [count(refs), 4] (``references.positions``, Flux.2's scale)."""
    return references.positions(refs, method, rows, cols, axes=4, index_scale=REF_INDEX_SCALE)


class Positions(NamedTuple):
    """A span's RoPE (cos, sin: [L, Dh] each) and how many of its text-stream tokens are text (the rest are
    reference tokens)."""

    cos: torch.Tensor
    sin: torch.Tensor
    n_text: int


class Embeddings:
    """Once per job and rank: the embedded text (and reference tokens) on the first stage, and the RoPE table
    (cos, sin) of ``[text; references; image]``."""

    def __init__(self, model, txt: torch.Tensor | None, n_txt: int, rows: int, cols: int, device: torch.device,
                 dtype: torch.dtype, refs=(), ref_method: str = REFERENCE_METHOD) -> None:
        ref_ids = reference_ids(refs, ref_method, rows, cols)
        self.n_text, self.n_txt = n_txt, n_txt + len(ref_ids)
        ids = position_ids(rows, cols, n_txt)
        ids = torch.cat([ids[:n_txt], ref_ids, ids[n_txt:]]).to(device)
        self.rope = model.pos_embed(ids)  # [S, Dh] each
        self.txt = None
        if txt is not None:
            self.txt = model.context_embedder(txt.to(device, dtype))  # [B, S_t, D]
            if refs:  # [B, S_t + S_ref, D]
                self.txt = torch.cat([self.txt, model.x_embedder(references.tokens(refs).to(device, dtype))], 1)
        self.extra = None

    def for_span(self, span) -> Positions:
        idx = span.joint_index(self.n_txt).to(self.rope[0].device)
        return Positions(self.rope[0][idx], self.rope[1][idx], min(max(self.n_text - span.t0, 0), span.n_txt))


def embeddings(model, txt: torch.Tensor | None, n_txt: int, rows: int, cols: int, device: torch.device,
               dtype: torch.dtype, refs=(), ref_method: str = REFERENCE_METHOD) -> Embeddings:
    """``refs``: reference latents [MB, C, h, w] in the sampling space, placed by ``ref_method``."""
    return Embeddings(model, txt, n_txt, rows, cols, device, dtype, refs, ref_method)


class Modulation:
    """One evaluation's time/guidance vector ``temb`` [MB, D] and the shared modulations computed from it, each
    once, when the first block of its kind on this rank asks (``of(name)``: [MB, 1, 3k x D])."""

    def __init__(self, model, temb: torch.Tensor) -> None:
        self.model, self.temb, self._mods = model, temb, {}

    def of(self, name: str) -> torch.Tensor:
        if name not in self._mods:
            self._mods[name] = getattr(self.model, name)(self.temb).unsqueeze(1)
        return self._mods[name]


def time_embedding(model, emb, t: torch.Tensor, pooled, guidance: torch.Tensor | None,
                   dtype: torch.dtype) -> Modulation:
    """As ComfyUI computes it: sinusoidal features of sigma x 1000 in float32, of the guidance cast to the compute
    dtype first (ComfyUI casts its extra conditions) x 1000, each cast to the compute dtype for its MLP."""
    tge = model.time_guidance_embed
    temb = tge.timestep_embedder(tge.time_proj(t.float() * 1000).to(dtype))
    if tge.guidance_embedder is not None:
        temb = temb + tge.guidance_embedder(tge.time_proj(guidance.to(t.device, dtype) * 1000).to(dtype))
    return Modulation(model, temb)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def double_block(blk, kv, span, txt, img, mod: Modulation, pos):
    """A double-stream block on one patch. txt: [B, span.n_txt, D] or None; img: [B, span.n_img, D]. Reference
    tokens at the end of ``txt`` go through the image stream's weights and modulation (they are image tokens)."""
    n_ref = 0 if txt is None else txt.shape[1] - pos.n_text
    if n_ref:
        txt, img = (txt[:, :pos.n_text] if pos.n_text else None), torch.cat([txt[:, pos.n_text:], img], 1)
    n_t = 0 if txt is None else txt.shape[1]
    attn = blk.attn
    i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = mod.of(MODULATIONS["double"][0]).chunk(6, dim=-1)  # [B, 1, D] each
    q, k, v = flux._qkv(attn, _modulate(blk.norm1(img), i_sh1, i_sc1), attn.to_q, attn.to_k, attn.to_v,
                        attn.norm_q, attn.norm_k)
    if txt is not None:
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = mod.of(MODULATIONS["double"][1]).chunk(6, dim=-1)
        tq, tk, tv = flux._qkv(attn, _modulate(blk.norm1_context(txt), t_sh1, t_sc1), attn.add_q_proj,
                               attn.add_k_proj, attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)
        q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
    q, k = flux._rope(q, k, pos)
    out = kv.attend(span, q, k, v).to(q.dtype)  # [B, L, D]
    t_out, i_out = out[:, :n_t], out[:, n_t:]

    img = img + i_g1 * attn.to_out[0](i_out.contiguous())
    img = flux._clip16(img + i_g2 * blk.ff(_modulate(blk.norm2(img), i_sh2, i_sc2)))
    if txt is not None:
        txt = txt + t_g1 * attn.to_add_out(t_out.contiguous())
        txt = flux._clip16(txt + t_g2 * blk.ff_context(_modulate(blk.norm2_context(txt), t_sh2, t_sc2)))
    if n_ref:
        ref, img = img[:, :n_ref], img[:, n_ref:]
        txt = ref if txt is None else torch.cat([txt, ref], 1)
    return txt, img


def single_block(blk, kv, span, txt, img, mod: Modulation, pos):
    """A single-stream block on one patch: the fused q, k, v and gated-MLP projection, then the fused output."""
    x = img if txt is None else torch.cat([txt, img], 1)  # [B, L, D]
    shift, scale, gate = mod.of(MODULATIONS["single"][0]).chunk(3, dim=-1)
    attn = blk.attn
    h = attn.to_qkv_mlp_proj(_modulate(blk.norm(x), shift, scale))
    qkv, mlp = h.split([3 * attn.inner_dim, h.shape[-1] - 3 * attn.inner_dim], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
    q, k = flux._rope(attn.norm_q(q), attn.norm_k(k), pos)
    out = kv.attend(span, q, k, v).to(q.dtype)
    x = flux._clip16(x + gate * attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], 2)))
    return (None, x) if txt is None else (x[:, :span.n_txt], x[:, span.n_txt:])


def run_blocks(model, blocks: list[Block], kvs: list, span, txt, img, temb: Modulation, pos):
    """Run ``blocks`` (one joint buffer each) on one patch; returns (txt or None, img)."""
    for block, (kv,) in zip(blocks, kvs):
        fn = double_block if block.kind == "double" else single_block
        txt, img = fn(module_of(model, block), kv, span, txt, img, temb, pos)
    return txt, img


def final_layer(model, img: torch.Tensor, temb: Modulation) -> torch.Tensor:
    """Image tokens -> predicted velocity per token. [B, L, D] -> [B, L, 128]"""
    return model.proj_out(model.norm_out(img, temb.temb))


def forward(model, x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, pooled, guidance: torch.Tensor | None,
            rows: int, cols: int, refs=(), ref_method: str = REFERENCE_METHOD) -> torch.Tensor:
    """diffusers' Flux2Transformer2DModel.forward over the whole packed latent [B, S, 128]: the serial reference
    (``txt`` as the model takes it, padded by ``condition_text``). Reference latents join the image tokens at
    their end, as ComfyUI's model places them; their outputs are dropped."""
    ids = position_ids(rows, cols, txt.shape[1])
    txt_ids, img_ids = ids[:txt.shape[1]], ids[txt.shape[1]:]
    if refs:
        x = torch.cat([x, references.tokens(refs).to(x)], 1)
        img_ids = torch.cat([img_ids, reference_ids(refs, ref_method, rows, cols)])
    out = model(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_ids=img_ids.to(x.device),
                txt_ids=txt_ids.to(x.device), guidance=guidance if model.config.guidance_embeds else None,
                return_dict=False)[0]
    return out[:, :rows * cols]
