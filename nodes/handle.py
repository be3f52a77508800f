"""PIPEFUSION_MODEL: what the loader hands to the sampler. It owns a Launcher, so the worker group stays
warm for as long as ComfyUI keeps this loader output."""
from __future__ import annotations

from dataclasses import dataclass

from comfy_pipefusion.config import ParallelConfig

from ..launcher import GroupPlan, Launcher


@dataclass(eq=False)
class PipeFusionModel:
    path: str  # the checkpoint file
    model_config: dict  # detected diffusers configuration of the family's transformer
    parallel: ParallelConfig
    plan: GroupPlan
    dtype: str
    launcher: Launcher
    stamp: str = ""  # the checkpoint file's size, time and inode when the loader ran
    family: str = "flux"  # flux | sd3 | pixart (models/family.py)

    def job(self, sample: dict) -> dict:
        p = self.parallel
        return {"model": {"checkpoint": self.path}, "model_stamp": self.stamp,
                "parallel": {"strategy": p.strategy, "patches": p.patches, "warmup_steps": p.warmup_steps,
                             "balance": p.balance,
                             "stage_split": list(p.stage_split) if p.stage_split else None},
                "sample": {**sample, "dtype": self.dtype}}
