"""Our patch-wise Flux blocks against diffusers' own forward, and per-rank materialisation."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.attention import StaleKV
from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.models import flux
from comfy_pipefusion.parallel.plan import ModelSource, balanced_split, load_rank_model, rank_modules
from comfy_pipefusion.patches import Span, full_span, image_bands


@pytest.fixture(scope="module")
def setup(serial_model):
    torch.manual_seed(0)
    cfg = flux.PRESETS["tiny"]["config"]
    rows, cols, n_txt = 8, 8, 8
    x = torch.randn(1, rows * cols, 64)
    txt = torch.randn(1, n_txt, cfg["joint_attention_dim"])
    pooled = torch.randn(1, cfg["pooled_projection_dim"])
    sigma, guidance = torch.tensor([0.6]), torch.tensor([3.5])
    img_ids, txt_ids = flux.image_ids(rows, cols), torch.zeros(n_txt, 3)
    with torch.inference_mode():
        ref = serial_model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=sigma,
                           img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
    return serial_model, x, txt, pooled, sigma, guidance, img_ids, txt_ids, ref


def run_ours(model, x, txt, pooled, sigma, guidance, img_ids, txt_ids, spans, kvs=None):
    blocks = flux.blocks_of(model)
    cfg = model.config
    kvs = kvs or [(StaleKV(1, cfg.num_attention_heads, txt.shape[1], x.shape[1], cfg.attention_head_dim,
                           torch.float32, torch.device("cpu")),) for _ in blocks]
    rows = int(img_ids[:, 1].max()) + 1
    emb = flux.embeddings(model, txt, txt.shape[1], rows, x.shape[1] // rows, torch.device("cpu"), torch.float32)
    temb = flux.time_embedding(model, emb, sigma, pooled, guidance, torch.float32)
    outs = []
    for sp in spans:
        t = emb.txt[:, sp.t0:sp.t1] if sp.n_txt else None
        img = flux.embed_image(model, emb, x[:, sp.i0:sp.i1], sp)
        _, img = flux.run_blocks(model, blocks, kvs, sp, t, img, temb, emb.for_span(sp))
        outs.append(flux.final_layer(model, img, temb))
    return torch.cat(outs, 1), kvs


def test_one_span_is_diffusers_forward(setup):
    model, x, txt, pooled, sigma, guidance, img_ids, txt_ids, ref = setup
    with torch.inference_mode():
        ours, _ = run_ours(model, x, txt, pooled, sigma, guidance, img_ids, txt_ids, [full_span(8, 64)])
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float(ref.abs().max()) > 0.1


def test_bands_over_filled_buffers_are_diffusers_forward(setup):
    """Once the buffers hold this input's K/V, any band split (text K/V read from the buffer) is exact."""
    model, x, txt, pooled, sigma, guidance, img_ids, txt_ids, ref = setup
    with torch.inference_mode():
        _, kvs = run_ours(model, x, txt, pooled, sigma, guidance, img_ids, txt_ids, [full_span(8, 64)])
        spans = [Span(0, 0, a, b) for a, b in image_bands(8, 8, 3)]
        ours, _ = run_ours(model, x, txt, pooled, sigma, guidance, img_ids, txt_ids, spans, kvs)
    assert float((ours - ref).abs().max()) <= 1e-5


def test_pack_unpack_roundtrip():
    lat = torch.randn(2, 16, 6, 10)
    tokens = flux.pack_latent(lat)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(flux.unpack_latent(tokens, 6, 10), lat)
    # token (row 1, col 2) holds latent pixels rows 2..3, cols 4..5, channel-major
    assert torch.equal(tokens[0, 1 * 5 + 2].view(16, 2, 2), lat[0, :, 2:4, 4:6])


def test_balanced_split():
    assert balanced_split([1] * 6, 2) == (3, 3)
    assert balanced_split([1] * 7, 3) in {(2, 2, 3), (2, 3, 2), (3, 2, 2)}
    assert balanced_split([36, 36, 15, 15, 15, 15], 2) == (2, 4)
    assert balanced_split([5, 1, 1, 1], 2) == (1, 3)
    with pytest.raises(ValueError, match="cannot split 2 blocks into 3 stages"):
        balanced_split([1, 1], 3)


def test_rank_materialises_only_its_stage():
    cfg = flux.PRESETS["tiny"]["config"]
    par = ParallelConfig(strategy="pipefusion", world_size=2)
    model, blocks = load_rank_model(ModelSource(preset="tiny"), par, 1, torch.device("cpu"), torch.float32)
    held = {n for n, p in model.named_parameters() if not p.is_meta}
    assert blocks == flux.blocks_of(model)[3:]
    assert all(n.startswith(tuple(rank_modules(flux, model, par, 1))) for n in held)
    assert not any(n.startswith(("x_embedder", "context_embedder", "transformer_blocks")) for n in held)
    assert model.single_transformer_blocks[0].proj_out.weight.is_meta
    assert not model.single_transformer_blocks[3].proj_out.weight.is_meta


def test_weights_do_not_depend_on_the_split(serial_model):
    cfg = flux.PRESETS["tiny"]["config"]
    par = ParallelConfig(strategy="pipefusion", world_size=2)
    model, _ = load_rank_model(ModelSource(preset="tiny"), par, 1, torch.device("cpu"), torch.float32)
    a = model.single_transformer_blocks[3].attn.to_q.weight
    assert torch.equal(a, serial_model.single_transformer_blocks[3].attn.to_q.weight)


def test_without_guidance_embedding_matches_diffusers():
    """Flux.1-schnell has no guidance embedding: the same patch-wise path, no guidance input."""
    cfg = {**flux.PRESETS["tiny"]["config"], "guidance_embeds": False}
    model = flux.build_meta(cfg)
    flux.materialize(model, [n for n, m in model.named_children() if any(True for _ in m.parameters())],
                     torch.device("cpu"), torch.float32, 3)
    torch.manual_seed(1)
    x, txt = torch.randn(1, 64, 64), torch.randn(1, 8, cfg["joint_attention_dim"])
    pooled, sigma = torch.randn(1, cfg["pooled_projection_dim"]), torch.tensor([0.4])
    img_ids, txt_ids = flux.image_ids(8, 8), torch.zeros(8, 3)
    with torch.inference_mode():
        ref = model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=sigma,
                    img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        ours, _ = run_ours(model, x, txt, pooled, sigma, None, img_ids, txt_ids, [full_span(8, 64)])
    assert float((ours - ref).abs().max()) <= 1e-5
