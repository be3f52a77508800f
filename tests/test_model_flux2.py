"""Flux.2: patch-wise blocks against diffusers' own forward and ComfyUI's model, its positions, text padding,
latent layout and sampling, detection and per-stage loading of ComfyUI's single file (with and without the
prefix), and the nodes' translation of its 128-channel LATENT."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_pipefusion.attention import StaleKV
from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.job import sampling_kind
from comfy_pipefusion.models import checkpoint, family, flux2, keys_flux2
from comfy_pipefusion.models.checkpoint import CheckpointError, open_checkpoint
from comfy_pipefusion.models.checkpoint_write import write_checkpoint
from comfy_pipefusion.models.keymap import invert
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.patches import Span, full_span, image_bands
from comfy_pipefusion.sampling.model_sampling import model_sampling_for

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
N_TXT = 8
PREFIX = "model.diffusion_model."
DETECTED = ("image_model", "hidden_size", "num_heads", "axes_dim", "depth", "depth_single_blocks", "context_in_dim",
            "in_channels", "mlp_ratio", "guidance_embed")
CONFIG = flux2.PRESETS["flux2-tiny"]["config"]


def build(seed: int = 5):
    model = flux2.build_meta(CONFIG)
    flux2.materialize(model, family.all_names(model), CPU, torch.float32, seed)
    return model


def inputs(rows, cols, seed=0, n_txt=N_TXT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows * cols, 128, generator=g)  # packed latent tokens
    txt = torch.randn(1, n_txt, CONFIG["joint_attention_dim"], generator=g)
    return x, txt, torch.tensor([0.6]), torch.tensor([3.5])  # t = sigma


def run_ours(model, x, txt, t, g, rows, cols, spans, kvs=None):
    blocks, cfg, n = flux2.blocks_of(model), model.config, txt.shape[1]
    kvs = kvs or [flux2.kv_buffers(model, b, lambda kind: StaleKV(1, cfg.num_attention_heads, n, rows * cols,
                                                                  cfg.attention_head_dim, torch.float32, CPU))
                  for b in blocks]
    emb = flux2.embeddings(model, txt, n, rows, cols, CPU, torch.float32)
    temb = flux2.time_embedding(model, emb, t, None, g, torch.float32)
    outs = []
    for sp in spans:
        t_in = emb.txt[:, sp.t0:sp.t1] if sp.n_txt else None
        _, img = flux2.run_blocks(model, blocks, kvs, sp, t_in, flux2.embed_image(model, emb, x[:, sp.i0:sp.i1], sp),
                                  temb, emb.for_span(sp))
        outs.append(flux2.final_layer(model, img, temb))
    return torch.cat(outs, 1), kvs


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.mark.parametrize("rows,cols", [(8, 8), (6, 10)])
def test_flux2_one_span_is_diffusers_forward(model, rows, cols):
    x, txt, t, g = inputs(rows, cols)
    txt = flux2.condition_text(txt)
    with torch.inference_mode():
        ref = flux2.forward(model, x, t, txt, None, g, rows, cols)
        ours, _ = run_ours(model, x, txt, t, g, rows, cols, [full_span(txt.shape[1], rows * cols)])
        other_g = flux2.forward(model, x, t, txt, None, torch.tensor([1.0]), rows, cols)
    assert ref.shape == (1, rows * cols, 128)
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float(ref.abs().max()) > 0.1 and float((other_g - ref).abs().max()) > 1e-3  # the guidance matters


def test_flux2_bands_over_filled_buffers_are_exact_and_stale_ones_are_not(model):
    rows, cols = 8, 8
    x, txt, t, g = inputs(rows, cols)
    bands = [Span(0, 0, a, b) for a, b in image_bands(rows, cols, 3)]
    with torch.inference_mode():
        ref = flux2.forward(model, x, t, txt, None, g, rows, cols)
        _, kvs = run_ours(model, x, txt, t, g, rows, cols, [full_span(N_TXT, rows * cols)])
        ours, _ = run_ours(model, x, txt, t, g, rows, cols, bands, kvs)
        _, other = run_ours(model, *inputs(rows, cols, seed=1), rows, cols, [full_span(N_TXT, rows * cols)])
        stale, _ = run_ours(model, x, txt, t, g, rows, cols, bands, other)
    assert float((ours - ref).abs().max()) <= 1e-5
    assert float((stale - ref).abs().max()) > 1e-3


def test_flux2_positions_text_padding_latent_and_sampling():
    ids = flux2.position_ids(2, 3, 2)  # text (0, 0, 0, i), image (0, r, c, 0)
    assert ids.tolist()[:3] == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]] and ids[-1].tolist() == [0, 1, 2, 0]
    txt = torch.randn(2, 5, 7)
    padded = flux2.condition_text(txt)  # zeros in front up to 512 tokens, as ComfyUI's Flux2.extra_conds
    assert padded.shape == (2, 512, 7) and torch.equal(padded[:, -5:], txt) and not padded[:, :-5].any()
    assert flux2.condition_text(torch.zeros(1, 600, 7)).shape == (1, 600, 7)
    fmt = flux2.latent_format(CONFIG)  # ComfyUI's [B, 128, H/16, W/16] <-> the 2x2-packed 32-channel latent
    comfy = torch.randn(2, 128, 3, 5)
    mine = fmt.from_comfy(comfy)
    assert mine.shape == (2, 32, 6, 10) and torch.equal(fmt.to_comfy(mine), comfy)
    assert torch.equal(family.pack_latent(mine), comfy.flatten(2).transpose(1, 2))  # tokens = ComfyUI's pixels
    assert fmt.comfy_channels == 128 and fmt.comfy_shape((2, 32, 6, 10)) == (2, 128, 3, 5)
    assert torch.equal(fmt.process_in(mine), mine)  # no scale, no shift
    assert sampling_kind(flux2, CONFIG) == "flux2" and model_sampling_for("flux2").shift == 2.02
    assert flux2.conditioning_dims(CONFIG) == (48, None) and flux2.conditioning_dims(flux2.REAL) == (15360, None)


def test_flux2_key_map_covers_the_model_exactly():
    assert set(keys_flux2.original_map(CONFIG)) == set(flux2.build_meta(CONFIG).state_dict())
    real = dict(flux2.REAL, num_layers=8, num_single_layers=48)  # Flux.2 dev's depth, on the meta device
    stored = invert(flux2.build_meta(real).state_dict(), keys_flux2.original_map(real))
    assert stored["double_blocks.0.img_mlp.0.weight"].shape == (36864, 6144)
    assert stored["single_blocks.0.linear1.weight"].shape == (55296, 6144)
    assert sum(v.numel() for v in stored.values()) > 32e9  # 32 B parameters
    shapes = {k: list(v.shape) for k, v in stored.items()}
    assert keys_flux2.config_from_shapes(shapes, {}) == {**real, "timestep_guidance_channels": 256}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_flux2_file_detects_and_loads_per_stage(tmp_path, model, prefix):
    sd = dict(model.state_dict())
    path = write_checkpoint(tmp_path / "flux2_tiny.safetensors", sd, "flux2", CONFIG, prefix=prefix,
                            dtype=torch.bfloat16)
    info = open_checkpoint(path)
    assert (info.family, info.prefix, info.dtype, info.layout) == ("flux2", prefix, torch.bfloat16, "original")
    assert {k: info.config[k] for k in CONFIG} == {k: (tuple(v) if isinstance(v, list) else v)
                                                   for k, v in CONFIG.items()}
    assert info.variant == "Flux.2-dev (2 double + 4 single blocks)"
    # the last of 2 PipeFusion stages holds its blocks, the shared modulation and the output layers only
    part, _ = load_rank_model(ModelSource(checkpoint=str(path)), ParallelConfig("pipefusion", 2, patches=2), 1,
                              CPU, torch.float32)
    held = {n for n, p in part.named_parameters() if not p.is_meta}
    assert held and not any(n.startswith(("x_embedder", "context_embedder", "transformer_blocks.")) for n in held)
    assert any(n.startswith("proj_out") for n in held) and any(n.startswith("single_stream_mod") for n in held)
    assert not any(n.startswith("double_stream_mod") for n in held)  # its blocks are single-stream only
    for n in held:
        assert torch.equal(part.get_parameter(n), sd[n].to(torch.bfloat16).float()), n
    if not prefix:  # a truncated file is refused, naming what is missing
        stored = invert(sd, keys_flux2.original_map(CONFIG))
        del stored["single_blocks.3.linear2.weight"]
        write_checkpoint(tmp_path / "cut.safetensors", stored, "flux2", CONFIG, layout="diffusers")  # keys as given
        with pytest.raises(CheckpointError, match="single_blocks.3.linear2.weight"):
            open_checkpoint(tmp_path / "cut.safetensors")
        write_checkpoint(tmp_path / "diffusers.safetensors", dict(model.state_dict()), "flux2", CONFIG,
                         layout="diffusers")
        with pytest.raises(CheckpointError, match="Flux.2 in diffusers layout"):
            open_checkpoint(tmp_path / "diffusers.safetensors")


def _convert():
    """nodes/convert.py alone (it imports no ComfyUI module; the nodes package does)."""
    spec = importlib.util.spec_from_file_location("pf_nodes_convert_flux2", ROOT / "nodes" / "convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flux2_node_conditioning_and_latent():
    convert, cfg = _convert(), dict(flux2.REAL, num_layers=1, num_single_layers=1)
    txt, pooled, guidance = convert.conditioning_tensors([[torch.zeros(1, 5, 15360), {"guidance": 4.0}]], "flux2",
                                                         cfg, 2)
    assert txt.shape == (2, 5, 15360) and pooled is None and guidance == 4.0
    with pytest.raises(ValueError, match="width 4096 does not fit this flux2 model, which expects 15360.*flux2"):
        convert.conditioning_tensors([[torch.zeros(1, 5, 4096), {}]], "flux2", cfg, 1)
    lat = torch.randn(1, 128, 4, 6)
    samples = convert.check_latent({"samples": lat}, "flux2", cfg)
    assert samples.shape == (1, 32, 8, 12) and torch.equal(convert.output_latent(samples, "flux2", cfg), lat)
    with pytest.raises(ValueError, match="needs 128 channels \\(EmptyFlux2LatentImage\\)"):
        convert.check_latent({"samples": torch.zeros(1, 16, 8, 8)}, "flux2", cfg)


# --- ComfyUI's own Flux.2 model on the same weights (it runs in a subprocess) ---------------------------------

def comfy_forward(weights: str, out: str, host: str) -> None:
    """ComfyUI's comfy.ldm.flux Flux built as its detection builds Flux.2 (global modulation, SiLU-gated MLP, no
    biases, four RoPE axes, theta 2000, patch size 1) at the tiny preset's width, on the same inputs."""
    sys.path.insert(0, host)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ldm.flux.model
    import comfy.ops

    c, d = CONFIG, CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    model = comfy.ldm.flux.model.Flux(
        image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=c["joint_attention_dim"],
        hidden_size=d, mlp_ratio=3.0, num_heads=c["num_attention_heads"], depth=c["num_layers"],
        depth_single_blocks=c["num_single_layers"], axes_dim=list(c["axes_dims_rope"]), theta=2000, patch_size=1,
        qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True, ops_bias=False,
        default_ref_method="index", ref_index_scale=10.0, operations=comfy.ops.disable_weight_init)
    data = torch.load(weights)
    model.load_state_dict(data["weights"], strict=True)
    with torch.inference_mode():  # without references, then with them (its default placement, "index")
        ys = [model(data["x"], data["t"], data["txt"], guidance=data["g"], ref_latents=refs or None)
              for refs in ([], data["refs"])]
    import comfy.model_detection  # what ComfyUI's own loader reads from a file of the real width (shapes only)

    real = {PREFIX + k: torch.empty(shape, device="meta") for k, shape in data["real_shapes"].items()}
    detected = comfy.model_detection.detect_unet_config(real, PREFIX)
    torch.save({"ys": ys, "detected": {k: detected[k] for k in DETECTED}}, out)


def test_flux2_equals_comfyui_model(tmp_path, model):
    """diffusers' forward through our adapters equals ComfyUI's Flux.2 on the same weights, inputs in ComfyUI's
    layout (the [B, 128, h, w] LATENT, the padded text), without and with two reference latents (ComfyUI's
    ReferenceLatent, placed by its Flux.2 default "index"); our patch-wise blocks on one span equal both."""
    from comfy_helpers import ensure_host

    rows, cols = 4, 6
    fmt = flux2.latent_format(CONFIG)
    g = torch.Generator().manual_seed(3)
    comfy_x = torch.randn(1, 128, rows, cols, generator=g)
    txt = flux2.condition_text(torch.randn(1, N_TXT, CONFIG["joint_attention_dim"], generator=g))
    t, gd = torch.tensor([0.6]), torch.tensor([3.5])
    comfy_refs = [torch.randn(1, 128, 3, 5, generator=g), torch.randn(1, 128, 4, 2, generator=g)]
    stored = invert(dict(model.state_dict()), keys_flux2.original_map(CONFIG))
    real_config = dict(flux2.REAL, num_layers=1, num_single_layers=1)
    real = invert(dict(flux2.build_meta(real_config).state_dict()), keys_flux2.original_map(real_config))
    shapes = {k: tuple(v.shape) for k, v in real.items()}
    torch.save({"weights": stored, "x": comfy_x, "t": t, "txt": txt, "g": gd, "refs": comfy_refs,
                "real_shapes": shapes}, tmp_path / "in.pt")
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_model_flux2 as t; "
            "t.comfy_forward(sys.argv[3], sys.argv[4], sys.argv[5])")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(ROOT / "tests"), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt"), str(ensure_host())], cwd=str(ROOT),
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(tmp_path / "out.pt")
    # a 6144-wide file (one block of each kind): ComfyUI's detection (48 heads fixed, the rest read) and ours agree,
    # so that tests at a narrower width (test_flux2_comfy) stand for it
    ours, got = keys_flux2.config_from_shapes(shapes, {}), result["detected"]
    assert got == {"image_model": "flux2", "hidden_size": 6144, "num_heads": ours["num_attention_heads"],
                   "axes_dim": list(ours["axes_dims_rope"]), "depth": ours["num_layers"],
                   "depth_single_blocks": ours["num_single_layers"], "context_in_dim": ours["joint_attention_dim"],
                   "in_channels": ours["in_channels"], "mlp_ratio": ours["mlp_ratio"],
                   "guidance_embed": ours["guidance_embeds"]}
    assert ours["num_attention_heads"] * ours["attention_head_dim"] == 6144 and ours["num_attention_heads"] == 48
    wants = result["ys"]  # [1, 128, rows, cols] each
    assert float((wants[1] - wants[0]).abs().max()) > 1e-3  # the references matter
    for want, refs in zip(wants, ((), tuple(fmt.from_comfy(r) for r in comfy_refs))):
        kw = {"refs": refs, "ref_method": "index"} if refs else {}
        x = fmt.pack_comfy(comfy_x)
        with torch.inference_mode():
            ours = flux2.forward(model, x, t, txt, None, gd, rows, cols, **kw)
            emb = flux2.embeddings(model, txt, txt.shape[1], rows, cols, CPU, torch.float32, **kw)
            span = full_span(emb.n_txt, rows * cols)
            kvs = [flux2.kv_buffers(model, b, lambda kind: StaleKV(1, 4, emb.n_txt, rows * cols, 16, torch.float32,
                                                                   CPU)) for b in flux2.blocks_of(model)]
            temb = flux2.time_embedding(model, emb, t, None, gd, torch.float32)
            _, img = flux2.run_blocks(model, flux2.blocks_of(model), kvs, span, emb.txt,
                                      flux2.embed_image(model, emb, x, span), temb, emb.for_span(span))
            patchwise = flux2.final_layer(model, img, temb)
        got = fmt.to_comfy(family.unpack_latent(ours, 2 * rows, 2 * cols))
        assert got.shape == want.shape and float(want.abs().max()) > 0.1
        assert float((got - want).abs().max()) <= 1e-5, bool(refs)
        assert float((patchwise - ours).abs().max()) <= 1e-5, bool(refs)
