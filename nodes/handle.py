"""PIPEFUSION_MODEL: what the loader hands to the sampler. It names a plan; the worker group of that
plan belongs to the ComfyUI process (nodes/hooks.py), so it stays warm when ComfyUI's cache drops this
value or the loader node."""
from __future__ import annotations

from dataclasses import dataclass

from comfy_pipefusion.config import ParallelConfig

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
    family: str = "flux"  # flux | sd3 | pixart (models/family.py)
    adapters: tuple = ()  # LoRAs in order: {"path", "strength", "stamp"} (nodes/lora.py)

    @property
    def launcher(self) -> Launcher:
        """The Launcher of this plan in the process's registry (created, not started, on first use)."""
        return groups().launcher(self.plan, self.slot)

    def unload(self) -> bool:
        """Stop this plan's group; True when one was there."""
        return groups().stop(self.plan)

    def job(self, sample: dict) -> dict:
        p = self.parallel
        return {"model": {"checkpoint": self.path}, "model_stamp": self.stamp, "adapters": list(self.adapters),
                "parallel": {"strategy": p.strategy, "patches": p.patches, "warmup_steps": p.warmup_steps,
                             "balance": p.balance,
                             "stage_split": list(p.stage_split) if p.stage_split else None},
                "sample": {**sample, "dtype": self.dtype}}
