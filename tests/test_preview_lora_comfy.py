"""Issue 12 on a real ComfyUI server: live previews of our KSampler as of the stock one (binary websocket
frames, one per step, with ``--preview-method latent2rgb``; none without a preview method), and the lean
path's LoRAs: our loader -> PipeFusion LoRA (x3: kohya, diffusers/peft, LoKr) -> our KSampler equals the stock
UNETLoader -> LoraLoaderModelOnly (x3) -> KSampler; a new strength changes both alike on the same workers.

The model is the SD3.5-medium-like parity model of tests/test_parity_comfy.py (width 192: ComfyUI's own
detection loads it with the stock UNETLoader, and it is cheap on the CPU).
"""
from __future__ import annotations

import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from comfy_pipefusion.models import family, flux, sd3
from comfy_pipefusion.models.checkpoint_write import write_checkpoint

from comfy_helpers import error_message, run_prompt, saved_latent, start_server, worker_pids
from test_parity_comfy import FLUX_CONFIG, SD3_CONFIG, rel_l2

SD3_FILE = "preview-sd35m.safetensors"
STEPS = 3
COND = {"tokens": 8, "width": 4096, "pooled_width": 2048, "guidance": 3.5, "seed": 0}
D = 192  # SD3_CONFIG's width
TOL = 1e-3


def _pair(prefix: str, out: int, inp: int, seed: int, names=("lora_up.weight", "lora_down.weight"), rank: int = 4,
          alpha: float | None = 4.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {f"{prefix}.{names[0]}": torch.randn(out, rank, generator=g) * 0.5,
         f"{prefix}.{names[1]}": torch.randn(rank, inp, generator=g) * 0.5}
    if alpha is not None:
        t[f"{prefix}.alpha"] = torch.tensor(alpha)
    return t


def write_loras(folder) -> None:
    """Three LoRAs for the SD3 model, each in another format: kohya on the fused original weights,
    diffusers/peft on our module names, a LoKr (LyCORIS)."""
    folder.mkdir(parents=True, exist_ok=True)
    peft = ("lora_B.weight", "lora_A.weight")
    g = torch.Generator().manual_seed(3)
    files = {
        "kohya": {**_pair("lora_unet_joint_blocks_0_x_block_attn_qkv", 3 * D, D, 1),
                  **_pair("lora_unet_joint_blocks_1_x_block_mlp_fc1", 4 * D, D, 2)},
        "peft": {**_pair("transformer.transformer_blocks.0.attn.to_k", D, D, 4, peft, alpha=None),
                 **_pair("transformer.transformer_blocks.1.attn.add_q_proj", D, D, 5, peft, alpha=None),
                 **_pair("transformer.transformer_blocks.2.ff.net.2", D, 4 * D, 6, peft, alpha=None)},
        "lokr": {"lora_unet_joint_blocks_1_x_block_attn_proj.lokr_w1": torch.randn(4, 4, generator=g),
                 "lora_unet_joint_blocks_1_x_block_attn_proj.lokr_w2_a": torch.randn(D // 4, 4, generator=g) * 0.5,
                 "lora_unet_joint_blocks_1_x_block_attn_proj.lokr_w2_b": torch.randn(4, D // 4, generator=g) * 0.5,
                 "lora_unet_joint_blocks_1_x_block_attn_proj.alpha": torch.tensor(2.0)},
        "sdxl": _pair("lora_unet_down_blocks_0_attentions_0_proj_in", 8, 8, 7)}  # another family's
    for name, tensors in files.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))


def _server(tmp_path_factory, name: str, args: tuple):
    base = tmp_path_factory.mktemp(name)
    run_dir = tmp_path_factory.mktemp("run")
    run_dir.chmod(0o700)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    write_loras(base / "models" / "loras")
    model = sd3.build_meta(SD3_CONFIG)
    sd3.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
    write_checkpoint(base / "models" / "diffusion_models" / SD3_FILE, model.state_dict(), sd3.NAME,
                     dict(model.config), dtype=torch.float32)
    return start_server(base, run_dir, args=args)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _server(tmp_path_factory, "preview", ("--preview-method", "latent2rgb"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def quiet_server(tmp_path_factory):
    srv = _server(tmp_path_factory, "nopreview", ("--preview-method", "none"))
    yield srv
    srv.stop()


def sampler_prompt(ours: bool, seed: int = 7) -> dict:
    sample = {"seed": seed, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
              "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}
    if ours:
        model = {"class_type": "PipeFusionDiTLoader",
                 "inputs": {"unet_name": SD3_FILE, "weight_dtype": "float32", "devices": "cpu:2",
                            "strategy": "pipefusion", "patches": 2, "warmup_steps": 1}}
        sampler = {"class_type": "PipeFusionKSampler", "inputs": {"pipefusion_model": ["1", 0], **sample}}
    else:
        model = {"class_type": "UNETLoader", "inputs": {"unet_name": SD3_FILE, "weight_dtype": "default"}}
        sampler = {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sample}}
    return {"1": model, "3": {"class_type": "PipeFusionTestConditioning", "inputs": COND},
            "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
            "6": sampler,
            "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "latents/pv"}}}


def previews(srv, ours: bool) -> list[bytes]:
    """The preview images (JPEG) the websocket carried while the prompt ran; every binary frame must be one."""
    frames: list = []
    status, msgs = run_prompt(srv, sampler_prompt(ours), timeout=300, frames=frames)
    assert status == "execution_success", (msgs[-1]["data"], srv.log_tail(40))
    images = []
    for f in frames:
        kind, fmt = struct.unpack(">II", f[:8])
        assert (kind, fmt) == (1, 1), f"binary frame of event {kind}, format {fmt}: not a JPEG preview"
        assert f[8:10] == b"\xff\xd8"  # JPEG start of image
        images.append(bytes(f[8:]))
    return images


def test_preview_one_image_per_step_like_stock_ksampler(server):
    stock, ours = previews(server, ours=False), previews(server, ours=True)
    assert len(stock) == STEPS, f"the stock KSampler sent {len(stock)} previews for {STEPS} steps"
    assert len(ours) == len(stock), f"PipeFusion KSampler sent {len(ours)} previews, the stock one {len(stock)}"
    assert len(set(ours)) > 1  # the image forms: not one picture repeated


@pytest.mark.slow  # a server of its own (~40 s idle) for what every other server test already runs without
def test_preview_none_without_a_preview_method(quiet_server):
    assert previews(quiet_server, ours=False) == []
    assert previews(quiet_server, ours=True) == []


def lora_prompt(strengths: tuple[float, float, float], prefix: str, seed: int = 7, unet: str = SD3_FILE,
                cond: dict = COND, size: int = 128) -> dict:
    """One prompt, three branches on shared conditioning and latent: stock without LoRA, stock with the three
    LoRAs (LoraLoaderModelOnly), ours with them (PipeFusion LoRA), warm-up = steps (exact)."""
    sample = {"seed": seed, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
              "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
              "2": {"class_type": "PipeFusionDiTLoader",
                    "inputs": {"unet_name": unet, "weight_dtype": "float32", "devices": "cpu:2",
                               "strategy": "pipefusion", "patches": 2, "warmup_steps": STEPS}},
              "3": {"class_type": "PipeFusionTestConditioning", "inputs": cond},
              "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}}
    stock, ours = ["1", 0], ["2", 0]
    for i, (name, strength) in enumerate(zip(("kohya", "peft", "lokr"), strengths)):
        prompt[f"s{i}"] = {"class_type": "LoraLoaderModelOnly",
                           "inputs": {"model": stock, "lora_name": f"{name}.safetensors", "strength_model": strength}}
        prompt[f"o{i}"] = {"class_type": "PipeFusionLoRA",
                           "inputs": {"pipefusion_model": ours, "lora_name": f"{name}.safetensors",
                                      "strength_model": strength}}
        stock, ours = [f"s{i}", 0], [f"o{i}", 0]
    for node, sampler in (("k0", {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sample}}),
                          ("k1", {"class_type": "KSampler", "inputs": {"model": stock, **sample}}),
                          ("k2", {"class_type": "PipeFusionKSampler", "inputs": {"pipefusion_model": ours, **sample}})):
        prompt[node] = sampler
        prompt[f"save_{node}"] = {"class_type": "SaveLatent",
                                  "inputs": {"samples": [node, 0], "filename_prefix": f"{prefix}_{node}"}}
    return prompt


def test_lora_lean_path_equals_stock_lora_loader_and_strength_keeps_the_group(server):
    results, pids = [], []
    for n, strengths in enumerate(((1.0, 0.8, 1.2), (0.4, 0.8, 1.2))):
        t0 = time.monotonic()
        status, msgs = run_prompt(server, lora_prompt(strengths, f"lora/{n}"), timeout=600)
        assert status == "execution_success", (msgs[-1]["data"], server.log_tail(40))
        results.append([saved_latent(server, f"lora/{n}_{k}") for k in ("k0", "k1", "k2")])
        pids.append(worker_pids(server.pid))
        print(f"\nLoRA prompt {n} (strengths {strengths}): {time.monotonic() - t0:.1f} s", end="")
    for (plain, stock, ours), strengths in zip(results, ("first", "second")):
        assert rel_l2(stock, plain) > 20 * TOL, "the LoRAs hardly change the stock result: the test proves nothing"
        rel = rel_l2(ours, stock)
        print(f"\n{strengths} strengths: relative L2 ours vs stock {rel:.2e}", end="")
        assert rel <= TOL, f"PipeFusion LoRA differs from LoraLoaderModelOnly: relative L2 {rel:.2e} > {TOL}"
    assert rel_l2(results[1][1], results[0][1]) > 20 * TOL  # the new strength changed the stock result...
    assert len(pids[0]) == 2 and pids[1] == pids[0]  # ...and ours on the same warm workers


def test_lora_of_another_family_is_refused_naming_its_keys(server):
    prompt = lora_prompt((1.0, 0.8, 1.2), "lora/bad")
    prompt["o0"]["inputs"]["lora_name"] = "sdxl.safetensors"
    prompt = {k: v for k, v in prompt.items() if k in ("2", "3", "5", "o0", "o1", "o2", "k2", "save_k2")}
    status, msgs = run_prompt(server, prompt, timeout=120)
    assert status == "execution_error"
    assert "none of the 3 keys" in error_message(msgs) and "lora_unet_down_blocks_0" in error_message(msgs)


FLUX_FILE = "lora-flux.safetensors"
FLUX_COND = {"tokens": 4, "width": 4096, "pooled_width": 768, "guidance": 3.5, "seed": 0}
W = 3072  # ComfyUI detects Flux at this width only: one double and one single block (0.55 B parameters)


@pytest.fixture(scope="module")
def flux_server(tmp_path_factory):
    """Flux: the same three formats, on the fused qkv, a single block's linear1 (q, k, v and the MLP input)
    and the MLP."""
    base = tmp_path_factory.mktemp("loraflux")
    run_dir = tmp_path_factory.mktemp("run")
    run_dir.chmod(0o700)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    files = {"kohya": {**_pair("lora_unet_double_blocks_0_img_attn_qkv", 3 * W, W, 1),
                       **_pair("lora_unet_single_blocks_0_linear1", 7 * W, W, 2)},
             "peft": {**_pair("transformer.transformer_blocks.0.attn.to_k", W, W, 4, ("lora_B.weight", "lora_A.weight"),
                              alpha=None),
                      **_pair("transformer.single_transformer_blocks.0.proj_out", W, 5 * W, 5,
                              ("lora_B.weight", "lora_A.weight"), alpha=None)},
             "lokr": {"lora_unet_double_blocks_0_img_mlp_0.lokr_w1": torch.randn(4, 4, generator=g) * 0.2,
                      "lora_unet_double_blocks_0_img_mlp_0.lokr_w2_a": torch.randn(W, 4, generator=g) * 0.2,
                      "lora_unet_double_blocks_0_img_mlp_0.lokr_w2_b": torch.randn(4, W // 4, generator=g) * 0.2,
                      "lora_unet_double_blocks_0_img_mlp_0.alpha": torch.tensor(2.0)}}
    for name, tensors in files.items():
        save_file({k: v if k.endswith("alpha") else v * 0.1 for k, v in tensors.items()},
                  str(loras / f"{name}.safetensors"))
    model = flux.build_meta(FLUX_CONFIG)
    flux.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
    write_checkpoint(base / "models" / "diffusion_models" / FLUX_FILE, model.state_dict(), flux.NAME,
                     dict(model.config), dtype=torch.bfloat16)
    del model
    srv = start_server(base, run_dir)
    yield srv
    srv.stop()


@pytest.mark.slow  # a server and a 0.55 B-parameter model of its own (~1 GB in bf16, computed in float32)
def test_lora_lean_path_equals_stock_lora_loader_flux(flux_server):
    status, msgs = run_prompt(flux_server, lora_prompt((1.0, 0.7, 1.3), "lora/flux", unet=FLUX_FILE,
                                                       cond=FLUX_COND, size=64), timeout=900)
    assert status == "execution_success", (msgs[-1]["data"], flux_server.log_tail(40))
    plain, stock, ours = (saved_latent(flux_server, f"lora/flux_{k}") for k in ("k0", "k1", "k2"))
    assert rel_l2(stock, plain) > 20 * TOL, "the LoRAs hardly change the stock result: the test proves nothing"
    rel = rel_l2(ours, stock)
    print(f"\nFlux: relative L2 ours vs stock {rel:.2e}", end="")
    assert rel <= TOL, f"PipeFusion LoRA differs from LoraLoaderModelOnly on Flux: relative L2 {rel:.2e} > {TOL}"
