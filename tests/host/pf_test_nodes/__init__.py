"""Test-only ComfyUI nodes (linked into the test server's custom_nodes, never shipped).

PipeFusionTestConditioning makes a Flux-style CONDITIONING of any width from a seed, because no text
encoder weights exist on the test machines. The tensors are the same as
``comfy_pipefusion.job.synthetic_conditioning`` gives, so tests can rebuild them.
"""
import torch


class PipeFusionTestConditioning:
    CATEGORY = "PipeFusion/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "tokens": ("INT", {"default": 8, "min": 1, "max": 4096}),
            "width": ("INT", {"default": 32, "min": 1, "max": 16384}),  # Flux.2's Mistral states: 15360
            "pooled_width": ("INT", {"default": 32, "min": 1, "max": 8192}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0}),
        }}

    def make(self, tokens, width, pooled_width, seed, guidance):
        g = torch.Generator().manual_seed(seed + 7919)
        txt = torch.randn(1, tokens, width, generator=g)
        pooled = torch.randn(1, pooled_width, generator=g)
        return ([[txt, {"pooled_output": pooled, "guidance": guidance}]],)


NODE_CLASS_MAPPINGS = {"PipeFusionTestConditioning": PipeFusionTestConditioning}
from .parity import NODE_CLASS_MAPPINGS as _PARITY_NODES  # noqa: E402
NODE_CLASS_MAPPINGS.update(_PARITY_NODES)
from .loads import NODE_CLASS_MAPPINGS as _LOAD_NODES  # noqa: E402
NODE_CLASS_MAPPINGS.update(_LOAD_NODES)
from .narrow import NODE_CLASS_MAPPINGS as _NARROW_NODES  # noqa: E402
NODE_CLASS_MAPPINGS.update(_NARROW_NODES)
