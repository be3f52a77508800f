"""PipeFusion DiT Loader: checks the checkpoint and the plan; the group starts with the first job."""
from __future__ import annotations

import os

import folder_paths
import torch

from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.models import family as families
from comfy_pipefusion.models.checkpoint import open_checkpoint

from ..launcher import GroupPlan
from . import admission
from .convert import DTYPE_CHOICES, check_patches, parse_devices, parse_stage_split, place_auto
from .handle import PipeFusionModel
from .validate import STRATEGIES, ULYSSES_MAX, check_plan


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
            "strategy": (list(STRATEGIES), {"default": "auto", "tooltip": "auto = the fastest plan that fits in "
                                                                         "memory, picked per job from measured "
                                                                         "costs (never fewer warm-up steps); "
                                                                         "cfg: the positive and negative prompt "
                                                                         "on two halves of the devices (cfg != 1); "
                                                                         "ulysses: exact sequence parallelism "
                                                                         "over heads; cfg+X: each half runs X; "
                                                                         "ulysses+X: X with each stage (band) "
                                                                         "on 2 devices sharing its heads"}),
            "patches": ("INT", {"default": 0, "min": 0, "max": 256,
                                "tooltip": "PipeFusion's patches per image; 0 = one per GPU"}),
            "warmup_steps": ("INT", {"default": 1, "min": 1, "max": 1000,
                                     "tooltip": "synchronous full-image steps before stale activations are used"}),
        }, "optional": {
            "balance": (["compute", "memory"], {"tooltip": "PipeFusion's automatic stage split: compute = "
                                                           "equal work per GPU (fastest), memory = equal weight "
                                                           "bytes per GPU (for models that only fit so)"}),
            "stage_split": ("STRING", {"default": "", "tooltip": "PipeFusion: blocks per stage, e.g. 10,9 "
                                                                 "(empty = automatic, by balance)"}),
            "ulysses_degree": ("INT", {"default": 0, "min": 0, "max": ULYSSES_MAX,
                                       "tooltip": "strategies with ulysses: devices sharing each attention by "
                                                  "heads; 0 = automatic (every device of a CFG half for ulysses "
                                                  "alone, 2 per stage inside pipefusion/distrifusion). It must "
                                                  "divide the devices (of a CFG half), leave at least 2 stages "
                                                  "inside a patch method, and be at most the model's heads "
                                                  "(heads it does not divide are split unevenly)"}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, devices, strategy, patches, stage_split="", ulysses_degree=0):
        """At queue time: devices that parse and exist, enough of them for the strategy, patches only with
        pipefusion, a stage split with one entry per stage, a Ulysses degree the plan can take."""
        return check_plan(devices, strategy, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                          patches, stage_split, ulysses_degree)

    @classmethod
    def IS_CHANGED(cls, unet_name, **_):
        """The checkpoint file's size and time: a file replaced or truncated on disk runs the loader (and
        its checks) again, and its jobs make the workers read the file again."""
        return file_stamp(folder_paths.get_full_path("diffusion_models", unet_name))

    def load(self, unet_name, weight_dtype, devices, strategy, patches, warmup_steps, balance="compute",
             stage_split="", ulysses_degree=0):
        try:
            return self._load(unet_name, weight_dtype, devices, strategy, patches, warmup_steps, balance,
                              stage_split, ulysses_degree)
        except ValueError as exc:
            raise ValueError(f"PipeFusion DiT Loader: {exc}") from None

    def _load(self, unet_name, weight_dtype, devices, strategy, patches, warmup_steps, balance, stage_split,
              ulysses_degree=0):
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        stamp = file_stamp(path)
        info = open_checkpoint(path)  # header only: family, configuration, layout; refuses what we cannot run
        config = info.config
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devs, ranks = parse_devices(devices, gpus)
        check_patches(patches, strategy)
        if strategy == "serial" and ranks != 1:
            devs, ranks = (devs[:1] if devs else None), 1
        parallel = ParallelConfig(strategy=strategy, world_size=ranks, patches=patches, warmup_steps=warmup_steps,
                                  balance=balance, stage_split=parse_stage_split(stage_split, strategy),
                                  ulysses=ulysses_degree)
        parallel.check_model(families.num_blocks(config), families.config_attention(config)[0])
        admission.check_ranks(parallel, devs)
        dtype = weight_dtype if weight_dtype != "default" else ("bfloat16" if devs else "float32")
        if devs and len(devs) > 1 and devices.strip().lower() == "auto":  # the heaviest stage off ComfyUI's GPU
            devs = place_auto(devs, comfy_device(), admission.weights_per_rank(info.family, config, parallel, dtype))
        # Only what changes the weights each rank holds needs a new group; patches and warm-up steps are
        # settings of each job, so changing them keeps the warm group. The group belongs to the ComfyUI
        # process (nodes/hooks.py); another plan for the same checkpoint replaces it.
        split = f"|split {','.join(map(str, parallel.stage_split))}" if parallel.stage_split else ""
        plan = GroupPlan(world_size=ranks, devices=devs,
                         key=f"{unet_name}|{strategy}|{dtype}" + ("" if balance == "compute" else f"|{balance}") + split
                         + (f"|u{ulysses_degree}" if ulysses_degree else ""))
        model = PipeFusionModel(path, config, parallel, plan, dtype, slot=path, stamp=stamp, family=info.family)
        admission.check(model, admission.smallest_job(model), "its weights and processes alone")
        return (model,)


def comfy_device() -> int | None:
    """ComfyUI's own GPU (its index among the visible ones), None on CPU."""
    import comfy.model_management

    dev = comfy.model_management.get_torch_device()
    return (dev.index or 0) if getattr(dev, "type", "") == "cuda" else None


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
