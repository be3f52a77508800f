"""Starts, watches and stops the torchrun worker groups of the ComfyUI process; the client the nodes call.

Imports the core's transport only, never ComfyUI.
"""
from .client import Launcher
from .group import GroupError, GroupPlan, JobCancelled
from .jobrun import JobError
from .registry import GroupRegistry, group_key, idle_seconds, pressure_index

__all__ = ["Launcher", "GroupPlan", "GroupError", "JobError", "JobCancelled", "GroupRegistry", "group_key",
           "idle_seconds", "pressure_index"]
