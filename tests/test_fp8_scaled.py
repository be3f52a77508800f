"""ComfyUI's scaled-fp8 files (float8 weights with per-tensor ``scale_weight`` and the ``scaled_fp8`` marker) and
mixed-precision files (``weight_scale`` on some layers, the rest bf16): detected, loaded per stage with the
weights kept 8-bit and their scales, and computed as ComfyUI computes them (stored x scale; in a classic
scaled-fp8 file ComfyUI builds every Linear in float8, so their biases are rounded to it on load, as ours are)."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.models import checkpoint, flux, fp8
from comfy_pipefusion.models.checkpoint_write import quantize_scaled, write_scaled_fp8
from comfy_pipefusion.models.keymap import invert
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model

CONFIG = flux.PRESETS["tiny"]["config"]


@pytest.fixture(scope="module")
def source():
    model = load_rank_model(ModelSource(preset="tiny"), ParallelConfig("serial", 1), 0, torch.device("cpu"),
                            torch.float32)[0]
    return model.state_dict()


def _dequantised(state: dict, mixed: bool) -> dict:
    """The diffusers state dict ComfyUI computes with: each quantised weight as stored x scale, the rest as
    stored (bf16)."""
    kmap = checkpoint.ORIGINAL_MAPS["flux"](CONFIG)
    stored = invert(state, kmap)
    for k, v in stored.items():
        if v.dim() == 2 and k.endswith(".weight") and (not mixed or k.startswith("double_blocks.")):
            q, s = quantize_scaled(v)
            stored[k] = q.float() * s
        elif not mixed and k.endswith(".bias"):  # ComfyUI's scaled-fp8 Linear holds its bias in fp8 too
            stored[k] = v.to(torch.bfloat16).to(torch.float8_e4m3fn).float()
        else:
            stored[k] = v.to(torch.bfloat16).float()
    out = {}
    for key, pieces in kmap.items():
        parts = [stored[src][a:b] for src, a, b in pieces]
        out[key] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out


@pytest.mark.parametrize("mixed,prefix", [(False, "model.diffusion_model."), (True, "")])
def test_fp8_scaled_file_computes_as_comfyui(tmp_path, source, mixed, prefix):
    path = write_scaled_fp8(tmp_path / "flux-fp8.safetensors", source, "flux", CONFIG, prefix=prefix, mixed=mixed)
    info = checkpoint.open_checkpoint(path)
    assert (info.family, info.prefix, info.config["num_layers"]) == ("flux", prefix, CONFIG["num_layers"])
    ours = load_rank_model(ModelSource(checkpoint=str(path)), ParallelConfig("serial", 1), 0, torch.device("cpu"),
                           torch.float32)[0]
    layers = fp8.stored_layers(ours)
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn and m.scale is not None for m in layers)
    names = [n for n, m in ours.named_modules() if m in layers]
    assert all(n.startswith("transformer_blocks.") for n in names) == mixed  # mixed: the double blocks only
    ref = flux.build_meta(CONFIG)
    ref.load_state_dict(_dequantised(source, mixed), assign=True, strict=False)
    g = torch.Generator().manual_seed(1)
    x, txt = torch.randn(1, 64, 64, generator=g), torch.randn(1, 8, 32, generator=g)
    pooled, t, gd = torch.randn(1, 32, generator=g), torch.tensor([0.7]), torch.tensor([3.5])
    with torch.inference_mode():
        want = flux.forward(ref, x, t, txt, pooled, gd, 8, 8)
        cast = flux.forward(ours, x, t, txt, pooled, gd, 8, 8)
        fp8.set_compute(ours, "upcast", torch.float32)
        upcast = flux.forward(ours, x, t, txt, pooled, gd, 8, 8)
    assert float((cast - want).abs().max()) <= 1e-5 and torch.equal(cast, upcast)
    # the scales matter: without them the weights are hundreds of times too large
    for m in layers:
        m.scale, m.upcast = None, None
    with torch.inference_mode():
        unscaled = flux.forward(ours, x, t, txt, pooled, gd, 8, 8)
    assert not torch.isfinite(unscaled).all() or float((unscaled - want).abs().max()) > 1.0


def test_fp8_scaled_malformed_scales_are_refused(tmp_path, source):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = write_scaled_fp8(tmp_path / "ok.safetensors", source, "flux", CONFIG)
    tensors = load_file(str(path))
    tensors["double_blocks.0.img_attn.qkv.scale_weight"] = torch.ones(3)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(checkpoint.CheckpointError, match="only per-tensor scales"):
        checkpoint.open_checkpoint(tmp_path / "bad.safetensors")
