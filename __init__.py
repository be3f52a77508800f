"""ComfyUI entry point of comfy-pipefusion.

ComfyUI imports this file from custom_nodes/. Node mappings are exported only when ComfyUI itself is
importable; in plain Python (tests, the benchmark, the workers) importing this package does nothing heavy.
What is done on import under ComfyUI: this folder joins sys.path so that the core package
``comfy_pipefusion`` (and the workers started from here) can be imported by that name, and the
``/pipefusion/groups`` route is added to ComfyUI's server (nodes/hooks.py).
"""
import importlib.util
import os
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = "./web"

if __package__ and importlib.util.find_spec("folder_paths") is not None:
    if __name__.split(".")[-1] == "comfy_pipefusion":
        raise ImportError("comfy-pipefusion: the folder custom_nodes/comfy_pipefusion hides the core package of "
                          "the same name; rename the folder to custom_nodes/comfy-pipefusion")
    _here = os.path.dirname(os.path.abspath(__file__))
    if _here not in sys.path:
        sys.path.insert(0, _here)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401,F811
    from .nodes.hooks import add_routes

    add_routes()  # GET /pipefusion/groups: routes must be added before ComfyUI starts serving

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
