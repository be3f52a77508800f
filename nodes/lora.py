"""PipeFusion LoRA: a LoRA for the lean path. The node only names the file and the strength; each rank
reads from the file the entries of its own stage and applies them there (comfy_pipefusion/adapters), so a
new strength or another LoRA re-patches the affected weights of the warm group instead of reloading it."""
from __future__ import annotations

import dataclasses

import folder_paths

from comfy_pipefusion.adapters import LoraSpec, aliases
from comfy_pipefusion.models import family as families
from comfy_pipefusion.models.checkpoint import ORIGINAL_MAPS
from comfy_pipefusion.models.tensorfile import read_header

from .handle import PipeFusionModel
from .loader import file_stamp


class PipeFusionLoRA:
    CATEGORY = "PipeFusion"
    RETURN_TYPES = ("PIPEFUSION_MODEL",)
    RETURN_NAMES = ("pipefusion_model",)
    FUNCTION = "apply"
    DESCRIPTION = ("Applies a LoRA (kohya, diffusers/peft, ComfyUI, LyCORIS LoCon/LoHa/LoKr, DoRA) to a "
                   "PipeFusion model, as LoraLoaderModelOnly does to a MODEL; chain several.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipefusion_model": ("PIPEFUSION_MODEL",),
            "lora_name": (folder_paths.get_filename_list("loras"),),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }}

    def apply(self, pipefusion_model: PipeFusionModel, lora_name: str, strength_model: float):
        if strength_model == 0:  # as LoraLoaderModelOnly: nothing to apply
            return (pipefusion_model,)
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise ValueError(f"PipeFusion LoRA: {lora_name!r} is not in the loras folder "
                             f"({', '.join(folder_paths.get_folder_paths('loras'))}); put the file there")
        check_targets(path, pipefusion_model)
        spec = LoraSpec(path, float(strength_model), file_stamp(path))
        return (dataclasses.replace(pipefusion_model, adapters=pipefusion_model.adapters + (spec,)),)


def check_targets(path: str, model: PipeFusionModel) -> None:
    """At the node, before any rank reads it: the file must name at least one weight of the model."""
    from comfy_pipefusion.adapters.kinds import split_key

    try:
        entries, _ = read_header(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: named with the reason
        raise ValueError(f"PipeFusion LoRA: {path} is not a readable safetensors file ({exc})") from None
    heads, head_dim = families.config_attention(model.model_config)
    names = aliases(ORIGINAL_MAPS[model.family](model.model_config), model.family, (heads or 0) * (head_dim or 0))
    prefixes = {p[0] for p in map(split_key, entries) if p is not None}
    if not prefixes & names.keys():
        raise ValueError(f"PipeFusion LoRA: none of the {len(entries)} keys of {path} targets a weight of this "
                         f"{model.family} model (e.g. {sorted(prefixes or entries)[0]}); is it a LoRA for another "
                         "model family?")
