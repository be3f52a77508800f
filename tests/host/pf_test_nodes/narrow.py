"""A test-only loader for files narrower than the real model of a family whose width ComfyUI fixes.

ComfyUI's detection fixes Flux.2 at 48 heads of 128 (its RoPE axes sum to 128), so a Flux.2 file must be 6144
wide (2.28 B parameters with one block of each kind) for the stock UNETLoader to take it; it takes Z-Image only
at width 3840 (30 heads of 128; 0.9 B parameters with its four refiners). PipeFusionTestNarrowUNETLoader is
ComfyUI's own ``load_diffusion_model`` with one change: such a file's heads are its width over 128, and a
Lumina 2 file with Z-Image's caption padding gets Z-Image's settings at any width. Every other part (the model
classes, the scaled-fp8 operations, the ModelPatcher, sampling) is ComfyUI's.
"""
import comfy.model_detection
import comfy.sd
import folder_paths

HEAD_DIM = 128
Z_IMAGE = dict(axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
               z_image_modulation=True, time_scale=1000.0)  # ComfyUI's settings of the 3840-wide Z-Image


class PipeFusionTestNarrowUNETLoader:
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
                config["num_heads"] = config["hidden_size"] // HEAD_DIM
            elif (config and config.get("image_model") == "lumina2" and "n_heads" not in config
                  and f"{key_prefix}cap_pad_token" in state_dict):
                config.update(Z_IMAGE, n_heads=config["dim"] // HEAD_DIM, n_kv_heads=config["dim"] // HEAD_DIM,
                              pad_tokens_multiple=32)
            return config

        comfy.model_detection.detect_unet_config = heads_from_width
        try:
            path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
            return (comfy.sd.load_diffusion_model(path),)
        finally:
            comfy.model_detection.detect_unet_config = detect


NODE_CLASS_MAPPINGS = {"PipeFusionTestNarrowUNETLoader": PipeFusionTestNarrowUNETLoader}
