"""Flux.1 Kontext: reference latents (ComfyUI's ReferenceLatent) join the sequence and ride with the text
stream. Our patch-wise blocks against diffusers' forward over [image; references], ComfyUI's placement of
the references, and the strategies on real 2- and 4-rank torchrun groups against serial."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.attention import StaleKV
from comfy_pipefusion.config import ParallelConfig, SampleSpec
from comfy_pipefusion.job import make_problem
from comfy_pipefusion.models import family, flux, references
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.patches import Span, displaced_spans, full_span, pipefusion_spans
from family_suite import TOL, Suite

PRESET = "kontext-tiny"


@pytest.fixture(scope="module")
def model():
    return load_rank_model(ModelSource(preset=PRESET), ParallelConfig("serial", 1), 0, torch.device("cpu"),
                           torch.float32)[0]


def _inputs(method: str = "offset"):
    g = torch.Generator().manual_seed(3)
    cfg = flux.PRESETS[PRESET]["config"]
    rows, cols, n_txt = 8, 8, 8
    refs = (torch.randn(1, 16, 12, 8, generator=g), torch.randn(1, 16, 9, 6, generator=g))
    x = torch.randn(1, rows * cols, 64, generator=g)
    txt = torch.randn(1, n_txt, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g)
    return x, txt, pooled, torch.tensor([0.6]), torch.tensor([3.5]), rows, cols, refs


def _ours(model, x, txt, pooled, sigma, guidance, rows, cols, refs, spans, method="offset", kvs=None):
    blocks, cfg = flux.blocks_of(model), model.config
    emb = flux.embeddings(model, txt, txt.shape[1], rows, cols, torch.device("cpu"), torch.float32, refs, method)
    n_stream = emb.txt.shape[1]
    kvs = kvs or [(StaleKV(1, cfg.num_attention_heads, n_stream, rows * cols, cfg.attention_head_dim,
                           torch.float32, torch.device("cpu")),) for _ in blocks]
    temb = flux.time_embedding(model, emb, sigma, pooled, guidance, torch.float32)
    outs = []
    for sp in spans:
        t = emb.txt[:, sp.t0:sp.t1] if sp.n_txt else None
        _, img = flux.run_blocks(model, blocks, kvs, sp, t, flux.embed_image(model, emb, x[:, sp.i0:sp.i1], sp),
                                 temb, emb.for_span(sp))
        outs.append(flux.final_layer(model, img, temb))
    return torch.cat(outs, 1), kvs, n_stream


@pytest.mark.parametrize("method", references.METHODS)
def test_kontext_one_span_is_diffusers_forward(model, method):
    x, txt, pooled, sigma, guidance, rows, cols, refs = _inputs()
    with torch.inference_mode():
        ref = flux.forward(model, x, sigma, txt, pooled, guidance, rows, cols, refs, method)
        plain = flux.forward(model, x, sigma, txt, pooled, guidance, rows, cols)
        n = txt.shape[1] + references.count(refs)
        ours, _, n_stream = _ours(model, x, txt, pooled, sigma, guidance, rows, cols, refs, [full_span(n, 64)],
                                  method)
    assert n_stream == n == 8 + 6 * 4 + 5 * 3  # the 9-row reference is padded to 10 rows
    assert float((ours - ref).abs().max()) <= TOL
    assert float((ref - plain).abs().max()) > 0.05  # the references change the prediction


def test_kontext_split_streams_over_filled_buffers(model):
    """Once the buffers hold this input's K/V, any split of the text stream (DistriFusion's bands cut it
    inside the text and inside the references; PipeFusion's carry it whole) is exact: the text and
    reference tokens of each span go through their own stream's weights."""
    x, txt, pooled, sigma, guidance, rows, cols, refs = _inputs()
    n = txt.shape[1] + references.count(refs)
    with torch.inference_mode():
        ref = flux.forward(model, x, sigma, txt, pooled, guidance, rows, cols, refs)
        _, kvs, _ = _ours(model, x, txt, pooled, sigma, guidance, rows, cols, refs, [full_span(n, 64)])
        for spans in (displaced_spans(rows, cols, n, 4), displaced_spans(rows, cols, n, 3),
                      pipefusion_spans(rows, cols, n, 3, "first_patch"), [Span(0, 5, 0, 64), Span(5, n, 0, 0)]):
            ours, _, _ = _ours(model, x, txt, pooled, sigma, guidance, rows, cols, refs, spans, kvs=kvs)
            assert float((ours[:, :64] - ref).abs().max()) <= TOL, spans


def test_kontext_reference_positions():
    """ComfyUI's placements (comfy/ldm/flux/model.py): offset puts a second reference beside the first
    (right when that keeps the area square, else below), index counts time indices, uxo goes past the image."""
    a, b = torch.zeros(1, 16, 12, 8), torch.zeros(1, 16, 9, 6)
    off = references.positions((a, b), "offset", 8, 8)
    assert off.shape == (6 * 4 + 5 * 3, 3)
    assert torch.equal(off[0], torch.tensor([1.0, 0, 0])) and torch.equal(off[23], torch.tensor([1.0, 5, 3]))
    assert torch.equal(off[24], torch.tensor([1.0, 0, 4]))  # 12 + 0 > 8 + 0: b goes right of a (w offset 8 px)
    idx = references.positions((a, b), "index", 8, 8)
    assert idx[0, 0] == 1 and idx[24, 0] == 2 and float(idx[24, 1:].abs().sum()) == 0
    uxo = references.positions((a, b), "uxo", 8, 8)
    assert torch.equal(uxo[0], torch.tensor([0.0, 8, 8])) and torch.equal(uxo[24], torch.tensor([0.0, 14, 12]))
    with pytest.raises(ValueError, match="method 'sideways' is unknown"):
        references.check_method("sideways")


def test_kontext_refusals():
    spec = SampleSpec(height=128, width=128, steps=2, cfg=3.0)
    txt, pooled = torch.zeros(1, 8, 32), torch.zeros(1, 32)
    ref = [torch.zeros(1, 16, 8, 8)]
    with pytest.raises(ValueError, match="same ReferenceLatent"):
        make_problem(spec, txt, pooled, refs=ref, negative=(txt, pooled))
    with pytest.raises(ValueError, match="needs 16 channels"):
        make_problem(SampleSpec(height=128, width=128, steps=2), txt, pooled, refs=[torch.zeros(1, 4, 8, 8)])
    with pytest.raises(ValueError, match="pixart model does not take"):
        make_problem(SampleSpec(height=128, width=128, steps=2), torch.zeros(1, 8, 4096), None, fam="pixart",
                     fmt=family.LatentFormat(16, 1.0), refs=ref)


@pytest.fixture(scope="module")
def suite():
    return Suite(PRESET)


@pytest.mark.parametrize("world", [2, 4])
def test_kontext_synchronous_and_frozen_equal_serial(world, suite):
    suite.check_exact(world)


@pytest.mark.parametrize("world", [2, 4])
def test_kontext_staleness_is_bounded(world, suite):
    """One warm-up step: stale K/V (with the references carried by the text stream) drift at least 3x less
    than bands that never see each other."""
    suite.check_staleness(world)


def test_kontext_cfg(suite):
    """[positive; negative], each with its references, in one model batch."""
    suite.check_cfg()


def test_kontext_cfg_and_ulysses_strategies(suite):
    """The strategies main gained beside ours carry the references too: CFG parallelism gives each branch its
    half of the [positive; negative] reference batch, Ulysses sends them with the text; both equal serial
    (up to float32 summation order: the branches run batches of one instead of two)."""
    from comfy_pipefusion.oneshot import run_jobs
    from family_suite import STEPS, sample
    from frozen_sampler import WORKER_ARGS

    jobs = [{"name": "cfg", "sample": sample(PRESET, "euler", STEPS, cfg=3.0), "parallel": {"strategy": "cfg"}},
            {"name": "ulysses", "sample": sample(PRESET, "euler", STEPS), "parallel": {"strategy": "ulysses"}}]
    out = run_jobs(PRESET, 0, jobs, world_size=2, timeout=300, worker_args=WORKER_ARGS)
    for name, kw in (("cfg", {"cfg": 3.0}), ("ulysses", {})):
        ref = suite.serial("euler", STEPS, **kw)
        assert float(ref.abs().max()) > 0.05
        rel = float((out[name][0] - ref).abs().max() / ref.abs().max())
        assert rel <= 1e-5, (name, rel)
