"""PipeFusion DiT Loader: checks the checkpoint and the plan; the group starts with the first job."""
from __future__ import annotations

import os

import folder_paths
import torch

from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.models.checkpoint import open_checkpoint

from ..launcher import GroupPlan
from .convert import DTYPE_CHOICES, parse_devices
from .handle import PipeFusionModel
from .validate import check_plan


def file_stamp(path: str | None) -> str:
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


class PipeFusionDiTLoader:
    CATEGORY = "PipeFusion"
    RETURN_TYPES = ("PIPEFUSION_MODEL",)
    RETURN_NAMES = ("pipefusion_model",)
    FUNCTION = "load"
    DESCRIPTION = "Loads a Diffusion Transformer onto a group of GPUs (or CPU ranks) for the PipeFusion KSampler."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"),),
            "weight_dtype": (list(DTYPE_CHOICES),),
            "devices": ("STRING", {"default": "auto", "tooltip": "GPU indices like 0,1; cpu:N for N CPU ranks; "
                                                                  "auto = every GPU (cpu:2 without GPUs)"}),
            "strategy": (["pipefusion", "distrifusion", "serial"],),
            "patches": ("INT", {"default": 0, "min": 0, "max": 256,
                                "tooltip": "PipeFusion's patches per image; 0 = one per GPU"}),
            "warmup_steps": ("INT", {"default": 1, "min": 1, "max": 1000,
                                     "tooltip": "synchronous full-image steps before stale activations are used"}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, devices, strategy):
        """At queue time: devices that parse and exist, and enough of them for the strategy."""
        return check_plan(devices, strategy, torch.cuda.device_count() if torch.cuda.is_available() else 0)

    @classmethod
    def IS_CHANGED(cls, unet_name, **_):
        """The checkpoint file's size and time: a file replaced or truncated on disk runs the loader (and
        its checks) again, and its jobs make the workers read the file again."""
        return file_stamp(folder_paths.get_full_path("diffusion_models", unet_name))

    def load(self, unet_name, weight_dtype, devices, strategy, patches, warmup_steps):
        try:
            return self._load(unet_name, weight_dtype, devices, strategy, patches, warmup_steps)
        except ValueError as exc:
            raise ValueError(f"PipeFusion DiT Loader: {exc}") from None

    def _load(self, unet_name, weight_dtype, devices, strategy, patches, warmup_steps):
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        stamp = file_stamp(path)
        info = open_checkpoint(path)  # header only: family, configuration, layout; refuses what we cannot run
        config = info.config
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devs, ranks = parse_devices(devices, gpus)
        if strategy == "serial" and ranks != 1:
            devs, ranks = (devs[:1] if devs else None), 1
        parallel = ParallelConfig(strategy=strategy, world_size=ranks, patches=patches, warmup_steps=warmup_steps)
        parallel.check_model(config.get("num_layers", 0) + config.get("num_single_layers", 0))
        dtype = weight_dtype if weight_dtype != "default" else ("bfloat16" if devs else "float32")
        # Only what changes the weights each rank holds needs a new group; patches and warm-up steps are
        # settings of each job, so changing them keeps the warm group. The group belongs to the ComfyUI
        # process (nodes/hooks.py); another plan for the same checkpoint replaces it.
        plan = GroupPlan(world_size=ranks, devices=devs, key=f"{unet_name}|{strategy}|{dtype}")
        return (PipeFusionModel(path, config, parallel, plan, dtype, slot=path, stamp=stamp, family=info.family),)


class PipeFusionUnload:
    CATEGORY = "PipeFusion"
    RETURN_TYPES = ()
    FUNCTION = "unload"
    OUTPUT_NODE = True
    DESCRIPTION = "Stops the worker group of a PipeFusion model and frees its memory."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pipefusion_model": ("PIPEFUSION_MODEL",)}}

    def unload(self, pipefusion_model):
        pipefusion_model.unload()
        return ()
