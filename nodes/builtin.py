"""Nodes for the built-in trained model (comfy_pipefusion/builtin): its caption encoder and its decode.

The model needs no CLIP, T5 or VAE: "PipeFusion Built-in Caption" turns a five-word caption into the
model's CONDITIONING (with the text table stored in the checkpoint) and gives the empty LATENT of its native
size; "PipeFusion Built-in Decode" unfolds the LATENT's pixels into an IMAGE.
"""
from __future__ import annotations

import torch

from comfy_pipefusion.builtin import latent, model as builtin, scenes, text


class PipeFusionBuiltinCaption:
    CATEGORY = "PipeFusion"
    RETURN_TYPES = ("CONDITIONING", "LATENT")
    RETURN_NAMES = ("conditioning", "latent")
    FUNCTION = "encode"
    DESCRIPTION = ("The built-in model's text encoder: a caption of five words (colour shape row column "
                   "background) -> its conditioning, and an empty latent of the model's native size.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipefusion_model": ("PIPEFUSION_MODEL",),
            "caption": ("STRING", {"default": scenes.demo_captions()[0],
                                   "tooltip": "; ".join(f"{k}: {' '.join(v)}" for k, v in scenes.ATTRIBUTES.items())}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    def encode(self, pipefusion_model, caption, batch_size):
        try:
            table, vocab = builtin.load_text(pipefusion_model.path)
            txt, pooled = text.encode(table, [caption], vocab)
        except ValueError as exc:
            raise ValueError(f"PipeFusion Built-in Caption: {exc}") from None
        size = latent.ENGINE_SIZE // 8
        empty = torch.zeros(batch_size, latent.CHANNELS, size, size)
        return ([[txt, {"pooled_output": pooled}]], {"samples": empty})


class PipeFusionBuiltinDecode:
    CATEGORY = "PipeFusion"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    DESCRIPTION = "The built-in model's decode: its LATENT (pixels folded into 12 channels) -> IMAGE."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def decode(self, samples):
        try:
            img = latent.decode(samples["samples"])  # [B, 3, H, W]
        except ValueError as exc:
            raise ValueError(f"PipeFusion Built-in Decode: {exc}") from None
        return (img.permute(0, 2, 3, 1).contiguous(),)  # IMAGE: [B, H, W, 3]
