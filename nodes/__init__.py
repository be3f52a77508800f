"""ComfyUI nodes (thin: validate, translate ComfyUI types, call the launcher client).

Always import this package relatively: ComfyUI has a top-level module named ``nodes``.
"""
from .builtin import PipeFusionBuiltinCaption, PipeFusionBuiltinDecode
from .loader import PipeFusionDiTLoader, PipeFusionUnload
from .lora import PipeFusionLoRA
from .sampler import PipeFusionKSampler

NODE_CLASS_MAPPINGS = {
    "PipeFusionDiTLoader": PipeFusionDiTLoader,
    "PipeFusionKSampler": PipeFusionKSampler,
    "PipeFusionLoRA": PipeFusionLoRA,
    "PipeFusionUnload": PipeFusionUnload,
    "PipeFusionBuiltinCaption": PipeFusionBuiltinCaption,
    "PipeFusionBuiltinDecode": PipeFusionBuiltinDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PipeFusionDiTLoader": "PipeFusion DiT Loader",
    "PipeFusionKSampler": "PipeFusion KSampler",
    "PipeFusionLoRA": "PipeFusion LoRA",
    "PipeFusionUnload": "PipeFusion Unload",
    "PipeFusionBuiltinCaption": "PipeFusion Built-in Caption",
    "PipeFusionBuiltinDecode": "PipeFusion Built-in Decode",
}
