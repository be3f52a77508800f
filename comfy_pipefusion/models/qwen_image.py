"""Qwen-Image through diffusers' QwenImageTransformer2DModel: the family protocol of ``family.py``.

An MMDiT like Flux's double blocks, all blocks double-stream: text and image tokens keep their own weights
(``txt_mod``/``img_mod``, ``add_*_proj``/``to_*``, ``txt_mlp``/``img_mlp``) and meet in one joint attention
over ``[text; image]`` with RoPE on both. Positions follow ComfyUI 0.3.75 (comfy/ldm/qwen_image): image
token (r, c) sits at (0, r - rows // 2, c - cols // 2), text token i at ``max(rows // 2, cols // 2) + i``
on all three axes. diffusers' ``QwenEmbedRope`` (scale_rope) gives the same table for an even number of
token rows and columns and the ``index`` placement of references no larger than the image (for odd ones it
centres on the other side of the middle, and it starts the text after the largest of image and references):
the serial reference runs diffusers' own forward with ComfyUI's table in place of QwenEmbedRope's.

Text enters through ``txt_norm`` (RMS over Qwen2.5-VL's 3584 wide states) and ``txt_in``. The timestep is
sigma (ModelSamplingFlux, shift 1.15), scaled by 1000 inside ``time_text_embed``; no guidance embedding:
the model runs true CFG with a negative. Latents are the Wan 2.1 VAE's 16 channels with per-channel mean
and std (ComfyUI's latent_formats.Wan21), packed 2x2 like Flux's, channels (c, ph, pw) both in and out.

Qwen-Image-Edit (the same architecture and file layout): reference latents from ComfyUI's edit conditioning
(TextEncodeQwenImageEdit, ReferenceLatent) join the image tokens, go through the image stream's weights, and
sit at their own positions: with ComfyUI's default ``index`` placement reference i has frame index i + 1, with
any other method Flux's ``offset`` placement at frame index 1; every reference grid is centred on its middle like
the image's (``references.positions(..., centred=True)``). As for Flux.1 Kontext the engine carries them with the
text stream: the joint sequence is ``[text; references; image]``, and ``Positions.n_text`` tells a block where
text ends in a span.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import family, references
from .family import Block, LatentFormat, module_of, pack_latent, param_bytes, unpack_latent  # noqa: F401

NAME = "qwen_image"
JOINT_TEXT = True
REFERENCES = True  # takes ComfyUI's reference latents (Qwen-Image-Edit)
REFERENCE_METHOD = "index"  # ComfyUI's placement of them for Qwen-Image when the conditioning names none
SAMPLING = "flux"  # ComfyUI's QwenImage: ModelType.FLUX -> ModelSamplingFlux, shift 1.15
LATENT_FRAMES = True  # ComfyUI's LATENT is [B, 16, 1, h, w] (the Wan VAE's one-frame video latent)
WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
              0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
             3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
LATENT = LatentFormat(channels=16, scale=1.0, shift=0.0, mean=WAN21_MEAN, std=WAN21_STD,
                      empty_node="EmptySD3LatentImage")
TEXT_ENCODERS = "the Qwen-Image text encoder: CLIPLoader type qwen_image with qwen_2.5_vl_7b"
ROPE_THETA = 10000
REAL = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))  # what ComfyUI builds for any depth

PRESETS: dict[str, dict] = {
    # tests and the bench's exactness check: seconds
    "qwen-image-tiny": dict(config=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=4,
                                        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=48,
                                        axes_dims_rope=(4, 6, 6)),
                            text_tokens=8, height=128, width=128, steps=4),
    # Qwen-Image-Edit: the tiny model with two reference latents (one of odd width, padded as ComfyUI pads it)
    "qwen-image-edit-tiny": dict(config=dict(patch_size=2, in_channels=64, out_channels=16, num_layers=4,
                                             attention_head_dim=16, num_attention_heads=4, joint_attention_dim=48,
                                             axes_dims_rope=(4, 6, 6)),
                                 text_tokens=8, height=128, width=128, steps=4, references=((16, 12), (8, 11))),
}

SHARED_MODULES = ("time_text_embed",)
FIRST_MODULES = ("img_in", "txt_norm", "txt_in")
LAST_MODULES = ("norm_out", "proj_out")


def build_meta(config: dict):
    """The whole model on the meta device. Its RoPE module holds plain tensors (no parameters or buffers), so
    it is rebuilt on the CPU: diffusers' forward (the reference) needs its tables."""
    model = family.meta_model("QwenImageTransformer2DModel", config)
    model.pos_embed = type(model.pos_embed)(theta=ROPE_THETA, axes_dim=list(model.config.axes_dims_rope),
                                            scale_rope=True)
    return model


def blocks_of(model) -> list[Block]:
    return [Block("double", i, f"transformer_blocks.{i}") for i in range(len(model.transformer_blocks))]


def _residual(name: str) -> bool:
    return name.endswith(("attn.to_out.0.weight", "attn.to_add_out.weight", "img_mlp.net.2.weight",
                          "txt_mlp.net.2.weight"))


def materialize(model, names: list[str], device: torch.device, dtype: torch.dtype, seed: int) -> None:
    family.materialize(model, names, device, dtype, seed, len(blocks_of(model)), _residual)


block_cost = family.uniform_block_cost  # every block is the same double-stream block


def latent_format(config: dict) -> LatentFormat:
    return LATENT


def conditioning_dims(config: dict) -> tuple[int, int | None]:
    return config.get("joint_attention_dim", REAL["joint_attention_dim"]), None


# ----------------------------------------------------------------------------------------- positions

def position_ids(rows: int, cols: int, n_txt: int) -> torch.Tensor:
    """ComfyUI's ids of ``[text; image]``: [n_txt + rows * cols, 3] (axis 0: frame/reference index)."""
    img = torch.zeros(rows, cols, 3)
    img[..., 1] = (torch.arange(rows) - rows // 2)[:, None]
    img[..., 2] = (torch.arange(cols) - cols // 2)[None, :]
    start = max(rows // 2, cols // 2)
    txt = torch.arange(start, start + n_txt, dtype=torch.float32)[:, None].expand(n_txt, 3)
    return torch.cat([txt, img.reshape(rows * cols, 3)])


def reference_ids(refs, method: str, rows: int, cols: int) -> torch.Tensor:
    """ComfyUI's ids of the reference tokens [count(refs), 3]: ``index`` (its default) gives reference i the frame
    index i + 1, any other method Flux.1's ``offset`` placement (comfy/ldm/qwen_image/model.py knows only these
    two); each grid centred on its own middle."""
    return references.positions(refs, "index" if method == "index" else "offset", rows, cols, centred=True)


def rope_table(ids: torch.Tensor, axes: tuple[int, ...], theta: float = ROPE_THETA) -> torch.Tensor:
    """Complex rotations [S, Dh / 2] for positions ``ids`` [S, len(axes)], as diffusers' QwenEmbedRope builds
    them (float32 angles, ``torch.polar``), axis by axis."""
    parts = []
    for a, dim in enumerate(axes):
        omega = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim))
        angles = torch.outer(ids[:, a], omega)
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=1)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, Dh] rotated pairwise by ``rot`` [L, Dh / 2] (complex), in float32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot[:, None]).flatten(3).type_as(x)


class Positions(NamedTuple):
    """A span's RoPE rotations [L, Dh / 2] (complex) and how many of its text-stream tokens are text (the rest
    are reference tokens)."""

    rot: torch.Tensor
    n_text: int


class Embeddings:
    """Once per job and rank: the embedded text and references (first stage) and the RoPE table of
    ``[text; references; image]``."""

    def __init__(self, model, txt: torch.Tensor | None, n_txt: int, rows: int, cols: int, device: torch.device,
                 dtype: torch.dtype, refs=(), ref_method: str = REFERENCE_METHOD) -> None:
        ref_ids = reference_ids(refs, ref_method, rows, cols)
        self.n_text, self.n_txt = n_txt, n_txt + len(ref_ids)
        ids = position_ids(rows, cols, n_txt)
        ids = torch.cat([ids[:n_txt], ref_ids, ids[n_txt:]])
        self.rope = rope_table(ids, tuple(model.config.axes_dims_rope)).to(device)
        self.txt = None
        if txt is not None:
            self.txt = model.txt_in(model.txt_norm(txt.to(device, dtype)))  # [B, S_t, D]
            if refs:  # [B, S_t + S_ref, D]
                self.txt = torch.cat([self.txt, model.img_in(references.tokens(refs).to(device, dtype))], 1)
        self.extra = None

    def for_span(self, span) -> Positions:
        n_text = min(max(self.n_text - span.t0, 0), span.n_txt)
        return Positions(self.rope[span.joint_index(self.n_txt).to(self.rope.device)], n_text)


def embeddings(model, txt: torch.Tensor | None, n_txt: int, rows: int, cols: int, device: torch.device,
               dtype: torch.dtype, refs=(), ref_method: str = REFERENCE_METHOD) -> Embeddings:
    """``refs``: reference latents [MB, C, h, w] in the sampling space (Qwen-Image-Edit), placed by ``ref_method``."""
    return Embeddings(model, txt, n_txt, rows, cols, device, dtype, refs, ref_method)


def time_embedding(model, emb, t: torch.Tensor, pooled, guidance, dtype: torch.dtype) -> torch.Tensor:
    """temb [MB, D]: sigma's sinusoidal features (x1000 inside ``time_proj``) in float32, as ComfyUI feeds
    it, then the MLP in the compute dtype."""
    tte = model.time_text_embed
    return tte.timestep_embedder(tte.time_proj(t.float()).to(dtype))


def embed_image(model, emb, x: torch.Tensor, span) -> torch.Tensor:
    return model.img_in(x)  # [B, L, D]; positions enter through RoPE


def kv_buffers(model, block: Block, make) -> tuple:
    return (make("joint"),)


def _modulate(x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shift, scale, gate = params.chunk(3, dim=-1)  # [B, D] each
    return x * (1 + scale[:, None]) + shift[:, None], gate[:, None]


def _clip16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def double_block(blk, kv, span, txt, img, temb, pos):
    """One Qwen-Image block on one patch. txt: [B, span.n_txt, D] or None; img: [B, span.n_img, D]. Reference
    tokens at the end of ``txt`` go through the image stream's weights (they are image tokens)."""
    n_ref = 0 if txt is None else txt.shape[1] - pos.n_text
    if n_ref:
        txt, img = (txt[:, :pos.n_text] if pos.n_text else None), torch.cat([txt[:, pos.n_text:], img], 1)
    n_t = 0 if txt is None else txt.shape[1]
    attn = blk.attn
    dh = attn.inner_dim // attn.heads
    img1, img2 = blk.img_mod(temb).chunk(2, dim=-1)
    x, g1 = _modulate(blk.img_norm1(img), img1)
    q = attn.norm_q(attn.to_q(x).unflatten(-1, (-1, dh)))
    k = attn.norm_k(attn.to_k(x).unflatten(-1, (-1, dh)))
    v = attn.to_v(x).unflatten(-1, (-1, dh))
    if txt is not None:
        txt1, txt2 = blk.txt_mod(temb).chunk(2, dim=-1)
        c, c_g1 = _modulate(blk.txt_norm1(txt), txt1)
        tq = attn.norm_added_q(attn.add_q_proj(c).unflatten(-1, (-1, dh)))
        tk = attn.norm_added_k(attn.add_k_proj(c).unflatten(-1, (-1, dh)))
        tv = attn.add_v_proj(c).unflatten(-1, (-1, dh))
        q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
    q, k = apply_rope(q, pos.rot), apply_rope(k, pos.rot)
    out = kv.attend(span, q, k, v).to(q.dtype)  # [B, L, D]
    t_out, i_out = out[:, :n_t], out[:, n_t:]

    img = img + g1 * attn.to_out[0](i_out.contiguous())
    x, g2 = _modulate(blk.img_norm2(img), img2)
    img = _clip16(img + g2 * blk.img_mlp(x))
    if txt is not None:
        txt = txt + c_g1 * attn.to_add_out(t_out.contiguous())
        c, c_g2 = _modulate(blk.txt_norm2(txt), txt2)
        txt = _clip16(txt + c_g2 * blk.txt_mlp(c))
    if n_ref:
        ref, img = img[:, :n_ref], img[:, n_ref:]
        txt = ref if txt is None else torch.cat([txt, ref], 1)
    return txt, img


def run_blocks(model, blocks: list[Block], kvs: list, span, txt, img, temb, pos):
    """Run ``blocks`` (one joint buffer each) on one patch; returns (txt or None, img)."""
    for block, (kv,) in zip(blocks, kvs):
        txt, img = double_block(module_of(model, block), kv, span, txt, img, temb, pos)
    return txt, img


def final_layer(model, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """Image tokens -> predicted velocity, packed like the latent (c, ph, pw). [B, L, D] -> [B, L, 64]"""
    return model.proj_out(model.norm_out(img, temb))


class _ComfyRope(torch.nn.Module):
    """Stands in for diffusers' QwenEmbedRope during ``forward``: the rotations of ComfyUI's positions, returned
    as QwenEmbedRope returns them (image and reference tokens, text tokens)."""

    def __init__(self, vid: torch.Tensor, txt: torch.Tensor) -> None:
        super().__init__()
        self.vid, self.txt = vid, txt

    def forward(self, img_shapes, max_txt_seq_len, device=None):
        return self.vid.to(device), self.txt.to(device)


def forward(model, x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, pooled, guidance,
            rows: int, cols: int, refs=(), ref_method: str = REFERENCE_METHOD) -> torch.Tensor:
    """diffusers' QwenImageTransformer2DModel.forward over the whole packed latent [B, S, 64]: the reference.
    Reference latents join the image tokens at their end with their shapes in ``img_shapes``, as diffusers'
    QwenImageEditPipeline passes them; their outputs are dropped. The rotations are ComfyUI's positions (diffusers'
    own for even grids, the index placement and references no larger than the image)."""
    n_txt, axes = txt.shape[1], tuple(model.config.axes_dims_rope)
    ids = position_ids(rows, cols, n_txt)
    vid = torch.cat([ids[n_txt:], reference_ids(refs, ref_method, rows, cols)])
    shapes = [(1, rows, cols)] + [(1, *references.token_grid(r)) for r in refs]
    if refs:
        x = torch.cat([x, references.tokens(refs).to(x)], 1)
    diffusers_rope = model.pos_embed
    model.pos_embed = _ComfyRope(rope_table(vid, axes), rope_table(ids[:n_txt], axes))
    try:
        out = model(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_shapes=[shapes] * x.shape[0],
                    return_dict=False)[0]
    finally:
        model.pos_embed = diffusers_rope
    return out[:, :rows * cols]
