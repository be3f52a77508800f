"""Qwen-Image: patch-wise blocks against diffusers' own forward, its positions and latent format, detection and
per-stage loading of ComfyUI's single file (with and without the prefix, and as diffusers shards)."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.attention import StaleKV
from comfy_pipefusion.job import sampling_kind
from comfy_pipefusion.models import family, keys_qwen_image, qwen_image as qwen
from comfy_pipefusion.models.checkpoint import CheckpointError, load_modules, open_checkpoint
from comfy_pipefusion.models.checkpoint_write import write_checkpoint
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.patches import Span, full_span, image_bands

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


def run_ours(model, x, txt, t, rows, cols, spans, kvs=None):
    blocks = qwen.blocks_of(model)
    cfg = model.config
    kvs = kvs or [qwen.kv_buffers(model, b, lambda kind: StaleKV(1, cfg.num_attention_heads, N_TXT, rows * cols,
                                                                 cfg.attention_head_dim, torch.float32, CPU))
                  for b in blocks]
    emb = qwen.embeddings(model, txt, N_TXT, rows, cols, CPU, torch.float32)
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


def test_qwen_node_conditioning_and_one_frame_latent():
    """The nodes' translation (no ComfyUI needed): Qwen's 3584-wide states without a pooled vector, ComfyUI's
    [B, 16, 1, h, w] LATENT in and out, and an editing conditioning refused rather than ignored."""
    import importlib.util
    from pathlib import Path

    # nodes/convert.py imports no ComfyUI module; the nodes package does, so the file is loaded alone
    spec = importlib.util.spec_from_file_location("pf_nodes_convert_qwen",
                                                  Path(__file__).resolve().parent.parent / "nodes" / "convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    check_latent, conditioning_tensors, output_latent = (convert.check_latent, convert.conditioning_tensors,
                                                         convert.output_latent)
    cfg = dict(qwen.REAL, num_layers=2)
    txt, pooled, _ = conditioning_tensors([[torch.zeros(1, 5, 3584), {"pooled_output": torch.zeros(1, 1)}]],
                                          "qwen_image", cfg, 2)
    assert txt.shape == (2, 5, 3584) and pooled is None
    with pytest.raises(ValueError, match="width 4096 does not fit this qwen_image model, which expects 3584"):
        conditioning_tensors([[torch.zeros(1, 5, 4096), {}]], "qwen_image", cfg, 1)
    with pytest.raises(ValueError, match="reference latents.*stock KSampler"):
        conditioning_tensors([[torch.zeros(1, 5, 3584), {"reference_latents": [torch.zeros(1, 16, 8, 8)]}]],
                             "qwen_image", cfg, 1)
    lat = torch.randn(1, 16, 1, 8, 6)
    samples = check_latent({"samples": lat}, "qwen_image", cfg)
    assert torch.equal(samples, lat[:, :, 0]) and torch.equal(output_latent(samples, "qwen_image"), lat)
    assert check_latent({"samples": lat[:, :, 0]}, "qwen_image", cfg).shape == (1, 16, 8, 6)
    with pytest.raises(ValueError, match="has 2 frames"):
        check_latent({"samples": torch.zeros(1, 16, 2, 8, 6)}, "qwen_image", cfg)
    assert output_latent(samples, "sd3").shape == (1, 16, 8, 6)
