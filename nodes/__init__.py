"""ComfyUI nodes (thin: validate, translate ComfyUI types, call the launcher client).

Always import this package relatively: ComfyUI has a top-level module named ``nodes``.
The PipeFusion loader, sampler and unload nodes are registered here as they are built.
"""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
