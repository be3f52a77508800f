"""Z-Image: patch-wise blocks (noise refiner, main layers) against diffusers' own forward, its positions, caption
padding, latent format and model sampling, detection and per-stage loading of ComfyUI's single file."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_pipefusion.attention import StaleKV
from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.job import sampling_kind
from comfy_pipefusion.models import family, keys_zimage, zimage
from comfy_pipefusion.models.checkpoint import CheckpointError, load_modules, open_checkpoint
from comfy_pipefusion.models.checkpoint_write import write_checkpoint
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.patches import Span, full_span, image_bands
from comfy_pipefusion.sampling.model_sampling import model_sampling_for

CPU = torch.device("cpu")
CONFIG = zimage.PRESETS["zimage-tiny"]["config"]


def build(seed: int = 5):
    model = zimage.build_meta(CONFIG)
    zimage.materialize(model, family.all_names(model), CPU, torch.float32, seed)
    return model


def inputs(rows, cols, n_txt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows * cols, 64, generator=g)  # packed latent tokens
    txt = torch.randn(1, n_txt, CONFIG["cap_feat_dim"], generator=g)
    return x, txt, torch.tensor([0.6])  # t = sigma


def run_ours(model, x, txt, t, rows, cols, spans_of, kvs=None):
    blocks = zimage.blocks_of(model)
    n_txt = zimage.text_tokens(txt.shape[1])
    heads, head_dim = family.attention_shape(model)

    def make(kind):
        return StaleKV(1, heads, n_txt if kind == "joint" else 0, rows * cols, head_dim, torch.float32, CPU)
    kvs = kvs or [zimage.kv_buffers(model, b, make) for b in blocks]
    emb = zimage.embeddings(model, txt, txt.shape[1], rows, cols, CPU, torch.float32)
    temb = zimage.time_embedding(model, emb, t, None, None, torch.float32)
    outs = []
    for sp in spans_of(n_txt):
        t_in = emb.txt[:, sp.t0:sp.t1] if sp.n_txt else None
        _, img = zimage.run_blocks(model, blocks, kvs, sp, t_in, zimage.embed_image(model, emb, x[:, sp.i0:sp.i1], sp),
                                   temb, emb.for_span(sp))
        outs.append(zimage.final_layer(model, img, temb))
    return torch.cat(outs, 1), kvs


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.mark.parametrize("rows,cols,n_txt", [(8, 8, 12), (4, 8, 32), (8, 12, 33)])
def test_zimage_one_span_is_diffusers_forward(model, rows, cols, n_txt):
    x, txt, t = inputs(rows, cols, n_txt)
    with torch.inference_mode():
        ref = zimage.forward(model, x, t, txt, None, None, rows, cols)
        ours, _ = run_ours(model, x, txt, t, rows, cols, lambda n: [full_span(n, rows * cols)])
    assert ref.shape == (1, rows * cols, 64)
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float(ref.abs().max()) > 0.1


def test_zimage_bands_over_filled_buffers_are_exact_and_stale_ones_are_not(model):
    rows, cols = 8, 8
    x, txt, t = inputs(rows, cols, 12)
    full = lambda n: [full_span(n, rows * cols)]  # noqa: E731
    bands = lambda n: [Span(0, 0, a, b) for a, b in image_bands(rows, cols, 3)]  # noqa: E731
    with torch.inference_mode():
        ref = zimage.forward(model, x, t, txt, None, None, rows, cols)
        _, kvs = run_ours(model, x, txt, t, rows, cols, full)
        ours, _ = run_ours(model, x, txt, t, rows, cols, bands, kvs)
        _, other = run_ours(model, *inputs(rows, cols, 12, seed=1), rows, cols, full)
        stale, _ = run_ours(model, x, txt, t, rows, cols, bands, other)
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float((stale - ref).abs().max()) > 1e-3


def test_zimage_positions_and_caption_padding_follow_diffusers(model):
    """Caption padded to 32 at (1 + i, 0, 0), image after it at (L + 1, r, c): diffusers' ids."""
    assert [zimage.text_tokens(n) for n in (1, 12, 32, 33)] == [32, 32, 32, 64]
    ids = zimage.position_ids(4, 8, 12)
    with torch.inference_mode():
        _, _, _, x_ids, cap_ids, _, _ = model.patchify_and_embed([torch.zeros(16, 1, 8, 16)],
                                                                 [torch.zeros(12, CONFIG["cap_feat_dim"])], 2, 1)
    assert torch.equal(ids[:32], cap_ids[0][:32].long()) and torch.equal(ids[32:], x_ids[0][:32].long())
    assert ids[0].tolist() == [1, 0, 0] and ids[32].tolist() == [33, 0, 0] and ids[-1].tolist() == [33, 3, 7]


def test_zimage_refuses_image_token_counts_that_need_pad_tokens(model):
    with pytest.raises(ValueError, match=r"6x6 = 36 image tokens, not a multiple of 32.*1024x1024"):
        zimage.embeddings(model, None, 12, 6, 6, CPU, torch.float32)


def test_zimage_latent_format_sampling_and_conditioning():
    fmt = zimage.latent_format(CONFIG)
    assert (fmt.channels, fmt.scale, fmt.shift) == (16, 0.3611, 0.1159)  # ComfyUI's Flux latent
    assert sampling_kind(zimage, CONFIG) == "zimage"
    ms = model_sampling_for("zimage")
    assert ms.flow and ms.shift == 3.0 and ms.multiplier == 1.0  # ModelSamplingDiscreteFlow, shift 3
    assert float(ms.timestep(torch.tensor(0.25))) == 0.25
    assert zimage.conditioning_dims(CONFIG) == (40, None) and zimage.conditioning_dims(zimage.REAL) == (2560, None)
    assert family.attention_shape(zimage.build_meta(CONFIG)) == (4, 16)


def test_zimage_key_map_covers_the_model_exactly():
    assert set(keys_zimage.original_map(CONFIG)) == set(zimage.build_meta(CONFIG).state_dict())


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_zimage_file_detects_and_loads_per_stage(tmp_path, model, prefix):
    sd = dict(model.state_dict())
    path = write_checkpoint(tmp_path / "z_image_tiny.safetensors", sd, "zimage", CONFIG, prefix=prefix,
                            dtype=torch.bfloat16)
    info = open_checkpoint(path)
    assert (info.family, info.prefix, info.dtype, info.variant) == ("zimage", prefix, torch.bfloat16,
                                                                    "Z-Image (4 layers)")
    assert {k: info.config[k] for k in CONFIG} == {k: (tuple(v) if isinstance(v, list) else v)
                                                   for k, v in CONFIG.items()}
    # what the nodes check before any worker starts, from the file's configuration alone (Z-Image's names)
    assert family.config_attention(info.config) == family.attention_shape(model) == (4, 16)
    assert family.num_blocks(info.config) == len(zimage.blocks_of(model)) == 6
    part, _ = load_rank_model(ModelSource(checkpoint=str(path)), ParallelConfig("pipefusion", 2, patches=2), 1,
                              CPU, torch.float32)
    held = {n for n, p in part.named_parameters() if not p.is_meta}
    assert held and not any(n.startswith(("cap_", "context_refiner", "all_x_embedder", "noise_refiner"))
                            for n in held)
    assert any(n.startswith("all_final_layer") for n in held)
    for n in held:
        assert torch.equal(part.get_parameter(n), sd[n].to(torch.bfloat16).float()), n
    if not prefix:  # a file missing one third of a fused qkv is refused, naming the tensor
        stored = keys_zimage.original_map(CONFIG)
        assert stored["layers.1.attention.to_k.weight"] == (("layers.1.attention.qkv.weight", 64, 128),)
        stored = load_file(str(path))
        del stored["layers.3.attention.qkv.weight"]
        save_file(stored, str(tmp_path / "cut.safetensors"), metadata=keys_zimage.metadata(CONFIG))
        with pytest.raises(CheckpointError, match="layers.3.attention.qkv.weight"):
            open_checkpoint(tmp_path / "cut.safetensors")
        write_checkpoint(tmp_path / "diffusers.safetensors", sd, "zimage", CONFIG, layout="diffusers")
        with pytest.raises(CheckpointError, match="Z-Image in diffusers layout"):
            open_checkpoint(tmp_path / "diffusers.safetensors")


def test_zimage_loaded_file_equals_synthetic_model(tmp_path, model):
    path = write_checkpoint(tmp_path / "z.safetensors", model.state_dict(), "zimage", CONFIG)
    info = open_checkpoint(path)
    loaded = zimage.build_meta(info.config)
    load_modules(loaded, info, family.all_names(loaded), CPU, torch.float32)
    x, txt, t = inputs(8, 8, 12)
    with torch.inference_mode():
        assert torch.equal(zimage.forward(model, x, t, txt, None, None, 8, 8),
                           zimage.forward(loaded, x, t, txt, None, None, 8, 8))


def test_zimage_node_conditioning_refuses_a_padding_mask():
    """The nodes' translation (no ComfyUI needed): Qwen3's 2560-wide states, no pooled vector; a caption with
    masked padding (which ComfyUI's model would mask) is refused rather than run unmasked."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pf_nodes_convert_zimage",
                                                  Path(__file__).resolve().parent.parent / "nodes" / "convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    cfg = dict(zimage.REAL, n_layers=2)
    txt, pooled, _ = convert.conditioning_tensors([[torch.zeros(1, 7, 2560), {"attention_mask": torch.ones(1, 7)}]],
                                                  "zimage", cfg, 1)
    assert txt.shape == (1, 7, 2560) and pooled is None
    mask = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(ValueError, match="attention mask over padded text tokens"):
        convert.conditioning_tensors([[torch.zeros(1, 4, 2560), {"attention_mask": mask}]], "zimage", cfg, 1)


def test_zimage_block_count_from_the_config_alone():
    """The loader node and the bench check a plan against the blocks before building anything."""
    for fam_name in family.FAMILIES:
        fam = family.get(fam_name)
        for preset in fam.PRESETS.values():
            assert family.num_blocks(preset["config"]) == len(fam.blocks_of(fam.build_meta(preset["config"])))


def test_zimage_scaled_fp8_file_computes_its_time_embedding_in_the_compute_dtype(tmp_path, model):
    """ComfyUI's scaled-fp8 Z-Image file: diffusers' TimestepEmbedder casts its input to the weight's dtype, which
    is float8 there (our patch-wise path failed on it, diffusers' forward rounded the time features to float8).
    Both run the time MLP in the compute dtype, as ComfyUI does, and agree; the features are not rounded."""
    from comfy_pipefusion.config import SampleSpec
    from comfy_pipefusion.job import synthetic_problem
    from comfy_pipefusion.models.checkpoint_write import write_scaled_fp8
    from comfy_pipefusion.parallel.serial import run_local, run_serial

    path = write_scaled_fp8(tmp_path / "z_fp8.safetensors", model.state_dict(), "zimage", CONFIG,
                            prefix="model.diffusion_model.")
    fp8, _ = load_rank_model(ModelSource(checkpoint=str(path)), ParallelConfig("serial", 1), 0, CPU, torch.float32)
    assert fp8.t_embedder.mlp[0].weight.dtype == torch.float8_e4m3fn
    problem = synthetic_problem(zimage, CONFIG, SampleSpec(height=128, width=128, steps=2), 12)
    with torch.inference_mode():
        ours = run_local(fp8, problem, torch.float32, CPU)
        serial = run_serial(fp8, problem, torch.float32, CPU)
        t = torch.tensor([0.3])
        te = fp8.t_embedder
        want = te.mlp(te.timestep_embedding((1 - t) * fp8.config.t_scale, te.frequency_embedding_size))
        assert torch.equal(zimage.time_embedding(fp8, None, t, None, None, torch.float32), want)
    assert float(ours.abs().max()) > 0.1
    assert float((ours - serial).abs().max()) <= 1e-5
