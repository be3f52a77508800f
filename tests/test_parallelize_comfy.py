"""Issue 12, the MODEL path: stock UNETLoader -> LoraLoaderModelOnly -> PipeFusion Parallelize -> stock sampling
nodes, against the same chain without our node, on one real ComfyUI server (the small Flux and SD3.5 models of
tests/test_parity_comfy.py, LoRAs written by the test in kohya, diffusers/peft and LoKr layouts). PipeFusion runs
on two CPU ranks with warm-up steps = steps: relative L2 of the latents <= 1e-3.

Each prompt runs both branches from the same LoRA node (our node clones the MODEL), so both see the same
weights, conditioning, noise and sigmas.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfy_pipefusion import transport
from comfy_pipefusion.models import family, pixart, sd3, zimage
from comfy_pipefusion.models.checkpoint_write import pixart_extras, write_checkpoint, write_scaled_fp8

from comfy_helpers import error_message, run_prompt, saved_latent, start_server, states, worker_pids
from lora_files import write_kohya, write_lokr, write_peft
from test_parity_comfy import FAMILY, SD3_CONFIG, _write_models, rel_l2

TOL = 1e-3
STEPS = 2
CFG = {"flux": 1.0, "sd3": 4.0, "pixart": 4.5, "zimage": 1.0}
# PixArt-Σ at ComfyUI's fixed width (16 heads of 72), two blocks, the pos_embed table of a 1024 model (ComfyUI
# reads its position interpolation, 2, from it); 384 px: the smallest size whose positions ComfyUI defines
PIXART_CONFIG = dict(sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                     num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096,
                     use_additional_conditions=False)
PIXART_512 = "parallelize-pixart-sigma-512.safetensors"
FAMILIES = {**FAMILY, "pixart": dict(file="parallelize-pixart-sigma.safetensors", width=4096, pooled=1, tokens=4,
                                     size=384)}
# Z-Image 1152 wide (9 heads of 128: ComfyUI's head size and RoPE axes; its MLP of 8/3 x 1152 = 3072 rows, a whole
# multiple of 256 as ComfyUI rounds it; its time embedding min(width, 1024) wide as diffusers' 1024), two main layers
# and the four refiners: ComfyUI's own loader takes it through the test-only PipeFusionTestNarrowUNETLoader (it
# takes only 3840)
ZIMAGE_NARROW = "parallelize-zimage-narrow.safetensors"
ZIMAGE_CONFIG = dict(zimage.REAL, dim=1152, n_heads=9, n_kv_heads=9, n_layers=2)
QUANTISED = {"mixed": "parallelize-sd35m-mixed-fp8.safetensors", "scaled": "parallelize-sd35m-fp8-scaled.safetensors"}
WRITTEN = ("of patched weights written", "changed weights written")  # the log lines of a weights file
PAR = {"devices": "cpu:2", "strategy": "pipefusion", "patches": 2, "warmup_steps": STEPS}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("parallelize")
    run_dir = tmp_path_factory.mktemp("run")
    run_dir.chmod(0o700)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    (base / "models" / "loras").mkdir(parents=True)
    # kontext: the flux file; the fp8 copy is not run here but made with it (seconds) for the parity module
    _write_models(base / "models" / "diffusion_models", tmp_path_factory.getbasetemp() / "parity-files",
                  only=("flux", "fp8", "sd3"))
    _write_quantised(base / "models" / "diffusion_models")
    model = pixart.build_meta(PIXART_CONFIG)
    pixart.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
    write_checkpoint(base / "models" / "diffusion_models" / FAMILIES["pixart"]["file"], model.state_dict(), "pixart",
                     PIXART_CONFIG, dtype=torch.float32, extra=pixart_extras(PIXART_CONFIG, 300))
    write_checkpoint(base / "models" / "diffusion_models" / PIXART_512, model.state_dict(), "pixart",  # a 512 model
                     PIXART_CONFIG, dtype=torch.float32, extra=pixart_extras({**PIXART_CONFIG, "sample_size": 64}, 300))
    model = zimage.build_meta(ZIMAGE_CONFIG)
    zimage.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
    write_checkpoint(base / "models" / "diffusion_models" / ZIMAGE_NARROW, model.state_dict(), "zimage",
                     dict(model.config), dtype=torch.float32, prefix="model.diffusion_model.")
    del model
    for fam in ("flux", "sd3"):
        write_kohya(base / "models" / "loras" / f"{fam}-kohya.safetensors", fam)
        write_peft(base / "models" / "loras" / f"{fam}-peft.safetensors", fam)
        write_lokr(base / "models" / "loras" / f"{fam}-lokr.safetensors", fam)
    srv = start_server(base, run_dir, args=("--preview-method", "latent2rgb"))
    yield srv
    srv.stop()


def _write_quantised(folder) -> None:
    """The SD3.5 model of test_parity_comfy as ComfyUI 0.3.75's two quantised formats: mixed precision (the
    joint blocks' Linear weights float8 with ``weight_scale``, declared per layer in the file's
    ``_quantization_metadata``: ComfyUI holds them as quant_ops.QuantizedTensor) and classic scaled fp8
    (every Linear weight float8 with ``scale_weight``, the ``scaled_fp8`` marker)."""
    model = sd3.build_meta(SD3_CONFIG)
    sd3.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
    for quant, name in QUANTISED.items():
        write_scaled_fp8(folder / name, model.state_dict(), "sd3", dict(model.config), mixed=quant == "mixed",
                         small_dtype=torch.float32)
    # calibrated mixed files also carry each layer's input_scale (a module parameter in ComfyUI, unlike the
    # weight_scale, which the QuantizedTensor holds): the group must not take it for a weight scale
    path = folder / QUANTISED["mixed"]
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors.update({k.replace("weight_scale", "input_scale"): torch.tensor(0.05) for k in list(tensors)
                    if k.endswith(".weight_scale")})
    save_file(tensors, str(path), metadata=meta)


def _common(fam: str, loras: list[tuple[str, float]], unet: str | None = None) -> tuple[dict, list]:
    """The loader (of ``unet``, else the family's file), LoRA chain, conditionings and latent; returns (nodes,
    the MODEL output)."""
    f = FAMILIES[fam]
    cond = {"tokens": f["tokens"], "width": f["width"], "pooled_width": f["pooled"], "guidance": 3.5}
    nodes = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet or f["file"], "weight_dtype": "default"}},
             "3": {"class_type": "PipeFusionTestConditioning", "inputs": {**cond, "seed": 0}},
             "4": {"class_type": "PipeFusionTestConditioning", "inputs": {**cond, "seed": 1}},
             "5": {"class_type": "EmptyLatentImage" if fam == "pixart" else "EmptySD3LatentImage",
                   "inputs": {"width": f["size"], "height": f["size"], "batch_size": 1}}}
    model = ["1", 0]
    for i, (lora, strength) in enumerate(loras):
        nodes[f"l{i}"] = {"class_type": "LoraLoaderModelOnly",
                          "inputs": {"model": model, "lora_name": f"{fam}-{lora}.safetensors",
                                     "strength_model": strength}}
        model = [f"l{i}", 0]
    nodes["p"] = {"class_type": "PipeFusionParallelize", "inputs": {"model": model, **PAR}}
    return nodes, model


def _both(nodes: dict, stock: dict, prefix: str) -> dict:
    """``stock`` (node id -> node, the last one sampling) twice: on the stock MODEL and on ours."""
    out = dict(nodes)
    for side, model in (("stock", nodes["p"]["inputs"]["model"]), ("ours", ["p", 0])):
        last = None
        for nid, node in stock.items():
            inputs = {k: ([f"{side}{v[0]}", v[1]] if isinstance(v, list) and v[0] in stock else v)
                      for k, v in node["inputs"].items()}
            inputs = {k: (model if v == "MODEL" else v) for k, v in inputs.items()}
            out[f"{side}{nid}"] = {"class_type": node["class_type"], "inputs": inputs}
            last = f"{side}{nid}"
        out[f"save{side}"] = {"class_type": "SaveLatent",
                              "inputs": {"samples": [last, 0], "filename_prefix": f"{prefix}_{side}"}}
    return out


def ksampler(fam: str, seed: int = 7) -> dict:
    return {"k": {"class_type": "KSampler", "inputs": {
        "model": "MODEL", "seed": seed, "steps": STEPS, "cfg": CFG[fam], "sampler_name": "euler",
        "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}}


def run_pair(server, prompt: dict, prefix: str, msgs_out: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    status, msgs = run_prompt(server, prompt, timeout=900)
    assert status == "execution_success", (error_message(msgs), server.log_tail(40))
    if msgs_out is not None:
        msgs_out.extend(msgs)
    return saved_latent(server, f"{prefix}_stock"), saved_latent(server, f"{prefix}_ours")


def _log(server) -> str:
    return server.log_path.read_text(errors="replace")


@pytest.mark.parametrize("fam", [pytest.param("flux", marks=pytest.mark.slow), "sd3"])
def test_parallelize_lora_formats_equal_stock(server, fam):
    """kohya, then diffusers/peft, then LoKr, then the LoKr's strength changed: each equals the stock chain,
    every LoRA key was applied (ComfyUI logs the keys it could not map), the group stays the same processes,
    and the strength change moves both results alike."""
    results, pids, written = {}, [], _log(server).count("changed weights written")
    for label, loras in (("kohya", [("kohya", 1.0)]), ("peft", [("peft", 1.0)]),
                         ("lokr", [("kohya", 0.5), ("lokr", 1.0)]), ("lokr2", [("kohya", 0.5), ("lokr", -1.5)])):
        nodes, _ = _common(fam, loras)
        prefix = f"par/{fam}-{label}"
        msgs: list = []
        stock, ours = run_pair(server, _both(nodes, ksampler(fam), prefix), prefix, msgs)
        if pids:  # the warm group: no weight load, only the changed weights written and updated in place
            assert "loading" not in states(msgs), states(msgs)
            now = _log(server).count("changed weights written")
            assert now == written + 1, (label, now, written)
            written = now
        assert torch.isfinite(stock).all() and float(stock.abs().max()) > 0.1
        rel = rel_l2(ours, stock)
        assert rel <= TOL, f"{fam} {label}: relative L2 {rel:.3e} > {TOL}"
        results[label] = stock, ours
        pids.append(worker_pids(server.pid))
    assert "lora key not loaded" not in _log(server)
    assert pids[0] and all(p == pids[0] for p in pids), pids  # one warm group: LoRA changes send weights only
    # the strength change and the other LoRAs change the image by far more than the bound, on both sides
    for a, b in (("kohya", "peft"), ("lokr", "lokr2")):
        assert rel_l2(results[a][0], results[b][0]) > 20 * TOL
        assert rel_l2(results[a][1], results[b][1]) > 20 * TOL


@pytest.mark.parametrize("quant", list(QUANTISED))
def test_parallelize_quantised_model_with_lora_equals_stock(server, quant):
    """ComfyUI's own quantised checkpoints through the stock UNETLoader (mixed precision: QuantizedTensor
    layers; classic scaled fp8), then with a kohya LoRA on quantised layers, then a peft one: each equals the
    same chain without our node. ComfyUI patches the dequantised weight and quantises it again with the
    layer's own rounding; the group gets exactly that weight."""
    results = {}
    for label, loras in (("plain", []), ("kohya", [("kohya", 1.0)]), ("peft", [("peft", 0.8)])):
        nodes, _ = _common("sd3", loras, unet=QUANTISED[quant])
        prefix = f"par/{quant}-{label}"
        stock, ours = run_pair(server, _both(nodes, ksampler("sd3"), prefix), prefix)
        assert torch.isfinite(stock).all() and float(stock.abs().max()) > 0.1
        rel = rel_l2(ours, stock)
        assert rel <= TOL, f"{quant} {label}: relative L2 {rel:.3e} > {TOL}"
        results[label] = stock, ours
    log = _log(server)
    assert {"mixed": "Using mixed precision operations", "scaled": "Using scaled fp8"}[quant] in log
    assert "lora key not loaded" not in log
    for other in ("kohya", "peft"):  # each LoRA moves both results by far more than the bound
        assert rel_l2(results[other][0], results["plain"][0]) > 20 * TOL
        assert rel_l2(results[other][1], results["plain"][1]) > 20 * TOL


@pytest.mark.slow
def test_parallelize_kontext_references_equal_stock(server):
    """Flux.1 Kontext on the MODEL path: two ReferenceLatents (one of odd latent height) with the index
    placement on both conditionings, true CFG, a LoRA: equals the same chain without our node (that the
    references move the stock result is test_parity_comfy's test_kontext_references_change_the_stock_result)."""
    nodes, _ = _common("flux", [("kohya", 1.0)])
    sample = ksampler("flux")
    sample["k"]["inputs"]["cfg"] = 3.0
    for i, (w, h) in enumerate(((48, 64), (32, 72))):
        nodes[f"r{i}"] = {"class_type": "PipeFusionTestLatent", "inputs": {
            "width": w, "height": h, "batch_size": 1, "channels": 16, "seed": 20 + i, "scale": 1.0}}
    for which, base in (("positive", "3"), ("negative", "4")):
        nodes[f"{base}a"] = {"class_type": "ReferenceLatent",
                             "inputs": {"conditioning": [base, 0], "latent": ["r0", 0]}}
        nodes[f"{base}b"] = {"class_type": "ReferenceLatent",
                             "inputs": {"conditioning": [f"{base}a", 0], "latent": ["r1", 0]}}
        nodes[f"{base}c"] = {"class_type": "FluxKontextMultiReferenceLatentMethod",
                             "inputs": {"conditioning": [f"{base}b", 0], "reference_latents_method": "index"}}
        sample["k"]["inputs"][which] = [f"{base}c", 0]
    stock, ours = run_pair(server, _both(nodes, sample, "par/kontext"), "par/kontext")
    assert torch.isfinite(stock).all() and float(stock.abs().max()) > 0.1
    rel = rel_l2(ours, stock)
    assert rel <= TOL, f"kontext: relative L2 {rel:.3e} > {TOL}"


def test_parallelize_pixart_equals_stock(server):
    """PixArt-Σ (ComfyUI's EPS model with learned sigma, SDXL latents) through UNETLoader -> Parallelize ->
    KSampler with CFG and a negative equals the same chain without our node."""
    nodes, _ = _common("pixart", [])
    stock, ours = run_pair(server, _both(nodes, ksampler("pixart"), "par/pixart"), "par/pixart")
    assert torch.isfinite(stock).all() and float(stock.abs().max()) > 0.1
    rel = rel_l2(ours, stock)
    assert rel <= TOL, f"pixart: relative L2 {rel:.3e} > {TOL}"


def test_parallelize_zimage_equals_stock(server):
    """Z-Image (ComfyUI's Lumina 2 model with Z-Image's settings, a 1152-wide file) through its loader ->
    Parallelize -> KSampler equals the same chain without our node: PipeFusion's two stages split its noise
    refiner and main layers (the MODEL path counted no blocks in Z-Image's configuration and refused it)."""
    nodes, _ = _common("zimage", [])
    nodes["1"] = {"class_type": "PipeFusionTestNarrowUNETLoader", "inputs": {"unet_name": ZIMAGE_NARROW}}
    stock, ours = run_pair(server, _both(nodes, ksampler("zimage"), "par/zimage"), "par/zimage")
    assert stock.shape == (1, 16, 16, 16) and torch.isfinite(stock).all() and float(stock.abs().max()) > 0.1
    rel = rel_l2(ours, stock)
    assert rel <= TOL, f"zimage: relative L2 {rel:.3e} > {TOL}"


def test_parallelize_sampler_custom_advanced(server):
    """SamplerCustomAdvanced (RandomNoise, CFGGuider, KSamplerSelect, BasicScheduler -> SplitSigmas, the
    second half) equals its stock run."""
    nodes, _ = _common("sd3", [("kohya", 1.0)])
    stock = {
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": "MODEL", "positive": ["3", 0], "negative": ["4", 0],
                                                         "cfg": 4.0}},
        "sel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
        "sched": {"class_type": "BasicScheduler", "inputs": {"model": "MODEL", "scheduler": "karras",
                                                             "steps": 4, "denoise": 1.0}},
        "split": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["sched", 0], "step": 1}},
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sel", 0], "sigmas": ["split", 0],
            "latent_image": ["5", 0]}},
    }
    nodes["p"]["inputs"]["warmup_steps"] = 4
    stock_out, ours = run_pair(server, _both(nodes, stock, "par/sca"), "par/sca")
    assert float(stock_out.abs().max()) > 0.1
    assert rel_l2(ours, stock_out) <= TOL


def test_parallelize_ksampler_advanced(server):
    """KSamplerAdvanced from step 1 to 3 of 4 with leftover noise equals its stock run."""
    nodes, _ = _common("sd3", [("kohya", 1.0)])
    stock = {"ka": {"class_type": "KSamplerAdvanced", "inputs": {
        "model": "MODEL", "add_noise": "enable", "noise_seed": 3, "steps": 4, "cfg": 4.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
        "start_at_step": 1, "end_at_step": 3, "return_with_leftover_noise": "enable"}}}
    nodes["p"]["inputs"]["warmup_steps"] = 4
    stock_out, ours = run_pair(server, _both(nodes, stock, "par/ksa"), "par/ksa")
    assert float(stock_out.abs().max()) > 0.1
    assert rel_l2(ours, stock_out) <= TOL


def dual_cfg(style: str, cfg_conds: float, cfg_cond2_negative: float, steps: int = STEPS) -> dict:
    """SamplerCustomAdvanced with DualCFGGuider (cond1 node 3, cond2 node 6, negative node 4) on "MODEL"."""
    return {
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "guider": {"class_type": "DualCFGGuider", "inputs": {
            "model": "MODEL", "cond1": ["3", 0], "cond2": ["6", 0], "negative": ["4", 0], "cfg_conds": cfg_conds,
            "cfg_cond2_negative": cfg_cond2_negative, "style": style}},
        "sel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sched": {"class_type": "BasicScheduler", "inputs": {"model": "MODEL", "scheduler": "simple", "steps": steps,
                                                             "denoise": 1.0}},
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sel", 0], "sigmas": ["sched", 0],
            "latent_image": ["5", 0]}},
    }


def with_middle(nodes: dict) -> dict:
    """The nodes of ``_common`` with DualCFGGuider's middle conditioning (cond2) as node 6: another prompt."""
    return {**nodes, "6": {**nodes["4"], "inputs": {**nodes["4"]["inputs"], "seed": 2}}}


@pytest.mark.parametrize("style, cfg_conds, cfg_cond2_negative",
                         [("regular", 3.0, 2.0), ("nested", 2.5, 1.5), ("regular", 3.0, 1.0)])
def test_parallelize_dual_cfg_guider_equals_stock(server, style, cfg_conds, cfg_cond2_negative):
    """DualCFGGuider in both styles (its three conditionings in one batch of the group: [positive; negative;
    middle]) and at cfg_cond2_negative 1, where ComfyUI's regular style skips the negative's pass (CFG of the
    positive over the middle), equals its stock run."""
    nodes = with_middle(_common("sd3", [("kohya", 1.0)])[0])
    prefix = f"par/dual_{style}_{cfg_cond2_negative:g}"
    stock, ours = run_pair(server, _both(nodes, dual_cfg(style, cfg_conds, cfg_cond2_negative), prefix), prefix)
    assert float(stock.abs().max()) > 0.1
    assert rel_l2(ours, stock) <= TOL, f"{style}: relative L2 {rel_l2(ours, stock):.3e} > {TOL}"


@pytest.mark.parametrize("what", ["patch", "conditioning", "sampler", "guider", "pixart512", "narrow"])
def test_parallelize_refuses_what_it_cannot_run(server, what):
    """A model patch that is not a weight patch, area conditioning, a sampler with options, a guider other than
    the stock CFG, Basic and DualCFG guiders (PerpNegGuider), a PixArt model whose positions ComfyUI scales
    otherwise than the group would (a 512 model) and an image narrower than the Ulysses degree of a hybrid
    (3 Ulysses ranks per PipeFusion stage, each patch one token wide) are refused before sampling, in the
    ComfyUI process (no group started), each naming itself."""
    fam = "pixart" if what == "pixart512" else "sd3"
    nodes, _ = _common(fam, [], unet=PIXART_512 if what == "pixart512" else None)
    sample = ksampler(fam)["k"]
    sample["inputs"]["model"] = ["p", 0]
    expect = {"patch": "sampler_cfg_function", "conditioning": "area", "sampler": "eta",
              "guider": "Guider_PerpNeg", "pixart512": "scales its positions by 1 in ComfyUI",
              "narrow": "ulysses+pipefusion shares each of its 2 patches among 3 Ulysses ranks, but the image is "
                        "2x1 tokens (height/16 x width/16): its smallest patch has 1 image tokens, fewer than 3; "
                        "use an image at least 48 pixels wide"}[what]
    if what == "narrow":  # 6 ranks (3 heads: degree 3): refused before any starts, whatever the cores here
        nodes["p"]["inputs"].update(devices="cpu:6", strategy="ulysses+pipefusion", patches=0, ulysses_degree=3)
        nodes["5"]["inputs"].update(width=16, height=32)
    if what == "patch":
        nodes["r"] = {"class_type": "RescaleCFG", "inputs": {"model": ["p", 0], "multiplier": 0.7}}
        sample["inputs"]["model"] = ["r", 0]
    elif what == "conditioning":
        nodes["a"] = {"class_type": "ConditioningSetArea", "inputs": {
            "conditioning": ["3", 0], "width": 64, "height": 64, "x": 0, "y": 0, "strength": 1.0}}
        sample["inputs"]["positive"] = ["a", 0]
    if what == "sampler":
        sample = {"class_type": "SamplerCustom", "inputs": {
            "model": ["p", 0], "add_noise": True, "noise_seed": 1, "cfg": 4.0, "positive": ["3", 0],
            "negative": ["4", 0], "sampler": ["s", 0], "sigmas": ["sc", 0], "latent_image": ["5", 0]}}
        nodes["s"] = {"class_type": "SamplerEulerAncestral", "inputs": {"eta": 0.5, "s_noise": 1.0}}
        nodes["sc"] = {"class_type": "BasicScheduler", "inputs": {"model": ["p", 0], "scheduler": "simple",
                                                                  "steps": 2, "denoise": 1.0}}
    if what == "guider":
        nodes["g"] = {"class_type": "PerpNegGuider", "inputs": {
            "model": ["p", 0], "positive": ["3", 0], "negative": ["4", 0], "empty_conditioning": ["4", 0],
            "cfg": 4.0, "neg_scale": 1.0}}
        nodes["n"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
        nodes["s"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        nodes["sc"] = {"class_type": "BasicScheduler", "inputs": {"model": ["p", 0], "scheduler": "simple",
                                                                  "steps": 2, "denoise": 1.0}}
        sample = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["n", 0], "guider": ["g", 0], "sampler": ["s", 0], "sigmas": ["sc", 0], "latent_image": ["5", 0]}}
    nodes["k"] = sample
    nodes["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": "par/refused"}}
    status, msgs = run_prompt(server, nodes, timeout=300)
    assert status == "execution_error"
    message = error_message(msgs)
    assert "PipeFusion Parallelize" in message and expect in message, message
    if what == "narrow":  # the group's own refusal would name the patch ("cannot be split"), not the image
        assert len(worker_pids(server.pid)) < 6, "a 6-rank group started for the narrow image"


def test_parallelize_never_loads_the_model_in_comfyui(server):
    """With only our branch, ComfyUI's model management never loads the MODEL (no load_models_gpu: on a GPU
    machine no GPU memory for it in the ComfyUI process), the progress bar moves once per step, and the
    preview (--preview-method latent2rgb) gets one image per step, as from the stock KSampler."""
    nodes, model = _common("sd3", [("peft", 0.7)])
    nodes["u"] = {"class_type": "PipeFusionTestUnloadModels", "inputs": {"model": model}}
    nodes["p"]["inputs"]["model"] = ["u", 0]
    nodes["k"] = {**ksampler("sd3")["k"]}
    nodes["k"]["inputs"] = {**nodes["k"]["inputs"], "model": ["p", 0], "steps": 3}
    nodes["p"]["inputs"].update(warmup_steps=1, strategy="auto", patches=0)  # the workflows' default: auto plans
    nodes["check"] = {"class_type": "PipeFusionTestLoadedModels",
                      "inputs": {"model": ["p", 0], "samples": ["k", 0], "name": "par-loads"}}
    frames: list = []
    status, msgs = run_prompt(server, nodes, timeout=600, frames=frames)
    assert status == "execution_success", (error_message(msgs), server.log_tail(40))
    previews = [f for f in frames if f[:10] == bytes([0, 0, 0, 1, 0, 0, 0, 1, 0xFF, 0xD8])]  # preview event, JPEG
    assert len(previews) == 3, [f[:8] for f in frames]
    report = json.loads((server.base_dir / "output" / "par-loads.json").read_text())
    assert report == {"loaded": False, "loaded_models": 0}, report
    steps = [m["data"]["value"] for m in msgs if m["type"] == "progress" and m["data"].get("node") == "k"]
    assert sorted(set(steps)) == [1, 2, 3] and steps == sorted(steps), steps  # the preview's bar says it too
    assert transport.shm_segments(server.pid) == []  # the weights file in /dev/shm is gone with the job


def test_parallelize_cancel_stops_the_job_and_keeps_the_group(server):
    """Cancel (POST /interrupt) during a long KSampler run on the parallelized MODEL: the prompt ends
    interrupted, and the next prompt runs on the same workers with the weights they hold:
    no weight is written or read again."""
    nodes, _ = _common("sd3", [])
    nodes["p"]["inputs"]["warmup_steps"] = 1
    nodes["k"] = {**ksampler("sd3")["k"]}
    nodes["k"]["inputs"] = {**nodes["k"]["inputs"], "model": ["p", 0], "steps": 400}
    nodes["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": "par/cancel"}}
    sent = []

    def interrupt_on_progress(m):
        if m["type"] == "progress" and m["data"].get("node") == "k" and not sent:
            sent.append(m["data"]["value"])
            server.interrupt()
    status, msgs = run_prompt(server, nodes, on_message=interrupt_on_progress, timeout=600)
    assert status == "execution_interrupted", (error_message(msgs), server.log_tail(30))
    done = [m["data"]["value"] for m in msgs if m["type"] == "progress" and m["data"].get("node") == "k"]
    # no bound on max(done) - sent[0]: ComfyUI's progress hook stops reporting at the first step after the
    # interrupt reached the server, so that is this client's delay in steps, not the ranks' (whose stop at the
    # next step boundary test_comm_rules counts exactly)
    assert sent and max(done) < 400, (sent, done)
    pids = worker_pids(server.pid)
    written = [_log(server).count(what) for what in WRITTEN]
    nodes["k"]["inputs"]["steps"] = 2
    status, msgs = run_prompt(server, nodes, timeout=600)
    assert status == "execution_success", error_message(msgs)
    assert pids and worker_pids(server.pid) == pids
    assert "loading" not in states(msgs), states(msgs)
    assert [_log(server).count(what) for what in WRITTEN] == written, server.log_tail(20)
