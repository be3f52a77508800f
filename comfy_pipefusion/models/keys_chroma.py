"""Chroma's original single-file layout (as ComfyUI loads it) mapped onto diffusers' ChromaTransformer2DModel.

The blocks are Flux.1's without modulation layers (``keys_flux`` without ``img_mod``/``txt_mod``/``modulation``),
and the final layer has no adaLN; the modulation approximator is new:

    distilled_guidance_layer.in_proj, .out_proj       -> the same names
    distilled_guidance_layer.layers.N.in_layer/out_layer -> .layers.N.linear_1/linear_2
    distilled_guidance_layer.norms.N.scale            -> .norms.N.weight
"""
from __future__ import annotations

from . import keys_flux
from .keymap import KeyMap, rename

_MODULATION = (".norm1.linear.", ".norm1_context.linear.", ".norm.linear.")


def original_map(config: dict) -> KeyMap:
    d, out = keys_flux.width(config), {}
    rename(out, "context_embedder", "txt_in")
    rename(out, "x_embedder", "img_in")
    g = "distilled_guidance_layer"
    rename(out, f"{g}.in_proj", f"{g}.in_proj")
    rename(out, f"{g}.out_proj", f"{g}.out_proj")
    for i in range(config.get("approximator_layers", 5)):
        rename(out, f"{g}.layers.{i}.linear_1", f"{g}.layers.{i}.in_layer")
        rename(out, f"{g}.layers.{i}.linear_2", f"{g}.layers.{i}.out_layer")
        out[f"{g}.norms.{i}.weight"] = ((f"{g}.norms.{i}.scale", 0, None),)
    for i in range(config["num_layers"]):
        keys_flux.double_block(out, i, d)
    for i in range(config["num_single_layers"]):
        keys_flux.single_block(out, i, d)
    for key in [k for k in out if any(m in k for m in _MODULATION)]:
        del out[key]
    rename(out, "proj_out", "final_layer.linear")
    return out
