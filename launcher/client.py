"""The launcher the nodes call: at most one warm group per Launcher, restarted when the plan changes or
the group died, and stopped when the process exits."""
from __future__ import annotations

import atexit
import weakref
from pathlib import Path

from comfy_pipefusion import transport

from .group import GroupError, GroupPlan, JobCancelled, JobError, WorkerGroup
from .sweep import sweep

STATES = ("stopped", "starting", "ready", "busy", "failed")


def _stop_at_exit(ref) -> None:
    launcher = ref()
    if launcher is not None:
        launcher.stop()


class Launcher:
    """Owns one worker group at a time. Starting a group stops this process's other groups (only one
    set of GPUs) and removes what dead owners left behind."""

    def __init__(self, root: Path | None = None, on_state=None, startup_timeout: float = 300.0,
                 stall_timeout: float = 600.0) -> None:
        self.root = root or transport.run_root()
        self.on_state, self.startup_timeout, self.stall_timeout = on_state, startup_timeout, stall_timeout
        self.group: WorkerGroup | None = None
        self.state, self.detail = "stopped", ""
        atexit.register(_stop_at_exit, weakref.ref(self))

    def _set(self, state: str, detail: str = "") -> None:
        self.state, self.detail = state, detail
        if self.on_state is not None:
            try:
                self.on_state(state, detail)
            except Exception:
                pass

    def ensure(self, plan: GroupPlan) -> WorkerGroup:
        """The warm group for ``plan``: reused when alive and of the same plan, else (re)started."""
        if self.group is not None and self.group.plan == plan and self.group.alive():
            return self.group
        self.stop()
        self._set("starting", f"{plan.world_size} ranks")
        sweep(self.root, same_owner_too=True)
        try:
            self.group = WorkerGroup(plan, self.root, self.startup_timeout)
        except BaseException as exc:
            self._set("failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        self._set("ready", f"{plan.world_size} ranks on {self.group.device}")
        return self.group

    def run(self, plan: GroupPlan, job: dict, tensors: dict, out_shape: tuple[int, ...], on_progress=None,
            cancelled=None):
        group = self.ensure(plan)
        self._set("busy")
        try:
            result = group.run(job, tensors, out_shape, on_progress, cancelled, self.stall_timeout)
        except (JobCancelled, JobError):
            self._set("ready")
            raise
        except BaseException as exc:
            if group.alive() and not group.busy and not isinstance(exc, GroupError):  # the job ended cleanly
                self._set("ready")
                raise
            group.stop()
            self.group = None
            self._set("failed", str(exc).splitlines()[0] if isinstance(exc, GroupError) else type(exc).__name__)
            raise
        self._set("ready")
        return result

    def stop(self) -> None:
        if self.group is not None:
            self.group.stop()
            self.group = None
            self._set("stopped")
