"""Our LoRA math (comfy_pipefusion/adapters) against ComfyUI 0.3.75's own: ``comfy.lora.model_lora_keys_unet``
(which weight a file's key names), ``comfy.lora.load_lora`` and ``comfy.lora.calculate_weight``, run in a
subprocess on the installed test host, on the same tensors. Every adapter kind (LoRA, LoHa, LoKr, DoRA on the
output rows and on the input columns of a fused weight, full differences with a bias), every name format
(kohya, diffusers/peft, ComfyUI's own, OneTrainer, ComfyUI's Flux ``linear1_qkv``), several files chained at
mixed strengths; compared key by key in ComfyUI's (original) layout. Then one stage's patching and its undo.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from comfy_pipefusion.adapters import LoraSpec, StageAdapters, aliases, patch, read_entries
from comfy_pipefusion.models import family, flux
from comfy_pipefusion.models.checkpoint import load_modules, save_checkpoint
from comfy_pipefusion.models.keymap import invert
from comfy_pipefusion.models.keys_flux import original_map

ROOT = Path(__file__).resolve().parent.parent
CONFIG = flux.PRESETS["tiny"]["config"]
D = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]  # 64
UNET_CONFIG = {"image_model": "flux", "depth": CONFIG["num_layers"], "depth_single_blocks": CONFIG["num_single_layers"],
               "hidden_size": D, "guidance_embed": True}
STRENGTHS = (0.8, -0.5, 1.0, 1.3, 0.6, 1.0)


def _g(seed: int):
    return torch.Generator().manual_seed(seed)


def _lora(prefix: str, out: int, inp: int, rank: int, seed: int, alpha: float | None,
          names=("lora_up.weight", "lora_down.weight")):
    g = _g(seed)
    t = {f"{prefix}.{names[0]}": torch.randn(out, rank, generator=g) * 0.1,
         f"{prefix}.{names[1]}": torch.randn(rank, inp, generator=g) * 0.1}
    if alpha is not None:
        t[f"{prefix}.alpha"] = torch.tensor(alpha)
    return t


def lora_files(folder: Path) -> list[Path]:
    """Six files, one per format and kind, each written the way its trainer writes it."""
    files = {}
    # 1. kohya LoRA on original names: fused qkv, a single block's linear1, the final adaLN (stored shift/scale)
    files["kohya"] = {**_lora("lora_unet_double_blocks_0_img_attn_qkv", 3 * D, D, 4, 1, 2.0),
                      **_lora("lora_unet_single_blocks_1_linear1", 7 * D, D, 4, 2, 8.0),
                      **_lora("lora_unet_final_layer_adaLN_modulation_1", 2 * D, D, 2, 3, None),
                      **_lora("lora_unet_img_in", D, 64, 4, 4, 4.0)}
    # 2. diffusers/peft: our module names, lora_A/lora_B, no alpha; the final norm (swapped halves) included
    peft = ("lora_B.weight", "lora_A.weight")
    files["peft"] = {**_lora("transformer.transformer_blocks.0.attn.to_q", D, D, 4, 5, None, peft),
                     **_lora("transformer.transformer_blocks.1.attn.add_v_proj", D, D, 4, 6, None, peft),
                     **_lora("transformer.single_transformer_blocks.0.proj_mlp", 4 * D, D, 4, 7, None, peft),
                     **_lora("transformer.norm_out.linear", 2 * D, D, 4, 8, None, peft),
                     **_lora("transformer.proj_out", 64, D, 2, 9, None, peft)}
    # 3. LoHa (LyCORIS) in ComfyUI's own names, with alpha; and a text-encoder key ComfyUI's model-only loader skips
    g = _g(10)
    files["loha"] = {"diffusion_model.double_blocks.1.img_mlp.0.hada_w1_a": torch.randn(4 * D, 4, generator=g) * 0.2,
                     "diffusion_model.double_blocks.1.img_mlp.0.hada_w1_b": torch.randn(4, D, generator=g) * 0.2,
                     "diffusion_model.double_blocks.1.img_mlp.0.hada_w2_a": torch.randn(4 * D, 4, generator=g) * 0.2,
                     "diffusion_model.double_blocks.1.img_mlp.0.hada_w2_b": torch.randn(4, D, generator=g) * 0.2,
                     "diffusion_model.double_blocks.1.img_mlp.0.alpha": torch.tensor(2.0)}
    # 4. LoKr: a full w1 with a factored w2 (rank 4, alpha), and a full w1/w2 pair (no scaling)
    g = _g(11)
    files["lokr"] = {"lora_unet_double_blocks_0_txt_attn_proj.lokr_w1": torch.randn(4, 4, generator=g) * 0.3,
                     "lora_unet_double_blocks_0_txt_attn_proj.lokr_w2_a": torch.randn(D // 4, 4, generator=g) * 0.3,
                     "lora_unet_double_blocks_0_txt_attn_proj.lokr_w2_b": torch.randn(4, D // 4, generator=g) * 0.3,
                     "lora_unet_double_blocks_0_txt_attn_proj.alpha": torch.tensor(3.0),
                     "lora_unet_single_blocks_2_linear2.lokr_w1": torch.randn(2, 2, generator=g) * 0.3,
                     "lora_unet_single_blocks_2_linear2.lokr_w2": torch.randn(D // 2, 5 * D // 2, generator=g) * 0.3}
    # 5. DoRA: magnitude per output row on a linear, per input column on the fused qkv (the norm over all of
    #    q, k and v), plus ComfyUI's Flux linear1_qkv (the first 3D rows of linear1) from OneTrainer-like names
    g = _g(12)
    files["dora"] = {**_lora("diffusion_model.double_blocks.1.txt_mlp.2", D, 4 * D, 4, 13, 4.0),
                     "diffusion_model.double_blocks.1.txt_mlp.2.dora_scale": torch.rand(D, 1, generator=g) + 0.5,
                     **_lora("lora_unet_double_blocks_1_img_attn_qkv", 3 * D, D, 4, 14, 2.0),
                     "lora_unet_double_blocks_1_img_attn_qkv.dora_scale": torch.rand(1, D, generator=g) + 0.5,
                     **_lora("diffusion_model.single_blocks.3.linear1_qkv", 3 * D, D, 2, 15, 1.0),
                     **_lora("lora_transformer_transformer_blocks_0_ff_net_2", D, 4 * D, 4, 16, 4.0)}
    # 6. full differences of a weight and its bias; and a second LoRA on a weight file 1 changed already (to_q
    #    lies in the qkv that file 1 patched: the order of the files matters, as in ComfyUI)
    g = _g(17)
    files["diff"] = {"diffusion_model.double_blocks.0.img_mod.lin.diff": torch.randn(6 * D, D, generator=g) * 0.01,
                     "diffusion_model.double_blocks.0.img_mod.lin.diff_b": torch.randn(6 * D, generator=g) * 0.01,
                     **_lora("transformer.transformer_blocks.0.attn.to_q", D, D, 4, 18, 2.0,
                             ("lora.up.weight", "lora.down.weight"))}
    paths = []
    for name, tensors in files.items():
        p = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(p))
        paths.append(p)
    return paths


# --- ComfyUI's side (runs in a subprocess) -------------------------------------------------------------

def comfy_patched(weights_path: str, files: list[str], out: str, host: str) -> None:
    """ComfyUI's patched weights (original layout, float32) for ``files`` at STRENGTHS, as LoraLoaderModelOnly
    chains them: every file's patches added in order, then each weight computed once."""
    sys.path.insert(0, host)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_base
    import comfy.utils
    from safetensors.torch import load_file

    weights = torch.load(weights_path)
    stand_in = comfy.model_base.Flux.__new__(comfy.model_base.Flux)  # only what model_lora_keys_unet reads
    torch.nn.Module.__init__(stand_in)
    stand_in.model_config = SimpleNamespace(unet_config=UNET_CONFIG)
    stand_in.state_dict = lambda: {f"diffusion_model.{k}": v for k, v in weights.items()}
    key_map = comfy.lora.model_lora_keys_unet(stand_in, {})
    patches: dict[str, list] = {}
    for path, strength in zip(files, STRENGTHS):
        for k, adapter in comfy.lora.load_lora(load_file(path), key_map).items():
            key, offset, fn = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            patches.setdefault(key, []).append((strength, adapter, 1.0, offset, fn))
    result = {}
    for key, plist in patches.items():
        w = weights[key[len("diffusion_model."):]].clone()
        result[key[len("diffusion_model."):]] = comfy.lora.calculate_weight(plist, w, key)
    torch.save(result, out)


# --- our side ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    model = flux.build_meta(CONFIG)
    flux.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 3)
    kmap = original_map(CONFIG)
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = invert(ours, kmap)
    torch.save(original, folder / "weights.pt")
    files = lora_files(folder)
    from comfy_helpers import ensure_host

    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_lora_math_comfy as t; "
            "t.comfy_patched(sys.argv[3], sys.argv[4].split(','), sys.argv[5], sys.argv[6])")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT), str(ROOT / "tests"), str(folder / "weights.pt"),
                           ",".join(map(str, files)), str(folder / "comfy.pt"), str(ensure_host())],
                          cwd=str(ROOT), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return SimpleNamespace(model=model, kmap=kmap, ours=ours, original=original, files=files,
                           comfy=torch.load(folder / "comfy.pt"))


def _entries(case, path):
    return read_entries(str(path), aliases(case.kmap, "flux", D))


def test_lora_every_kind_and_format_equals_comfyui_key_by_key(case):
    loras = [(_entries(case, p), s) for p, s in zip(case.files, STRENGTHS)]
    patched = patch(case.ours, case.kmap, loras)
    mine = invert({**case.ours, **patched}, case.kmap)  # ComfyUI's layout
    assert set(case.comfy) == {k for k in mine if not torch.equal(mine[k], case.original[k])}, \
        "the weights we change are not the ones ComfyUI changes"
    assert len(case.comfy) >= 16
    for key, ref in case.comfy.items():
        assert ref.shape == mine[key].shape, key
        assert not torch.equal(ref, case.original[key]), f"ComfyUI left {key} as it was"
        err = float((mine[key] - ref).abs().max() / ref.abs().max())
        assert err <= 1e-6, f"{key}: relative difference {err:.2e} from ComfyUI's patched weight"


@pytest.mark.parametrize("undo", ["kept", "reread"])
def test_lora_one_stage_patches_only_its_weights_and_undoes_them(case, undo, tmp_path):
    """A stage holding blocks 0 of both kinds patches exactly those weights as the whole model does; a new
    strength restores and re-patches only the affected weights; no adapter gives the model's weights back.
    The undo either keeps the originals (RAM) or reads the affected weights from the checkpoint again."""
    full = patch(case.ours, case.kmap, [(_entries(case, p), s) for p, s in zip(case.files, STRENGTHS)])
    model = flux.build_meta(CONFIG)
    flux.materialize(model, ["transformer_blocks.0", "single_transformer_blocks.1"], torch.device("cpu"),
                     torch.float32, 0)

    def stage() -> dict[str, torch.Tensor]:  # (a re-read replaces the tensors: always ask the model)
        return {k: v for k, v in model.state_dict().items() if v.device.type != "meta"}
    for k, v in stage().items():
        v.copy_(case.ours[k])
    before = {k: v.clone() for k, v in stage().items()}
    reread = None
    if undo == "reread":
        save_checkpoint(case.model, tmp_path / "model.safetensors")
        reread = lambda keys: load_modules(model, tmp_path / "model.safetensors", keys,  # noqa: E731
                                           torch.device("cpu"), torch.float32)
    adapters = StageAdapters(reread)
    specs = tuple(LoraSpec(str(p), s) for p, s in zip(case.files, STRENGTHS))
    stats = adapters.sync(model, case.kmap, "flux", D, specs)
    changed = {k for k, v in stage().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in full if k in before} and stats["weights"] == len(changed)
    for k in changed:
        assert torch.allclose(stage()[k], full[k], rtol=0, atol=1e-6), k
    kept = sum(before[k].numel() * 4 for k in changed) if undo == "kept" else 0
    assert stats["original_bytes"] == kept
    assert adapters.sync(model, case.kmap, "flux", D, specs) is None  # the same list: nothing to do
    weaker = tuple(LoraSpec(s.path, s.strength * 0.5) for s in specs)
    adapters.sync(model, case.kmap, "flux", D, weaker)
    half = patch(case.ours, case.kmap, [(_entries(case, p), s * 0.5) for p, s in zip(case.files, STRENGTHS)])
    for k in changed:
        assert torch.allclose(stage()[k], half[k], rtol=0, atol=1e-6), k
    adapters.sync(model, case.kmap, "flux", D, ())
    assert all(torch.equal(v, before[k]) for k, v in stage().items()) and adapters.originals == {}
    # a file that cannot be read leaves the model's own weights, and the next job applies its list afresh
    adapters.sync(model, case.kmap, "flux", D, specs)
    with pytest.raises(FileNotFoundError, match="gone"):
        adapters.sync(model, case.kmap, "flux", D, specs + (LoraSpec(str(case.files[0]) + ".gone", 1.0),))
    assert all(torch.equal(v, before[k]) for k, v in stage().items())
    adapters.sync(model, case.kmap, "flux", D, specs)
    assert {k for k, v in stage().items() if not torch.equal(v, before[k])} == changed


def test_lora_for_another_model_is_refused_with_its_keys(case, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file(_lora("lora_unet_down_blocks_0_attentions_0_proj_in", 8, 8, 2, 0, 1.0), str(path))
    with pytest.raises(ValueError, match="none of its 3 keys targets a weight of this model.*lora_unet_down_blocks"):
        _entries(case, path)
