"""SD3's patch-wise blocks against diffusers' own forward, per-rank materialisation, and its layout."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.attention import StaleKV
from comfy_pipefusion.models import family, sd3
from comfy_pipefusion.patches import Span, full_span, image_bands

ROWS, COLS, N_TXT = 8, 8, 8
CPU = torch.device("cpu")


def build(preset: str, seed: int = 5):
    cfg = sd3.PRESETS[preset]["config"]
    model = sd3.build_meta(cfg)
    sd3.materialize(model, family.all_names(model), CPU, torch.float32, seed)
    return model


def make_kvs(model, blocks):
    cfg = model.config

    def make(kind):
        n_txt = N_TXT if kind == "joint" else 0
        return StaleKV(1, cfg.num_attention_heads, n_txt, ROWS * COLS, cfg.attention_head_dim, torch.float32, CPU)
    return [sd3.kv_buffers(model, b, make) for b in blocks]


def inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(1, ROWS * COLS, 64, generator=g)  # packed latent tokens
    txt = torch.randn(1, N_TXT, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    return x, txt, pooled, torch.tensor([600.0])  # t = sigma * 1000


def run_ours(model, x, txt, pooled, t, spans, kvs=None):
    blocks = sd3.blocks_of(model)
    kvs = kvs or make_kvs(model, blocks)
    emb = sd3.embeddings(model, txt, N_TXT, ROWS, COLS, CPU, torch.float32)
    temb = sd3.time_embedding(model, emb, t, pooled, None, torch.float32)
    outs = []
    for sp in spans:
        t_in = emb.txt[:, sp.t0:sp.t1] if sp.n_txt else None
        img = sd3.embed_image(model, emb, x[:, sp.i0:sp.i1], sp)
        txt_out, img = sd3.run_blocks(model, blocks, kvs, sp, t_in, img, temb, emb.for_span(sp))
        assert txt_out is None  # the last block is context_pre_only
        outs.append(sd3.final_layer(model, img, temb))
    return torch.cat(outs, 1), kvs


@pytest.fixture(scope="module", params=["sd3-tiny", "sd3.5m-tiny"])
def setup(request):
    model = build(request.param)
    x, txt, pooled, t = inputs(model)
    with torch.inference_mode():
        ref = sd3.forward(model, x, t, txt, pooled, None, ROWS, COLS)
    return model, x, txt, pooled, t, ref


def test_presets_have_the_features_they_test():
    dual = build("sd3.5m-tiny")
    assert [b.attn2 is not None for b in dual.transformer_blocks] == [True, True, False]
    assert dual.transformer_blocks[0].attn.norm_q is not None
    assert dual.transformer_blocks[-1].context_pre_only


def test_one_span_is_diffusers_forward(setup):
    model, x, txt, pooled, t, ref = setup
    with torch.inference_mode():
        ours, _ = run_ours(model, x, txt, pooled, t, [full_span(N_TXT, ROWS * COLS)])
    assert ref.shape == (1, ROWS * COLS, 64)
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float(ref.abs().max()) > 0.1


def test_bands_over_filled_buffers_are_diffusers_forward(setup):
    """Once the buffers hold this input's K/V, any band split (text K/V read from the buffer) is exact."""
    model, x, txt, pooled, t, ref = setup
    with torch.inference_mode():
        _, kvs = run_ours(model, x, txt, pooled, t, [full_span(N_TXT, ROWS * COLS)])
        spans = [Span(0, 0, a, b) for a, b in image_bands(ROWS, COLS, 3)]
        ours, _ = run_ours(model, x, txt, pooled, t, spans, kvs)
    assert float((ours - ref).abs().max()) <= 1e-5


def test_stale_buffers_change_the_result(setup):
    """The band test above is not vacuous: bands over buffers of another input give another output."""
    model, x, txt, pooled, t, ref = setup
    other = inputs(model, seed=1)
    with torch.inference_mode():
        _, kvs = run_ours(model, *other, [full_span(N_TXT, ROWS * COLS)])
        spans = [Span(0, 0, a, b) for a, b in image_bands(ROWS, COLS, 3)]
        ours, _ = run_ours(model, x, txt, pooled, t, spans, kvs)
    assert float((ours - ref).abs().max()) > 1e-3


def test_positions_are_the_centre_crop_of_the_table():
    model = build("sd3-tiny")
    table = model.pos_embed.pos_embed.reshape(12, 12, -1)
    pos = sd3.cropped_positions(model, 4, 6)
    assert torch.equal(pos.reshape(4, 6, -1), table[4:8, 3:9])
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size 12"):
        sd3.cropped_positions(model, 13, 4)


def test_positions_come_from_the_loaded_table():
    """Real checkpoints store their table (key pos_embed); it is used, not recomputed from the config."""
    model = build("sd3-tiny")
    x, txt, pooled, t = inputs(model)
    with torch.no_grad():
        model.pos_embed.pos_embed.mul_(-0.5)
    with torch.inference_mode():
        ref = sd3.forward(model, x, t, txt, pooled, None, ROWS, COLS)
        ours, _ = run_ours(model, x, txt, pooled, t, [full_span(N_TXT, ROWS * COLS)])
    assert float((ours - ref).abs().max()) <= 1e-5


def test_materialising_a_subset_leaves_the_rest_on_meta():
    model = sd3.build_meta(sd3.PRESETS["sd3.5m-tiny"]["config"])
    names = list(sd3.SHARED_MODULES) + list(sd3.LAST_MODULES) + ["transformer_blocks.2"]
    sd3.materialize(model, names, CPU, torch.float32, 5)
    held = {n for n, p in model.named_parameters() if not p.is_meta}
    assert held and all(n.startswith(tuple(names)) for n in held)
    assert model.transformer_blocks[1].attn2.to_q.weight.is_meta
    assert model.pos_embed.proj.weight.is_meta and model.pos_embed.pos_embed.is_meta
    assert family.param_bytes(model) == sum(p.numel() * 4 for n, p in model.named_parameters() if n in held)
    full = build("sd3.5m-tiny")  # same weights for any split
    assert torch.equal(model.transformer_blocks[2].ff.net[2].weight, full.transformer_blocks[2].ff.net[2].weight)


def test_block_cost_weighs_dual_attention():
    model = sd3.build_meta(sd3.PRESETS["sd3.5m-tiny"]["config"])
    blocks = sd3.blocks_of(model)
    assert [sd3.block_cost(model, b, "compute") for b in blocks] == [4 / 3, 4 / 3, 1.0]
    mem = [sd3.block_cost(model, b, "memory") for b in blocks]
    assert mem[0] == mem[1] > mem[2]


def test_latent_format_and_layout():
    cfg = sd3.PRESETS["sd3-tiny"]["config"]
    fmt = sd3.latent_format(cfg)
    assert (fmt.channels, fmt.scale, fmt.shift) == (16, 1.5305, 0.0609)
    lat = torch.randn(2, 16, 6, 10)
    assert torch.allclose(fmt.process_out(fmt.process_in(lat)), lat, atol=1e-6)
    assert sd3.conditioning_dims(cfg) == (32, 32)
    tokens = sd3.pack_latent(lat)
    assert torch.equal(sd3.unpack_latent(tokens, 6, 10), lat)
    assert torch.equal(tokens[0, 1 * 5 + 2].view(16, 2, 2), lat[0, :, 2:4, 4:6])


def test_final_layer_packs_like_the_latent():
    """proj_out emits (ph, pw, c) per token; the prediction is re-ordered to the latent's (c, ph, pw)."""
    out = torch.arange(2 * 2 * 3, dtype=torch.float32).view(1, 1, 12)  # value = (ph * 2 + pw) * 3 + c
    packed = sd3._to_packed(out, 2, 3).view(3, 2, 2)
    for c in range(3):
        for ph in range(2):
            for pw in range(2):
                assert packed[c, ph, pw] == (ph * 2 + pw) * 3 + c


def test_kv_buffers_are_real_buffers_only():
    """The engine walks every buffer of a block (DistriFusion's set_mode/finish): no placeholders."""
    model = sd3.build_meta(sd3.PRESETS["sd3.5m-tiny"]["config"])
    kinds = [sd3.kv_buffers(model, b, lambda kind: kind) for b in sd3.blocks_of(model)]
    assert kinds == [("joint", "image"), ("joint", "image"), ("joint",)]
