"""comfy-pipefusion's core: parallel sampling of one Diffusion Transformer image over several ranks.

Importing this package does nothing but define names; nothing here imports ComfyUI.
"""
__version__ = "0.1.0"
