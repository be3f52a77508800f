"""Test-only nodes for the parity tests against the stock KSampler (tests/test_parity_comfy.py).

PipeFusionTestLatent makes a seeded random LATENT: an image-to-image input without a VAE. ComfyUI treats
an all-zero latent as "empty" (text to image) and any other as an image to noise, so this one is never zero.
With ``frames`` 1 it is a video VAE's one-frame latent [B, C, 1, h, w], as the Wan VAE encodes an image for
Qwen-Image-Edit's reference latents.
"""
import torch


class PipeFusionTestLatent:
    CATEGORY = "PipeFusion/testing"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 128, "min": 16, "max": 8192, "step": 16}),
            "height": ("INT", {"default": 128, "min": 16, "max": 8192, "step": 16}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            "channels": ("INT", {"default": 16, "min": 1, "max": 128}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0}),
        }, "optional": {
            "frames": ("INT", {"default": 0, "min": 0, "max": 1}),
        }}

    def make(self, width, height, batch_size, channels, seed, scale, frames=0):
        g = torch.Generator().manual_seed(seed)
        samples = torch.randn(batch_size, channels, height // 8, width // 8, generator=g) * scale
        return ({"samples": samples.unsqueeze(2) if frames else samples},)


NODE_CLASS_MAPPINGS = {"PipeFusionTestLatent": PipeFusionTestLatent}
