"""PipeFusion Parallelize (MODEL -> MODEL): the stock sampling nodes run the MODEL on the worker group.

The output is a clone of the MODEL with an OUTER_SAMPLE wrapper (comfy.patcher_extension). ComfyUI's guider
calls it with its own sigmas, noise, latent and denoise mask; the wrapper takes the guider's conditionings
and cfg, the sampler's name, and the MODEL's weights with its weight patches (nodes/weights.py), and runs
one job on the group (nodes/parallel_sample.py). It never calls the wrapped executor, so ComfyUI's
prepare_sampling never runs and this process never loads the model onto a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .loader import PipeFusionDiTLoader
from .model_checks import WRAPPER_KEY
from .validate import check_plan

SETTINGS = ("devices", "strategy", "patches", "warmup_steps")
OPTIONAL = ("weight_dtype", "balance", "stage_split", "ulysses_degree")


@dataclass(frozen=True)
class Settings:
    """The Parallelize node's widgets: the loader's plan settings."""

    devices: str = "auto"
    strategy: str = "pipefusion"
    patches: int = 0
    warmup_steps: int = 1
    weight_dtype: str = "default"
    balance: str = "compute"
    stage_split: str = ""
    ulysses_degree: int = 0


@dataclass(frozen=True)
class OuterSample:
    """The OUTER_SAMPLE wrapper: (executor, noise, latent_image, sampler, sigmas, denoise_mask, callback,
    disable_pbar, seed, ...) -> the sampled latent, from the worker group."""

    settings: Settings

    def __call__(self, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                 disable_pbar=False, seed=None, latent_shapes=None, **_):
        from .parallel_sample import sample_on_group

        if latent_shapes is not None and len(latent_shapes) > 1:
            raise ValueError("PipeFusion Parallelize: nested latents (several latent shapes in one batch) are not "
                             "supported; sample each latent on its own")
        return sample_on_group(self.settings, executor.class_obj, noise, latent_image, sampler, sigmas,
                               denoise_mask, seed, callback)


class PipeFusionParallelize:
    CATEGORY = "PipeFusion"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "parallelize"
    DESCRIPTION = ("Runs this MODEL (with its LoRAs) on a group of GPUs (or CPU ranks) with PipeFusion: connect the "
                   "output to the stock KSampler, KSamplerAdvanced or SamplerCustom(Advanced).")

    @classmethod
    def INPUT_TYPES(cls):
        loader = PipeFusionDiTLoader.INPUT_TYPES()
        required = {"model": ("MODEL",), **{k: loader["required"][k] for k in SETTINGS}}
        optional = {"weight_dtype": loader["required"]["weight_dtype"], **loader["optional"]}
        return {"required": required, "optional": optional}

    @classmethod
    def VALIDATE_INPUTS(cls, devices, strategy, ulysses_degree=0):
        return check_plan(devices, strategy, torch.cuda.device_count() if torch.cuda.is_available() else 0,
                          ulysses=ulysses_degree)

    def parallelize(self, model, devices, strategy, patches, warmup_steps, weight_dtype="default",
                    balance="compute", stage_split="", ulysses_degree=0):
        from .parallel_sample import plan_for

        settings = Settings(devices, strategy, patches, warmup_steps, weight_dtype, balance, stage_split,
                            ulysses_degree)
        try:
            plan_for(settings, 1)  # the settings parse and fit ParallelConfig (the model's depth is checked later)
        except ValueError as exc:
            raise ValueError(f"PipeFusion Parallelize: {exc}") from None
        import comfy.patcher_extension

        out = model.clone()
        out.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
        out.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, OuterSample(settings))
        return (out,)
