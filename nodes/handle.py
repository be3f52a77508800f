"""PIPEFUSION_MODEL: what the loader hands to the sampler. It names a plan; the worker group of that
plan belongs to the ComfyUI process (nodes/hooks.py), so it stays warm when ComfyUI's cache drops this
value or the loader node."""
from __future__ import annotations

from dataclasses import dataclass

from comfy_pipefusion.adapters import LoraSpec
from comfy_pipefusion.config import ParallelConfig, SampleSpec
from comfy_pipefusion.jobspec import Job
from comfy_pipefusion.parallel.plan import ModelSource

from ..launcher import GroupPlan, Launcher
from .hooks import groups


@dataclass(eq=False)
class PipeFusionModel:
    path: str  # the checkpoint file
    model_config: dict  # detected diffusers configuration of the family's transformer
    parallel: ParallelConfig
    plan: GroupPlan
    dtype: str
    slot: str = ""  # a new plan of the same slot (checkpoint) replaces its group
    stamp: str = ""  # the checkpoint file's size, time and inode when the loader ran
    family: str = "flux"  # a name of models/family.py's FAMILIES
    adapters: tuple[LoraSpec, ...] = ()  # LoRAs in order (nodes/lora.py), applied by each rank to its stage

    @property
    def launcher(self) -> Launcher:
        """The Launcher of this plan in the process's registry (created, not started, on first use)."""
        return groups().launcher(self.plan, self.slot)

    def unload(self) -> bool:
        """Stop this plan's group; True when one was there."""
        return groups().stop(self.plan)

    def job(self, sample: dict, reference_method: str | None = None) -> Job:
        """The Job of one sampling request (``sample``: SampleSpec's fields but the dtype) on this plan;
        ``reference_method``: the conditioning's placement of reference latents (Kontext), if it sets one."""
        return Job(model=ModelSource(checkpoint=self.path), parallel=self.parallel,
                   sample=SampleSpec(**sample, dtype=self.dtype), model_stamp=self.stamp,
                   adapters=self.adapters, reference_method=reference_method)
