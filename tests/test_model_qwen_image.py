"""Qwen-Image: patch-wise blocks against diffusers' own forward, its positions and latent format, detection and
per-stage loading of ComfyUI's single file (with and without the prefix, and as diffusers shards); Qwen-Image-Edit's
reference latents (with the text stream) against diffusers' forward as its QwenImageEditPipeline calls it, and
their placements as ComfyUI computes them."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.attention import StaleKV
from comfy_pipefusion.job import sampling_kind
from comfy_pipefusion.models import family, keys_qwen_image, qwen_image as qwen, references
from comfy_pipefusion.models.checkpoint import CheckpointError, load_modules, open_checkpoint
from comfy_pipefusion.models.checkpoint_write import write_checkpoint
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.patches import Span, displaced_spans, full_span, image_bands, pipefusion_spans

CPU = torch.device("cpu")
N_TXT = 8
CONFIG = qwen.PRESETS["qwen-image-tiny"]["config"]


def build(seed: int = 5):
    model = qwen.build_meta(CONFIG)
    qwen.materialize(model, family.all_names(model), CPU, torch.float32, seed)
    return model


def inputs(model, rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows * cols, 64, generator=g)  # packed latent tokens
    txt = torch.randn(1, N_TXT, model.config.joint_attention_dim, generator=g)
    return x, txt, torch.tensor([0.6])  # t = sigma


def run_ours(model, x, txt, t, rows, cols, spans, kvs=None, refs=(), method="index"):
    blocks = qwen.blocks_of(model)
    cfg = model.config
    emb = qwen.embeddings(model, txt, N_TXT, rows, cols, CPU, torch.float32, refs, method)
    n_stream = emb.txt.shape[1]  # text and reference tokens
    kvs = kvs or [qwen.kv_buffers(model, b, lambda kind: StaleKV(1, cfg.num_attention_heads, n_stream, rows * cols,
                                                                 cfg.attention_head_dim, torch.float32, CPU))
                  for b in blocks]
    temb = qwen.time_embedding(model, emb, t, None, None, torch.float32)
    outs = []
    for sp in spans:
        t_in = emb.txt[:, sp.t0:sp.t1] if sp.n_txt else None
        _, img = qwen.run_blocks(model, blocks, kvs, sp, t_in, qwen.embed_image(model, emb, x[:, sp.i0:sp.i1], sp),
                                 temb, emb.for_span(sp))
        outs.append(qwen.final_layer(model, img, temb))
    return torch.cat(outs, 1), kvs


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.mark.parametrize("rows,cols", [(8, 8), (6, 10), (10, 4)])
def test_qwen_one_span_is_diffusers_forward(model, rows, cols):
    x, txt, t = inputs(model, rows, cols)
    with torch.inference_mode():
        ref = qwen.forward(model, x, t, txt, None, None, rows, cols)
        ours, _ = run_ours(model, x, txt, t, rows, cols, [full_span(N_TXT, rows * cols)])
    assert ref.shape == (1, rows * cols, 64)
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float(ref.abs().max()) > 0.1


def test_qwen_bands_over_filled_buffers_are_exact_and_stale_ones_are_not(model):
    rows, cols = 8, 8
    x, txt, t = inputs(model, rows, cols)
    bands = [Span(0, 0, a, b) for a, b in image_bands(rows, cols, 3)]
    with torch.inference_mode():
        ref = qwen.forward(model, x, t, txt, None, None, rows, cols)
        _, kvs = run_ours(model, x, txt, t, rows, cols, [full_span(N_TXT, rows * cols)])
        ours, _ = run_ours(model, x, txt, t, rows, cols, bands, kvs)
        _, other = run_ours(model, *inputs(model, rows, cols, seed=1), rows, cols, [full_span(N_TXT, rows * cols)])
        stale, _ = run_ours(model, x, txt, t, rows, cols, bands, other)
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float((stale - ref).abs().max()) > 1e-3


def test_qwen_positions_follow_comfyui():
    """Image tokens centred on the middle row and column, text after max(rows, cols) // 2 on every axis; for
    even grids the table is diffusers' QwenEmbedRope's."""
    ids = qwen.position_ids(4, 6, 2)
    assert ids[:2].tolist() == [[3, 3, 3], [4, 4, 4]]
    assert ids[2].tolist() == [0, -2, -3] and ids[-1].tolist() == [0, 1, 2]
    model = qwen.build_meta(CONFIG)
    vid, txt = model.pos_embed([(1, 4, 6)], max_txt_seq_len=2, device=CPU)
    ours = qwen.rope_table(ids, tuple(CONFIG["axes_dims_rope"]))
    assert torch.allclose(ours, torch.cat([txt, vid]), atol=1e-6)


def _refs(*hw, seed=4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 16, h, w, generator=g) for h, w in hw)


def test_qwen_edit_one_span_is_diffusers_forward(model):
    """Two references of even token grids no larger than the image, ComfyUI's default placement (frame index
    1, 2): our one span, our serial reference and diffusers' forward with its own QwenEmbedRope, called as
    QwenImageEditPipeline calls it (reference tokens after the image, their shapes in img_shapes), agree."""
    rows, cols = 8, 8
    x, txt, t = inputs(model, rows, cols)
    refs = _refs((8, 12), (12, 8))
    n = N_TXT + references.count(refs)
    with torch.inference_mode():
        own = model(hidden_states=torch.cat([x, references.tokens(refs)], 1), encoder_hidden_states=txt, timestep=t,
                    img_shapes=[[(1, rows, cols), (1, 4, 6), (1, 6, 4)]], return_dict=False)[0][:, :rows * cols]
        ref = qwen.forward(model, x, t, txt, None, None, rows, cols, refs)
        plain = qwen.forward(model, x, t, txt, None, None, rows, cols)
        ours, _ = run_ours(model, x, txt, t, rows, cols, [full_span(n, rows * cols)], refs=refs)
    assert n == N_TXT + 24 + 24
    assert float((ref - own).abs().max()) <= 1e-5
    assert float((ours - own).abs().max()) <= 1e-5
    assert float((own - plain).abs().max()) > 0.05  # the references change the prediction


def test_qwen_edit_reference_positions_follow_comfyui():
    """comfy/ldm/qwen_image/model.py: ``index`` (the default) counts frame indices, any other method is Flux's
    offset (a second reference beside the first: right when that keeps the area square, else below); every
    grid is centred on its own middle, the odd side padded to whole patches."""
    a, b = torch.zeros(1, 16, 12, 8), torch.zeros(1, 16, 9, 6)  # 6 x 4 and 5 x 3 tokens
    off = qwen.reference_ids((a, b), "offset", 8, 8)
    assert off.shape == (24 + 15, 3)
    assert off[0].tolist() == [1, -3, -2] and off[23].tolist() == [1, 2, 1]
    assert off[24].tolist() == [1, -2, 3] and off[-1].tolist() == [1, 2, 5]  # b right of a: w offset 8 px = 4 tokens
    assert torch.equal(qwen.reference_ids((a, b), "uxo", 8, 8), off)  # ComfyUI's Qwen knows index and offset only
    idx = qwen.reference_ids((a, b), "index", 8, 8)
    assert idx[0].tolist() == [1, -3, -2] and idx[24].tolist() == [2, -2, -1] and idx[-1].tolist() == [2, 2, 1]


def test_qwen_edit_split_streams_over_filled_buffers(model):
    """Offset placement and a reference of odd size (padded): one span equals the serial reference; once the
    buffers hold this input's K/V any split of the text stream (DistriFusion's bands cut it inside the text and
    inside the references, PipeFusion's carry it whole) is exact."""
    rows, cols = 8, 8
    x, txt, t = inputs(model, rows, cols)
    refs = _refs((12, 8), (9, 6))
    n = N_TXT + references.count(refs)
    with torch.inference_mode():
        ref = qwen.forward(model, x, t, txt, None, None, rows, cols, refs, "offset")
        ours, kvs = run_ours(model, x, txt, t, rows, cols, [full_span(n, 64)], refs=refs, method="offset")
        assert float((ours - ref).abs().max()) <= 1e-5
        assert float((ref - qwen.forward(model, x, t, txt, None, None, rows, cols, refs)).abs().max()) > 1e-3
        for spans in (displaced_spans(rows, cols, n, 4), displaced_spans(rows, cols, n, 3),
                      pipefusion_spans(rows, cols, n, 3, "first_patch"), [Span(0, 5, 0, 64), Span(5, n, 0, 0)]):
            ours, _ = run_ours(model, x, txt, t, rows, cols, spans, kvs=kvs, refs=refs, method="offset")
            assert float((ours[:, :64] - ref).abs().max()) <= 1e-5, spans


def test_qwen_latent_format_sampling_and_conditioning():
    fmt = qwen.latent_format(CONFIG)
    assert fmt.channels == 16 and fmt.mean[0] == -0.7571 and fmt.std[-1] == 1.9160  # ComfyUI's Wan21
    lat = torch.randn(2, 16, 6, 10)
    assert torch.allclose(fmt.process_out(fmt.process_in(lat)), lat, atol=1e-5)
    assert torch.allclose(fmt.process_in(lat)[:, 3], (lat[:, 3] - 0.1075) / 2.6558)
    assert sampling_kind(qwen, CONFIG) == "flux"  # ModelSamplingFlux, shift 1.15
    assert qwen.conditioning_dims(CONFIG) == (48, None)
    assert qwen.conditioning_dims(qwen.REAL) == (3584, None)


def test_qwen_key_map_covers_the_model_exactly():
    assert set(keys_qwen_image.original_map(CONFIG)) == set(qwen.build_meta(CONFIG).state_dict())


@pytest.mark.parametrize("prefix,shards", [("", 1), ("model.diffusion_model.", 1), ("", 3)])
def test_qwen_file_detects_and_loads_per_stage(tmp_path, model, prefix, shards):
    sd = {k: v for k, v in model.state_dict().items()}
    name = "diffusion_pytorch_model" if shards > 1 else "qwen_image_tiny"
    path = write_checkpoint(tmp_path / f"{name}.safetensors", sd, "qwen_image", CONFIG, prefix=prefix,
                            dtype=torch.bfloat16, shards=shards)
    info = open_checkpoint(path)
    assert (info.family, info.prefix, info.dtype) == ("qwen_image", prefix, torch.bfloat16)
    assert {k: info.config[k] for k in CONFIG} == {k: (tuple(v) if isinstance(v, list) else v)
                                                   for k, v in CONFIG.items()}
    assert info.variant == "Qwen-Image (4 blocks)"
    # the last of 2 PipeFusion stages holds its blocks and the output layers only
    part, _ = load_rank_model(ModelSource(checkpoint=str(path)), ParallelConfig("pipefusion", 2, patches=2), 1,
                              CPU, torch.float32)
    held = {n for n, p in part.named_parameters() if not p.is_meta}
    assert held and not any(n.startswith(("img_in", "txt_in", "txt_norm", "transformer_blocks.0.")) for n in held)
    assert any(n.startswith("proj_out") for n in held)
    for n in held:
        assert torch.equal(part.get_parameter(n), sd[n].to(torch.bfloat16).float()), n
    if shards == 1 and not prefix:  # a truncated file is refused, naming what is missing
        del sd["transformer_blocks.2.txt_mlp.net.2.weight"]
        write_checkpoint(tmp_path / "cut.safetensors", sd, "qwen_image", CONFIG, layout="diffusers")
        with pytest.raises(CheckpointError, match="txt_mlp.net.2.weight"):
            open_checkpoint(tmp_path / "cut.safetensors")


def test_qwen_loaded_file_equals_synthetic_model(tmp_path, model):
    path = write_checkpoint(tmp_path / "q.safetensors", model.state_dict(), "qwen_image", CONFIG)
    info = open_checkpoint(path)
    loaded = qwen.build_meta(info.config)
    load_modules(loaded, info, family.all_names(loaded), CPU, torch.float32)
    x, txt, t = inputs(model, 8, 8)
    with torch.inference_mode():
        a = qwen.forward(model, x, t, txt, None, None, 8, 8)
        b = qwen.forward(loaded, x, t, txt, None, None, 8, 8)
    assert torch.equal(a, b)


def _node_module(name: str):
    """nodes/<name>.py, loaded alone: it imports no ComfyUI module (the nodes package does)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"pf_nodes_{name}_qwen",
                                                  Path(__file__).resolve().parent.parent / "nodes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qwen_node_conditioning_and_one_frame_latent():
    """The nodes' translation (no ComfyUI needed): Qwen's 3584-wide states without a pooled vector, ComfyUI's
    [B, 16, 1, h, w] LATENT in and out, an editing conditioning's one-frame reference latents taken (a family
    without references refuses them rather than ignoring them)."""
    convert, refs = _node_module("convert"), _node_module("references")
    check_latent, conditioning_tensors, output_latent = (convert.check_latent, convert.conditioning_tensors,
                                                         convert.output_latent)
    cfg = dict(qwen.REAL, num_layers=2)
    txt, pooled, _ = conditioning_tensors([[torch.zeros(1, 5, 3584), {"pooled_output": torch.zeros(1, 1)}]],
                                          "qwen_image", cfg, 2)
    assert txt.shape == (2, 5, 3584) and pooled is None
    with pytest.raises(ValueError, match="width 4096 does not fit this qwen_image model, which expects 3584"):
        conditioning_tensors([[torch.zeros(1, 5, 4096), {}]], "qwen_image", cfg, 1)
    edit = [[torch.zeros(1, 5, 3584), {"reference_latents": [torch.ones(1, 16, 1, 8, 6)]}]]
    assert conditioning_tensors(edit, "qwen_image", cfg, 1)[0].shape == (1, 5, 3584)
    tensors, method = refs.job_references(edit, edit, 4.0)
    assert method is None and set(tensors) == {"ref0", "neg_ref0"} and tensors["ref0"].shape == (1, 16, 8, 6)
    with pytest.raises(ValueError, match="reference latent 0 has shape \\(1, 16, 2, 8, 6\\)"):
        refs.reference_tensors([[None, {"reference_latents": [torch.zeros(1, 16, 2, 8, 6)]}]])
    with pytest.raises(ValueError, match="which a zimage model does not take"):
        conditioning_tensors([[torch.zeros(1, 5, 2560), {"reference_latents": [torch.zeros(1, 16, 8, 8)]}]],
                             "zimage", {}, 1)
    lat = torch.randn(1, 16, 1, 8, 6)
    samples = check_latent({"samples": lat}, "qwen_image", cfg)
    assert torch.equal(samples, lat[:, :, 0]) and torch.equal(output_latent(samples, "qwen_image"), lat)
    assert check_latent({"samples": lat[:, :, 0]}, "qwen_image", cfg).shape == (1, 16, 8, 6)
    with pytest.raises(ValueError, match="has 2 frames"):
        check_latent({"samples": torch.zeros(1, 16, 2, 8, 6)}, "qwen_image", cfg)
    assert output_latent(samples, "sd3").shape == (1, 16, 8, 6)
