"""Z-Image (Turbo) through diffusers' ZImageTransformer2DModel: the family protocol of ``family.py``.

A single-stream DiT (ComfyUI 0.3.75 runs it as its Lumina 2 model with ``z_image_modulation``):

    caption  -> cap_embedder -> padded to a multiple of 32 with cap_pad_token -> context_refiner (2 blocks,
                unmodulated, caption-only attention)        depends on neither image nor time: once per job
    image    -> x_embedder -> noise_refiner (2 modulated blocks, image-only attention)
    [caption; image] -> layers (modulated, one joint attention, shared weights) -> final layer (image tokens)

The engine's blocks are the noise refiner ("refiner": an image-only K/V buffer, text passes by untouched) and
the main layers ("single": a joint buffer, text rides along like Flux's single blocks). The refined caption is
the family's embedded text, made once per job on the first stage. Positions are 3-axis RoPE (theta 256):
caption token i at (1 + i, 0, 0) over the padded length L, image token (r, c) at (L + 1, r, c). The order of
the joint sequence does not matter (no mask, per-token RoPE): ComfyUI runs [caption; image], diffusers
[image; caption], the engine [text; image].

The model takes ``1 - sigma`` (ModelSamplingDiscreteFlow, shift 3, multiplier 1) and predicts minus the
velocity, tokens in (ph, pw, c) order: ``embed_image`` and ``final_layer`` convert from and to the latent's
(c, ph, pw) packing and negate. Latents are Flux's 16 channels. An image whose token count is not a multiple
of 32 would need image pad tokens (x_pad_token) inside the image-only refiner attention: refused with the
sizes that work.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import family
from .family import Block, LatentFormat, module_of, pack_latent, param_bytes, unpack_latent  # noqa: F401
from ..patches import Span

NAME = "zimage"
JOINT_TEXT = True
SAMPLING = "zimage"
LATENT = LatentFormat(channels=16, scale=0.3611, shift=0.1159,  # ComfyUI's Lumina2/ZImage: latent_formats.Flux
                      empty_node="EmptySD3LatentImage")
TEXT_ENCODERS = "the Z-Image text encoder: CLIPLoader type lumina2 with qwen_3_4b"
PAD = 32  # diffusers' SEQ_MULTI_OF, ComfyUI's pad_tokens_multiple
KEY = "2-1"  # patch 2, frame patch 1
REAL = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_refiner_layers=2, n_heads=30,
            n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
            axes_dims=(32, 48, 48), axes_lens=(1536, 512, 512))  # ComfyUI's Z-Image (dim 3840)

PRESETS: dict[str, dict] = {
    "zimage-tiny": dict(config=dict(REAL, dim=64, n_layers=4, n_heads=4, n_kv_heads=4, cap_feat_dim=40,
                                    axes_dims=(4, 6, 6)),
                        text_tokens=12, height=128, width=128, steps=4),
}

SHARED_MODULES = ("t_embedder",)
FIRST_MODULES = ("all_x_embedder", "cap_embedder", "context_refiner", "cap_pad_token")
LAST_MODULES = ("all_final_layer",)


def text_tokens(n_txt: int) -> int:
    """Caption tokens in the attention sequence: padded to a multiple of 32."""
    return n_txt + (-n_txt) % PAD


def build_meta(config: dict):
    return family.meta_model("ZImageTransformer2DModel", config)


def blocks_of(model) -> list[Block]:
    return [Block("refiner", i, f"noise_refiner.{i}") for i in range(len(model.noise_refiner))] + \
           [Block("single", i, f"layers.{i}") for i in range(len(model.layers))]


def _residual(name: str) -> bool:
    return name.endswith(("attention.to_out.0.weight", "feed_forward.w2.weight"))


def materialize(model, names: list[str], device: torch.device, dtype: torch.dtype, seed: int) -> None:
    family.materialize(model, names, device, dtype, seed, len(blocks_of(model)), _residual)


# a refiner block runs the image tokens only, a main layer the image and the caption: per image token both are
# the same block
block_cost = family.uniform_block_cost


def latent_format(config: dict) -> LatentFormat:
    return LATENT


def conditioning_dims(config: dict) -> tuple[int, int | None]:
    return config.get("cap_feat_dim", REAL["cap_feat_dim"]), None


# ----------------------------------------------------------------------------------------- positions

def position_ids(rows: int, cols: int, n_txt: int) -> torch.Tensor:
    """[L + rows * cols, 3] integer positions of [padded caption; image] (ComfyUI's and diffusers')."""
    n = text_tokens(n_txt)
    cap = torch.zeros(n, 3, dtype=torch.long)
    cap[:, 0] = torch.arange(n) + 1
    img = torch.zeros(rows, cols, 3, dtype=torch.long)
    img[..., 0] = n + 1
    img[..., 1] = torch.arange(rows)[:, None]
    img[..., 2] = torch.arange(cols)[None, :]
    return torch.cat([cap, img.reshape(-1, 3)])


def rope_table(ids: torch.Tensor, axes: tuple[int, ...], theta: float) -> torch.Tensor:
    """Complex rotations [S, Dh / 2], computed as diffusers' RopeEmbedder tabulates them (float64 angles)."""
    parts = []
    for a, d in enumerate(axes):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = torch.outer(ids[:, a].to(torch.float64), freqs).float()
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=1)


def _rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [B, L, H, Dh / 2]
    return torch.view_as_real(xc * rot[:, None]).flatten(3).type_as(x)


class Embeddings:
    """Once per job and rank: the RoPE table and, where text is needed, the refined padded caption."""

    def __init__(self, model, txt: torch.Tensor | None, n_txt: int, rows: int, cols: int,
                 device: torch.device) -> None:
        if (rows * cols) % PAD:
            raise ValueError(f"Z-Image at {rows * 16}x{cols * 16} has {rows}x{cols} = {rows * cols} image tokens, "
                             f"not a multiple of {PAD}: image pad tokens are not supported yet; choose a size "
                             f"whose (height / 16) x (width / 16) is a multiple of {PAD}, e.g. 1024x1024 or 1024x768")
        cfg = model.config
        self.n_txt = text_tokens(n_txt)
        self.rope = rope_table(position_ids(rows, cols, n_txt), tuple(cfg.axes_dims), cfg.rope_theta).to(device)
        self.txt = None if txt is None else refined_caption(model, txt, self.rope[:self.n_txt])
        self.extra = None

    def for_span(self, span) -> torch.Tensor:
        return self.rope[span.joint_index(self.n_txt).to(self.rope.device)]  # [L, Dh / 2] complex


def refined_caption(model, txt: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """[B, n, cap_dim] -> [B, L, D]: embedded, padded with cap_pad_token, through the context refiner."""
    cap = model.cap_embedder(txt)
    pad = rot.shape[0] - cap.shape[1]
    if pad:
        cap = torch.cat([cap, model.cap_pad_token.to(cap.dtype).expand(cap.shape[0], pad, -1)], 1)
    for blk in model.context_refiner:
        cap = block(blk, None, None, cap, None, rot)
    return cap


def embeddings(model, txt: torch.Tensor | None, n_txt: int, rows: int, cols: int, device: torch.device,
               dtype: torch.dtype) -> Embeddings:
    return Embeddings(model, None if txt is None else txt.to(device, dtype), n_txt, rows, cols, device)


def time_embedding(model, emb, t: torch.Tensor, pooled, guidance, dtype: torch.dtype) -> torch.Tensor:
    """adaLN input [MB, 256]: the model's time is 1 - sigma, scaled by t_scale, embedded in float32, the MLP in
    the compute dtype, as ComfyUI runs it (diffusers' TimestepEmbedder casts to its weight's dtype, which is
    float8 in a scaled-fp8 file)."""
    te = model.t_embedder
    return te.mlp(te.timestep_embedding((1.0 - t.float()) * model.config.t_scale,
                                        te.frequency_embedding_size).to(dtype)).to(dtype)


def embed_image(model, emb, x: torch.Tensor, span) -> torch.Tensor:
    """Packed tokens [B, L, 4C] in (c, ph, pw) order -> the model's (ph, pw, c) -> hidden states [B, L, D]."""
    return model.all_x_embedder[KEY](x.unflatten(-1, (-1, 2, 2)).permute(0, 1, 3, 4, 2).flatten(2))


def kv_buffers(model, block: Block, make) -> tuple:
    return (make("image"),) if block.kind == "refiner" else (make("joint"),)


def _attention(attn, x, kv, span, rot):
    q = attn.norm_q(attn.to_q(x).unflatten(-1, (attn.heads, -1)))
    k = attn.norm_k(attn.to_k(x).unflatten(-1, (attn.heads, -1)))
    v = attn.to_v(x).unflatten(-1, (attn.heads, -1))
    q, k = _rope(q, rot), _rope(k, rot)
    if kv is None:  # the caption refiner: the whole caption at once, no buffer
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)
    else:
        out = kv.attend(span, q, k, v)
    return attn.to_out[0](out.to(q.dtype))


def block(blk, kv, span, x, temb, rot):
    """One Z-Image block on tokens x [B, L, D] with rotations rot [L, Dh / 2]; modulated when temb is given."""
    if not blk.modulation:
        x = x + blk.attention_norm2(_attention(blk.attention, blk.attention_norm1(x), kv, span, rot))
        return x + blk.ffn_norm2(blk.feed_forward(blk.ffn_norm1(x)))
    sc_msa, g_msa, sc_mlp, g_mlp = blk.adaLN_modulation(temb).unsqueeze(1).chunk(4, dim=2)  # [B, 1, D] each
    x = x + g_msa.tanh() * blk.attention_norm2(_attention(blk.attention, blk.attention_norm1(x) * (1 + sc_msa),
                                                          kv, span, rot))
    return x + g_mlp.tanh() * blk.ffn_norm2(blk.feed_forward(blk.ffn_norm1(x) * (1 + sc_mlp)))


def run_blocks(model, blocks: list[Block], kvs: list, span, txt, img, temb, rot):
    """Refiner blocks on the span's image tokens (its own image-only buffer), main layers on [text; image]."""
    for b, (kv,) in zip(blocks, kvs):
        blk = module_of(model, b)
        if b.kind == "refiner":
            img = block(blk, kv, Span(0, 0, span.i0, span.i1), img, temb, rot[span.n_txt:])
            continue
        x = img if txt is None else torch.cat([txt, img], 1)
        x = block(blk, kv, span, x, temb, rot)
        txt, img = (None, x) if txt is None else (x[:, :span.n_txt], x[:, span.n_txt:])
    return txt, img


def final_layer(model, img: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """Image tokens -> ComfyUI's model output (minus the model's prediction), packed (c, ph, pw). [B, L, 4C]"""
    fl = model.all_final_layer[KEY]
    out = fl.linear(fl.norm_final(img) * (1 + fl.adaLN_modulation(temb)).unsqueeze(1))
    return -out.unflatten(-1, (2, 2, -1)).permute(0, 1, 4, 2, 3).flatten(2)


def forward(model, x: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, pooled, guidance,
            rows: int, cols: int) -> torch.Tensor:
    """diffusers' ZImageTransformer2DModel.forward over the whole latent, as ComfyUI calls its model (time
    1 - sigma, output negated): the serial reference. x: packed [B, S, 4C]. With float8 weights (a scaled-fp8 file)
    the time embedder's MLP runs in the compute dtype, as ComfyUI runs it, not on features rounded to float8."""
    latent = unpack_latent(x, 2 * rows, 2 * cols)
    te, hook = model.t_embedder, None
    if te.mlp[0].weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        hook = te.register_forward_hook(lambda mod, args, out: mod.mlp(
            mod.timestep_embedding(args[0], mod.frequency_embedding_size).to(x.dtype)))
    try:
        out = model([lat.unsqueeze(1) for lat in latent], 1.0 - t, [c for c in txt], return_dict=False)[0]
    finally:
        if hook is not None:
            hook.remove()
    return -pack_latent(torch.stack([o.squeeze(1) for o in out]))
