"""Issue 5's decisive test: ComfyUI's stock UNETLoader -> KSampler against our PipeFusionDiTLoader ->
PipeFusionKSampler, on one real ComfyUI server, the same checkpoint file, conditioning and latent.

Each prompt runs both branches side by side (the conditioning and latent nodes are shared, so both see
identical tensors) and saves both LATENTs with SaveLatent. PipeFusion runs on two CPU ranks with warm-up
steps >= steps, so it must equal the stock result up to implementation differences (diffusers' model code
against ComfyUI's): relative L2 <= 1e-3.

ComfyUI's model detection fixes Flux at width 3072 (24 heads of 128, RoPE axes 16/56/56) and reads only
the depth, so the Flux model here is one double and one single block at full width (0.55 B parameters,
stored in bf16, computed in float32 by both: the stock loader's "default" is float32 on the CPU, checked in
the server log). SD3's width is 64 x depth: an SD3.5-medium-like model of 3 blocks (width 192, dual attention
in the first two, RMS qk norm). Qwen-Image is fixed at width 3072 and text width 3584 in the same way: two
blocks at full width (0.71 B parameters in bf16, computed in float32; two, so that each PipeFusion stage holds
one), true CFG with a negative, and ComfyUI's one-frame Wan latent [B, 16, 1, h, w]; the same file takes
Qwen-Image-Edit's reference latents (one-frame Wan latents through ReferenceLatent, as TextEncodeQwenImageEdit
adds them). ComfyUI takes Z-Image only at width 3840 and builds two noise and two context refiner blocks whatever
the file holds: the smallest file it accepts has one main layer and the four refiners (0.9 B parameters), stored
as ComfyUI's scaled fp8 (0.9 GB; both sides compute stored x scale in float32); it is written when its case
first runs, and the case is marked slow (measured: 2.2e-6; the test's processes together peaked at 7.6 GiB
resident, ComfyUI 1.4, our two ranks 3.0 and 2.2; 6.4 min on a loaded 2-core machine). Run with -s to see the
table of measured differences.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_pipefusion.models import chroma, family, flux, qwen_image, sd3, zimage
from comfy_pipefusion.models.checkpoint_write import write_checkpoint, write_scaled_fp8

from comfy_helpers import run_prompt, start_server, wait_until, worker_pids

TOL = 1e-3
FLUX_FILE, SD3_FILE, CHROMA_FILE = "parity-flux.safetensors", "parity-sd35m.safetensors", "parity-chroma.safetensors"
FLUX_CONFIG = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
SD3_CONFIG = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                  attention_head_dim=64, num_attention_heads=3, joint_attention_dim=4096,
                  caption_projection_dim=192, pooled_projection_dim=2048, pos_embed_max_size=16,
                  dual_attention_layers=(0, 1), qk_norm="rms_norm")
# ComfyUI's detection fixes Chroma's width (24 heads of 128) and its approximator (64 -> 5120 x 5 layers -> 3072)
CHROMA_CONFIG = dict(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                     joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64,
                     approximator_hidden_dim=5120, approximator_layers=5)
QWEN_FILE = "parity-qwen-image.safetensors"
QWEN_CONFIG = dict(qwen_image.REAL, num_layers=2)
ZIMAGE_FILE = "parity-zimage-fp8-scaled.safetensors"
ZIMAGE_CONFIG = dict(zimage.REAL, n_layers=1)
# width, pooled width, tokens of the test conditioning; latent size in pixels
FAMILY = {"flux": dict(file=FLUX_FILE, width=4096, pooled=768, tokens=4, size=64),
          "sd3": dict(file=SD3_FILE, width=4096, pooled=2048, tokens=8, size=128),
          "qwen_image": dict(file=QWEN_FILE, width=3584, pooled=1, tokens=4, size=64, frames=True)}
FAMILY["kontext"] = FAMILY["flux"]  # Kontext files are Flux.1 dev files; the conditioning decides
FAMILY["chroma"] = dict(FAMILY["flux"], file=CHROMA_FILE)  # T5 only: Chroma ignores the pooled output
FLUX_FP8_FILE = "parity-flux-fp8-scaled.safetensors"
FAMILY["fp8"] = dict(FAMILY["flux"], file=FLUX_FP8_FILE)  # the Flux model as ComfyUI's fp8_scaled file
# Z-Image: Qwen3 4B's 2560-wide states; 128 px (64 image tokens: a multiple of its 32-token padding)
FAMILY["zimage"] = dict(file=ZIMAGE_FILE, width=2560, pooled=1, tokens=8, size=128, slow=True)
STEPS = 3

SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "uni_pc",
            "lcm")
SCHEDULERS = ("simple", "normal", "karras", "exponential", "sgm_uniform", "beta", "ddim_uniform",
              "linear_quadratic")
FLUX_SWEEP = (("euler", "simple"), ("euler", "karras"), ("euler_ancestral", "normal"), ("heun", "simple"),
              ("dpm_2", "karras"), ("dpmpp_2m", "simple"), ("dpmpp_2m_sde", "simple"), ("dpmpp_sde", "exponential"),
              ("ddim", "sgm_uniform"), ("uni_pc", "beta"), ("lcm", "ddim_uniform"), ("euler", "linear_quadratic"))


def _cases() -> dict[str, dict]:
    """Ordered so that each family's prompts run together: the stock model stays cached and our worker
    group stays warm (the same loader settings) until the family changes."""
    cases = {}

    def add(fam, sampler, scheduler, **kw):
        cases[f"{fam}-{sampler}-{scheduler}" + "".join(f"-{k}{v}" for k, v in kw.items())] = \
            dict(family=fam, sampler=sampler, scheduler=scheduler, **kw)
    # every sampler and every scheduler at least once at the model's real width, end to end through the nodes
    # (test_sampling_comfy compares every sampler with simple and karras, and every scheduler, for every family
    # with ComfyUI's own sampling code); the pairs test_bound_separates_settings compares among them
    for sampler, scheduler in FLUX_SWEEP:
        add("flux", sampler, scheduler)
    for sampler, scheduler in (("euler", "simple"), ("dpmpp_2m_sde", "karras")):
        add("flux", sampler, scheduler, denoise=0.6, batch=2)
    # inpainting: a noise mask on a non-empty latent (ddim keeps the masked area with noise of its own)
    for sampler, scheduler, denoise in (("euler", "simple", 1.0), ("ddim", "simple", 1.0), ("dpmpp_2m", "karras", 0.8)):
        add("flux", sampler, scheduler, mask=1, denoise=denoise)
    # Flux.1 Kontext: two ReferenceLatents (one of odd latent height) on the same Flux file, each placement,
    # and true CFG with the references on the negative too
    add("kontext", "euler", "simple", refs="offset")
    add("kontext", "dpmpp_2m", "karras", refs="index")
    add("kontext", "euler", "simple", refs="uxo", cfg=3.0)
    # ComfyUI's scaled-fp8 Flux file: computed as stored x scale on both sides
    add("fp8", "euler", "simple")
    add("fp8", "dpmpp_2m", "karras", denoise=0.6)
    # Chroma at its real width: true CFG with a negative (its usual setting), the guidance the conditioning
    # carries reaching the approximator (5 layers of 5120 over 344 modulation rows, ~3 s an evaluation here; the
    # samplers, schedules and img2img are the other families' cases: they do not depend on the family)
    add("chroma", "euler", "simple", cfg=3.0)
    # SD3 is cheap (width 192): every sampler with CFG and a negative, the schedulers in turn
    for i, sampler in enumerate(SAMPLERS):
        add("sd3", sampler, SCHEDULERS[i % len(SCHEDULERS)], cfg=4.0)
    for sampler, scheduler in (("euler", "normal"), ("dpmpp_sde", "simple")):
        add("sd3", sampler, scheduler, cfg=4.0, denoise=0.6, batch=2)
    add("sd3", "euler_ancestral", "karras", cfg=4.0, mask=1, batch=2)
    # Qwen-Image: true CFG; img2img moves a latent through the Wan format's per-channel mean and std
    for sampler, scheduler, denoise in (("euler", "simple", 1.0), ("dpmpp_2m", "karras", 0.6)):
        add("qwen_image", sampler, scheduler, cfg=4.0, **({"denoise": denoise} if denoise < 1 else {}))
    # Qwen-Image-Edit: two reference latents, ComfyUI's default placement for Qwen (index: no method node) with
    # true CFG, and the offset placement
    add("qwen_image", "euler", "simple", refs="default", cfg=4.0)
    add("qwen_image", "dpmpp_2m", "karras", refs="offset")
    # Z-Image (Turbo runs at cfg 1): the smallest file ComfyUI detects as Z-Image, scaled fp8
    add("zimage", "euler", "simple")
    return cases


CASES = _cases()
MEASURED: dict[str, float] = {}


def _write_models(folder: Path, cache: Path,
                  only: tuple[str, ...] = ("flux", "fp8", "sd3", "chroma", "qwen_image")) -> None:
    """The files of the families in ``only`` (of FAMILY's: each takes seconds to build and write), linked into
    ``folder`` from ``cache``, the session's folder of them (the modules that take the same files write them
    once: ``tmp_path_factory.getbasetemp() / "parity-files"``)."""
    cache.mkdir(exist_ok=True)
    for fam, config, name, dtype in ((flux, FLUX_CONFIG, FLUX_FILE, torch.bfloat16),
                                     (sd3, SD3_CONFIG, SD3_FILE, torch.float32),
                                     (chroma, CHROMA_CONFIG, CHROMA_FILE, torch.bfloat16),
                                     (qwen_image, QWEN_CONFIG, QWEN_FILE, torch.bfloat16)):
        if fam.NAME not in only:
            continue
        names = [name] + ([FLUX_FP8_FILE] if fam is flux and "fp8" in only else [])
        if not all((cache / n).exists() for n in names):
            model = fam.build_meta(config)
            fam.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
            if not (cache / name).exists():
                write_checkpoint(cache / f"{name}.part", model.state_dict(), fam.NAME, dict(model.config),
                                 dtype=dtype)
                os.replace(cache / f"{name}.part", cache / name)
            if FLUX_FP8_FILE in names and not (cache / FLUX_FP8_FILE).exists():  # every Linear weight float8 with
                # its scale_weight, the scaled_fp8 marker
                write_scaled_fp8(cache / "fp8.part", model.state_dict(), "flux", dict(model.config),
                                 prefix="model.diffusion_model.")
                os.replace(cache / "fp8.part", cache / FLUX_FP8_FILE)
            del model
        for n in names:
            os.link(cache / n, folder / n)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("parity")
    run_dir = tmp_path_factory.mktemp("run")
    run_dir.chmod(0o700)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    _write_models(base / "models" / "diffusion_models", tmp_path_factory.getbasetemp() / "parity-files")
    srv = start_server(base, run_dir)
    yield srv
    srv.stop()
    if MEASURED:
        print("\nrelative L2, PipeFusion (2 CPU ranks, warm-up = steps) vs stock KSampler:")
        for name, rel in MEASURED.items():
            print(f"  {name:48s} {rel:.2e}")


def _write_zimage(folder: Path) -> None:
    """The Z-Image file, written when its case first runs: 0.9 B parameters built in float32, then stored as
    ComfyUI's scaled fp8 with the prefix ComfyUI's own files carry."""
    if (folder / ZIMAGE_FILE).exists():
        return
    model = zimage.build_meta(ZIMAGE_CONFIG)
    zimage.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
    write_scaled_fp8(folder / ZIMAGE_FILE, model.state_dict(), "zimage", dict(model.config),
                     prefix="model.diffusion_model.")
    del model


def parity_prompt(case: dict, prefix: str, seed: int = 7) -> dict:
    f = FAMILY[case["family"]]
    batch, denoise, cfg = case.get("batch", 1), case.get("denoise", 1.0), case.get("cfg", 1.0)
    cond = {"tokens": f["tokens"], "width": f["width"], "pooled_width": f["pooled"], "guidance": 3.5}
    if denoise < 1.0 or case.get("mask"):  # img2img, inpainting: a seeded random (never empty) latent
        latent = {"class_type": "PipeFusionTestLatent",
                  "inputs": {"width": f["size"], "height": f["size"], "batch_size": batch, "channels": 16,
                             "seed": 11, "scale": 1.0}}
    else:
        latent = {"class_type": "EmptySD3LatentImage",
                  "inputs": {"width": f["size"], "height": f["size"], "batch_size": batch}}
    sample = {"seed": seed, "steps": STEPS, "cfg": cfg, "sampler_name": case["sampler"],
              "scheduler": case["scheduler"], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
              "denoise": denoise}
    masked = {}
    if case.get("mask"):  # SetLatentNoiseMask with the left half kept (mask 0) and the right half sampled
        size = f["size"]
        masked = {
            "10": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": size, "height": size}},
            "11": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size // 2, "height": size}},
            "12": {"class_type": "MaskComposite", "inputs": {"destination": ["10", 0], "source": ["11", 0],
                                                             "x": 0, "y": 0, "operation": "multiply"}},
            "13": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["12", 0]}}}
        sample["latent_image"] = ["13", 0]
    if case.get("refs"):  # Kontext, Qwen-Image-Edit: ReferenceLatent x2 on both conditionings, the placement method
        for i, (w, h) in enumerate(((48, 64), (32, 72))):
            masked[f"2{i}"] = {"class_type": "PipeFusionTestLatent",
                               "inputs": {"width": w, "height": h, "batch_size": 1, "channels": 16, "seed": 20 + i,
                                          "scale": 1.0, "frames": int(f.get("frames", False))}}
        for which, base in (("positive", "3"), ("negative", "4")):
            first, second, method = f"{base}1", f"{base}2", f"{base}3"
            masked[first] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": [base, 0], "latent": ["20", 0]}}
            masked[second] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": [first, 0], "latent": ["21", 0]}}
            sample[which] = [second, 0]
            if case["refs"] != "default":  # else the model's own default placement
                masked[method] = {"class_type": "FluxKontextMultiReferenceLatentMethod",
                                  "inputs": {"conditioning": [second, 0], "reference_latents_method":
                                             {"uxo": "uxo/uno"}.get(case["refs"], case["refs"])}}
                sample[which] = [method, 0]
    return {
        **masked,
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": f["file"], "weight_dtype": "default"}},
        "2": {"class_type": "PipeFusionDiTLoader",
              "inputs": {"unet_name": f["file"], "weight_dtype": "float32", "devices": "cpu:2",
                         "strategy": "pipefusion", "patches": 2, "warmup_steps": STEPS}},
        "3": {"class_type": "PipeFusionTestConditioning", "inputs": {**cond, "seed": 0}},
        "4": {"class_type": "PipeFusionTestConditioning", "inputs": {**cond, "seed": 1}},
        "5": latent,
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sample}},
        "7": {"class_type": "PipeFusionKSampler", "inputs": {"pipefusion_model": ["2", 0], **sample}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"{prefix}_stock"}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"{prefix}_ours"}},
    }


def saved_latent(srv, prefix: str) -> torch.Tensor:
    files = sorted((srv.base_dir / "output").glob(f"{prefix}_*.latent"), key=lambda p: p.stat().st_mtime)
    assert files, f"SaveLatent wrote no {prefix}_*.latent"
    return load_file(str(files[-1]))["latent_tensor"]


@pytest.fixture(scope="module")
def outcome(server):
    """(stock, ours) LATENT samples of a case, each case run once."""
    cache = {}

    def get(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in cache:
            if CASES[name]["family"] == "zimage":  # the other cases' warm groups leave first: 0.9 B parameters
                server.post_json("/free", {"unload_models": True, "free_memory": True})
                assert wait_until(lambda: not worker_pids(server.pid), 60), worker_pids(server.pid)
                _write_zimage(server.base_dir / "models" / "diffusion_models")
            prefix = f"parity/{name}"
            t0 = time.monotonic()
            status, msgs = run_prompt(server, parity_prompt(CASES[name], prefix), timeout=600)
            assert status == "execution_success", (msgs[-1]["data"], server.log_tail(40))
            cache[name] = saved_latent(server, f"{prefix}_stock"), saved_latent(server, f"{prefix}_ours")
            print(f"\n{name}: {time.monotonic() - t0:.1f} s", end="")
        return cache[name]
    return get


def rel_l2(ours: torch.Tensor, stock: torch.Tensor) -> float:
    return float((ours.double() - stock.double()).norm() / stock.double().norm())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if FAMILY[c["family"]].get("slow") else n
                                  for n, c in CASES.items()])
def test_pipefusion_equals_stock_ksampler(name, outcome):
    stock, ours = outcome(name)
    case, f = CASES[name], FAMILY[CASES[name]["family"]]
    frames = (1,) if f.get("frames") else ()
    assert stock.shape == ours.shape == (case.get("batch", 1), 16, *frames, f["size"] // 8, f["size"] // 8)
    assert torch.isfinite(stock).all() and float(stock.abs().max()) > 0.1
    MEASURED[name] = rel = rel_l2(ours, stock)
    assert rel <= TOL, f"{name}: relative L2 {rel:.3e} > {TOL}"


def test_stock_ran_in_float32(server, outcome):
    """The comparison is in float32 on both sides: ComfyUI's CPU default, as its log says."""
    outcome(next(iter(CASES)))
    assert "model weight dtype torch.float32, manual cast: None" in server.log_path.read_text(errors="replace")


def test_bound_separates_settings(outcome):
    """The bound is far below what one setting changes: another scheduler, sampler or denoise
    moves the stock result by much more than 1e-3."""
    pairs = (("flux-euler-simple", "flux-euler-karras"), ("flux-euler-simple", "flux-heun-simple"),
             ("flux-dpmpp_2m-simple", "flux-dpmpp_2m_sde-simple"),
             ("sd3-euler-simple-cfg4.0", "sd3-heun-karras-cfg4.0"))
    for a, b in pairs:
        assert rel_l2(outcome(a)[0], outcome(b)[0]) > 20 * TOL, (a, b)
    # img2img keeps a trace of its input: the two batch entries differ, and the result differs from t2i
    img = outcome("flux-euler-simple-denoise0.6-batch2")[0]
    assert rel_l2(img[0], img[1]) > 20 * TOL
    assert rel_l2(img[:1], outcome("flux-euler-simple")[0]) > 20 * TOL
    # the noise mask keeps half of the input latent: the result is not the unmasked one from the same noise
    assert rel_l2(outcome("flux-euler-simple-mask1-denoise1.0")[0], outcome("flux-euler-simple")[0]) > 20 * TOL


def test_kontext_references_change_the_stock_result(outcome):
    """The Kontext cases are not Flux cases in disguise: the stock model's result moves with the references."""
    assert rel_l2(outcome("kontext-euler-simple-refsoffset")[0], outcome("flux-euler-simple")[0]) > 20 * TOL


def test_qwen_edit_references_change_the_stock_result(outcome):
    """The Qwen-Image-Edit cases are not Qwen-Image cases in disguise: the stock result moves with the references."""
    assert rel_l2(outcome("qwen_image-euler-simple-refsdefault-cfg4.0")[0],
                  outcome("qwen_image-euler-simple-cfg4.0")[0]) > 20 * TOL
