"""Test-only nodes for the MODEL path (tests/test_parallelize_comfy.py): whether ComfyUI itself loaded a MODEL.

PipeFusionTestUnloadModels passes a MODEL through after ComfyUI has unloaded every model it loaded
(``unload_all_models``). PipeFusionTestLoadedModels, run after a sampler (its LATENT input orders it), writes
``output/<name>.json`` saying whether ComfyUI's model management holds the MODEL's weights: every load it
makes for sampling (``load_models_gpu``, on a GPU or the CPU) appears in ``current_loaded_models``.
"""
import json
import os

import comfy.model_management
import folder_paths


class PipeFusionTestUnloadModels:
    CATEGORY = "PipeFusion/testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # every prompt

    def run(self, model):
        comfy.model_management.unload_all_models()
        return (model,)


class PipeFusionTestLoadedModels:
    CATEGORY = "PipeFusion/testing"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "samples": ("LATENT",), "name": ("STRING", {"default": "loads"})}}

    def run(self, model, samples, name):
        held = [m for m in comfy.model_management.current_loaded_models
                if m.model is not None and m.model.model is model.model]
        report = {"loaded": bool(held), "loaded_models": len(comfy.model_management.current_loaded_models)}
        with open(os.path.join(folder_paths.get_output_directory(), f"{name}.json"), "w") as fh:
            json.dump(report, fh)
        return ()


NODE_CLASS_MAPPINGS = {"PipeFusionTestUnloadModels": PipeFusionTestUnloadModels,
                       "PipeFusionTestLoadedModels": PipeFusionTestLoadedModels}
