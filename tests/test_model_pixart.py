"""PixArt's patch-wise blocks against diffusers' own forward, per-rank materialisation, and its layout."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.attention import StaleKV
from comfy_pipefusion.models import family, pixart
from comfy_pipefusion.patches import Span, image_bands

ROWS, COLS, N_TXT = 8, 8, 8
CPU = torch.device("cpu")


def build(preset: str, seed: int = 5, **changes):
    model = pixart.build_meta({**pixart.PRESETS[preset]["config"], **changes})
    pixart.materialize(model, family.all_names(model), CPU, torch.float32, seed)
    return model


def make_kvs(model, blocks, rows=ROWS, cols=COLS):
    cfg = model.config

    def make(kind):
        assert kind == "image"
        return StaleKV(1, cfg.num_attention_heads, 0, rows * cols, cfg.attention_head_dim, torch.float32, CPU)
    return [pixart.kv_buffers(model, b, make) for b in blocks]


def inputs(model, seed=0, rows=ROWS, cols=COLS):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows * cols, 16, generator=g)  # packed 4-channel latent tokens
    txt = torch.randn(1, N_TXT, model.config.caption_channels, generator=g)
    return x, txt, torch.tensor([601.0])  # discrete timestep


def run_ours(model, x, txt, t, spans, kvs=None, rows=ROWS, cols=COLS):
    blocks = pixart.blocks_of(model)
    kvs = kvs or make_kvs(model, blocks, rows, cols)
    emb = pixart.embeddings(model, txt, 0, rows, cols, CPU, torch.float32)
    temb = pixart.time_embedding(model, emb, t, None, None, torch.float32)
    outs = []
    for sp in spans:
        img = pixart.embed_image(model, emb, x[:, sp.i0:sp.i1], sp)
        txt_out, img = pixart.run_blocks(model, blocks, kvs, sp, None, img, temb, emb.for_span(sp))
        assert txt_out is None
        outs.append(pixart.final_layer(model, img, temb))
    return torch.cat(outs, 1), kvs


def whole(rows=ROWS, cols=COLS):
    return [Span(0, 0, 0, rows * cols)]


@pytest.fixture(scope="module", params=["pixart-tiny", "pixart-alpha-tiny"])
def setup(request):
    model = build(request.param)
    x, txt, t = inputs(model)
    with torch.inference_mode():
        ref = pixart.forward(model, x, t, txt, None, None, ROWS, COLS)
    return model, x, txt, t, ref


def test_one_span_is_diffusers_forward(setup):
    model, x, txt, t, ref = setup
    with torch.inference_mode():
        ours, _ = run_ours(model, x, txt, t, whole())
    assert ref.shape == (1, ROWS * COLS, 16)
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float(ref.abs().max()) > 0.1


def test_bands_over_filled_buffers_are_diffusers_forward(setup):
    """Once the buffers hold this input's K/V, any band split is exact (the caption is never stale)."""
    model, x, txt, t, ref = setup
    with torch.inference_mode():
        _, kvs = run_ours(model, x, txt, t, whole())
        spans = [Span(0, 0, a, b) for a, b in image_bands(ROWS, COLS, 3)]
        ours, _ = run_ours(model, x, txt, t, spans, kvs)
        _, stale = run_ours(model, inputs(model, seed=1)[0], txt, t, whole())
        mixed, _ = run_ours(model, x, txt, t, spans, stale)
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float((mixed - ref).abs().max()) > 1e-3  # stale buffers do matter: the test above can fail


def test_uneven_latent_matches_diffusers():
    """A non-square latent away from the native size: positions for the full latent, bands take rows."""
    model = build("pixart-tiny")
    rows, cols = 6, 10
    x, txt, t = inputs(model, rows=rows, cols=cols)
    with torch.inference_mode():
        ref = pixart.forward(model, x, t, txt, None, None, rows, cols)
        _, kvs = run_ours(model, x, txt, t, whole(rows, cols), rows=rows, cols=cols)
        spans = [Span(0, 0, a, b) for a, b in image_bands(rows, cols, 4)]
        ours, _ = run_ours(model, x, txt, t, spans, kvs, rows=rows, cols=cols)
    assert float((ours - ref).abs().max()) <= 1e-5


def test_resolution_conditions_change_alpha_only():
    """α's time embedding sees the image size; Σ's does not."""
    for preset, differs in (("pixart-alpha-tiny", True), ("pixart-tiny", False)):
        model = build(preset)
        temb = [pixart.time_embedding(model, pixart.embeddings(model, None, 0, r, c, CPU, torch.float32),
                                      torch.tensor([500.0]), None, None, torch.float32).mod
                for r, c in ((8, 8), (6, 10))]
        assert bool((temb[0] - temb[1]).abs().max() > 1e-4) == differs


def test_positions_at_native_size_are_diffusers_table():
    """At its native size the table is the one diffusers' PatchEmbed builds for the checkpoint."""
    from diffusers.models.embeddings import PatchEmbed

    for sample, interp in ((16, 1), (128, 2)):
        cfg = dict(patch_size=2, sample_size=sample, num_attention_heads=2, attention_head_dim=16)
        pe = PatchEmbed(height=sample, width=sample, patch_size=2, in_channels=4, embed_dim=32,
                        interpolation_scale=interp)
        ours = pixart.positions(cfg, sample // 2, sample // 2)
        assert torch.allclose(ours, pe.pos_embed[0], atol=1e-6)


def test_positions_follow_the_input_size_like_comfyui():
    """ComfyUI's base size follows the input: a 1024 px latent on a 512 model (interpolation 2) gets the
    grid diffusers builds for a 1024 model, not the one it would build for the 512 model at that size."""
    from diffusers.models.embeddings import PatchEmbed

    cfg = dict(patch_size=2, sample_size=64, num_attention_heads=2, attention_head_dim=16, interpolation_scale=2)
    ours = pixart.positions(cfg, 64, 64)
    native_1024 = PatchEmbed(height=128, width=128, patch_size=2, in_channels=4, embed_dim=32,
                             interpolation_scale=2).pos_embed[0]
    assert torch.allclose(ours, native_1024, atol=1e-6)
    pe_512 = PatchEmbed(height=64, width=64, patch_size=2, in_channels=4, embed_dim=32, interpolation_scale=2)
    diffusers_512 = pe_512(torch.zeros(1, 4, 128, 128)) - pe_512.proj(torch.zeros(1, 4, 128, 128)).flatten(2).mT
    assert not torch.allclose(ours, diffusers_512[0], atol=1e-3)


def test_materialising_a_subset_leaves_the_rest_on_meta():
    model = pixart.build_meta(pixart.PRESETS["pixart-tiny"]["config"])
    names = list(pixart.SHARED_MODULES) + list(pixart.LAST_MODULES) + ["transformer_blocks.1"]
    pixart.materialize(model, names, CPU, torch.float32, 5)
    held = {n for n, p in model.named_parameters() if not p.is_meta}
    assert "scale_shift_table" in held  # a root parameter, not a submodule
    assert held and all(n.startswith(tuple(names)) for n in held)
    assert model.transformer_blocks[0].attn1.to_q.weight.is_meta and model.pos_embed.proj.weight.is_meta
    assert family.param_bytes(model) == sum(p.numel() * 4 for n, p in model.named_parameters() if n in held)
    full = build("pixart-tiny")
    assert torch.equal(model.scale_shift_table, full.scale_shift_table)
    assert torch.equal(model.transformer_blocks[1].ff.net[2].weight, full.transformer_blocks[1].ff.net[2].weight)


def test_caption_kv_is_computed_once_per_block():
    model = build("pixart-tiny")
    x, txt, t = inputs(model)
    emb = pixart.embeddings(model, txt, 0, ROWS, COLS, CPU, torch.float32)
    cache = emb.extra["caption_kv"]
    blk = model.transformer_blocks[0].attn2
    k, v = cache.get("transformer_blocks.0", blk)
    assert k.shape == (1, N_TXT, 4, 24)
    assert cache.get("transformer_blocks.0", blk)[0] is k


def test_latent_formats_and_layout():
    alpha = pixart.latent_format(pixart.PRESETS["pixart-alpha-tiny"]["config"])
    sigma = pixart.latent_format(pixart.PRESETS["pixart-tiny"]["config"])
    assert (alpha.channels, alpha.scale, alpha.shift) == (4, 0.18215, 0.0)
    assert (sigma.channels, sigma.scale, sigma.shift) == (4, 0.13025, 0.0)
    assert pixart.latent_format({"sample_size": 128}) == alpha  # α-1024's diffusers config: micro-conditioned
    assert pixart.conditioning_dims(pixart.PRESETS["pixart-tiny"]["config"]) == (32, None)
    lat = torch.randn(2, 4, 6, 10)
    tokens = pixart.pack_latent(lat)
    assert tokens.shape == (2, 15, 16)
    assert torch.equal(pixart.unpack_latent(tokens, 6, 10), lat)
    assert torch.allclose(sigma.process_out(sigma.process_in(lat)), lat, atol=1e-6)
