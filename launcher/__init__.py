"""Starts, watches and stops the torchrun worker group for the ComfyUI process; the client the nodes call.

Imports the core's transport only, never ComfyUI.
"""
from .client import Launcher
from .group import GroupError, GroupPlan, JobCancelled, JobError

__all__ = ["Launcher", "GroupPlan", "GroupError", "JobError", "JobCancelled"]
