"""The launcher the nodes call: at most one warm group per Launcher, restarted when the plan changes or
the group died, and stopped when the process exits.

Timeouts (seconds) come from the arguments, else from the environment:
``PIPEFUSION_WATCHDOG_S`` (default 60): a rank without a heartbeat for this long is declared hung, the
group is killed and the prompt fails naming the rank; ``PIPEFUSION_STALL_S`` (default 600): no step
finished for this long while sampling, with every rank alive (a deadlock); ``PIPEFUSION_STARTUP_S``
(default 300): start-up of the group.
"""
from __future__ import annotations

import atexit
import logging
import os
import weakref
from pathlib import Path

from comfy_pipefusion import transport

from .group import GroupError, GroupPlan, JobCancelled, JobError, WorkerGroup
from .sweep import sweep

STATES = ("stopped", "starting", "loading", "ready", "busy", "failed")
log = logging.getLogger("comfy_pipefusion.launcher")


def env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={raw!r}: give a number of seconds greater than 0 (default {default:g})")
    return value


def _stop_at_exit(ref) -> None:
    launcher = ref()
    if launcher is not None:
        launcher.stop()


class Launcher:
    """Owns one worker group at a time. Starting a group stops this process's other groups (only one
    set of GPUs) and removes what dead owners left behind."""

    def __init__(self, root: Path | None = None, on_state=None, startup_timeout: float | None = None,
                 stall_timeout: float | None = None, watchdog_s: float | None = None) -> None:
        self.root = root or transport.run_root()
        self.on_state = on_state
        self.startup_timeout = startup_timeout or env_seconds("PIPEFUSION_STARTUP_S", 300.0)
        self.stall_timeout = stall_timeout or env_seconds("PIPEFUSION_STALL_S", 600.0)
        self.watchdog_s = watchdog_s or env_seconds("PIPEFUSION_WATCHDOG_S", 60.0)
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

    def _usable(self, plan: GroupPlan) -> bool:
        """The warm group can take a job of ``plan``; a group that died or hung while idle is reported
        (log and state) and stopped, so that a fresh one starts."""
        g = self.group
        if g is None or g.plan != plan:
            return False
        why = g.trouble()
        if why is None:
            return True
        log.warning("PipeFusion: the idle worker group %s; starting a fresh one.\n%s", why, g.failure_report())
        self._set("failed", f"the idle group {why}")
        g.kill()
        self.stop()
        return False

    def ensure(self, plan: GroupPlan, cancelled=None) -> WorkerGroup:
        """The warm group for ``plan``: reused when alive and of the same plan, else (re)started.
        ``cancelled()`` true during start-up stops the new group and raises JobCancelled."""
        if self._usable(plan):
            return self.group
        self.stop()
        self._set("starting", f"{plan.world_size} ranks")
        sweep(self.root, same_owner_too=True)
        try:
            self.group = WorkerGroup(plan, self.root, self.startup_timeout, cancelled, self.watchdog_s)
        except JobCancelled:
            self._set("stopped", "cancelled while starting")
            raise
        except BaseException as exc:
            self._set("failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        self._set("ready", f"{plan.world_size} ranks on {self.group.device}")
        return self.group

    def run(self, plan: GroupPlan, job: dict, tensors: dict, out_shape: tuple[int, ...], on_progress=None,
            cancelled=None):
        group = self.ensure(plan, cancelled)
        self._set("busy")
        try:
            result = group.run(job, tensors, out_shape, on_progress, cancelled, self.stall_timeout,
                               on_phase=lambda phase: self._set("loading" if phase == "loading" else "busy"))
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
