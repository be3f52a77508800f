"""A test-only loader for a Flux.2 file narrower than the real model (tests/test_flux2_comfy.py).

ComfyUI's detection fixes Flux.2 at 48 heads of 128 (its RoPE axes sum to 128), so a file must be 6144 wide
(2.28 B parameters with one block of each kind) for the stock UNETLoader to take it. PipeFusionTestNarrowFlux2
is ComfyUI's own ``load_diffusion_model`` with one change: a Flux.2 file's heads are its width over the head
dimension, so that a 256-wide file loads as ComfyUI's Flux.2 model of 2 heads. Every other part (the model
class, the scaled-fp8 operations, the ModelPatcher, sampling) is ComfyUI's.
"""
import comfy.model_detection
import comfy.sd
import folder_paths


class PipeFusionTestNarrowFlux2:
    CATEGORY = "PipeFusion/testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    def run(self, unet_name):
        detect = comfy.model_detection.detect_unet_config

        def heads_from_width(state_dict, key_prefix, metadata=None):
            config = detect(state_dict, key_prefix, metadata=metadata)
            if config and config.get("image_model") == "flux2":
                config["num_heads"] = config["hidden_size"] // sum(config["axes_dim"])
            return config

        comfy.model_detection.detect_unet_config = heads_from_width
        try:
            path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
            return (comfy.sd.load_diffusion_model(path),)
        finally:
            comfy.model_detection.detect_unet_config = detect


NODE_CLASS_MAPPINGS = {"PipeFusionTestNarrowFlux2": PipeFusionTestNarrowFlux2}
