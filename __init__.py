"""ComfyUI entry point of comfy-pipefusion.

ComfyUI imports this file from custom_nodes/. Node mappings are exported only when ComfyUI itself is
importable; in plain Python (tests, the benchmark, the workers) importing this package does nothing heavy.
"""
import importlib.util

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy") is not None and __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401,F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
