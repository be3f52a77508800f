"""The warm worker groups of one process, one Launcher per plan.

A group belongs to the process that holds the registry, not to whoever asked for it: it lives until it
is stopped (``stop``, ``stop_all``), replaced (a new plan for the same ``slot``, e.g. the same checkpoint
loaded with other settings), idle for longer than ``idle_s`` (env ``PIPEFUSION_IDLE_S``, default off),
or the process exits. A watcher thread, started with the first group, reaps a group that died while
idle (no zombie torchrun agent, no group directory) and stops idle ones.

No ComfyUI here: the nodes layer creates the registry and wires it to ComfyUI (nodes/hooks.py).
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import psutil

from comfy_pipefusion import transport

from .client import Launcher
from .group import GroupPlan

log = logging.getLogger("comfy_pipefusion.launcher")
WARM = ("starting", "loading", "ready", "busy")


def idle_seconds() -> float | None:
    """``PIPEFUSION_IDLE_S``: seconds an idle group stays warm; unset, empty or 0: forever."""
    raw = os.environ.get("PIPEFUSION_IDLE_S", "").strip()
    if raw in ("", "0"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"PIPEFUSION_IDLE_S={raw!r}: give the seconds an idle worker group stays warm "
                         "(a number > 0), or 0 / nothing to keep it until it is freed")
    return value


def group_key(plan: GroupPlan) -> str:
    """The registry's name of a plan: its key and its devices, e.g. ``flux.safetensors|pipefusion|bf16|cuda:0,1``."""
    where = f"cuda:{','.join(map(str, plan.devices))}" if plan.devices is not None else f"cpu:{plan.world_size}"
    return f"{plan.key}|{where}" if plan.key else where


def pressure_index(device, memory_required: float, free_after: float) -> int | None:
    """The CUDA index whose idle groups must give way: ComfyUI wants ``memory_required`` bytes on
    ``device`` (a torch.device) and has only ``free_after`` once it unloaded its own models. None for
    the CPU or when it fits."""
    if getattr(device, "type", None) != "cuda" or free_after >= memory_required:
        return None
    return device.index if device.index is not None else 0


@dataclass
class _Entry:
    slot: str
    plan: GroupPlan
    launcher: Launcher


def _stop_at_exit(ref) -> None:
    registry = ref()
    if registry is not None:
        registry.close()


class GroupRegistry:
    """Launchers keyed by plan. ``on_state(state, detail, group=key)`` hears every group's state."""

    def __init__(self, root: Path | None = None, on_state=None, idle_s: float | None = None,
                 watch_every_s: float = 1.0, **launcher_kw) -> None:
        self.root = root or transport.run_root()
        self.on_state = on_state
        self.idle_s = idle_s
        self.watch_every_s = watch_every_s
        self.launcher_kw = launcher_kw
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        atexit.register(_stop_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------------------------- lookup

    def launcher(self, plan: GroupPlan, slot: str = "") -> Launcher:
        """The Launcher of ``plan``, created on first use. A new plan for a ``slot`` that already has a
        group (the same checkpoint with other settings) stops that group first: it is replaced."""
        key = group_key(plan)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                return entry.launcher
            old = [e for k, e in self._entries.items() if slot and e.slot == slot]
            for e in old:
                del self._entries[group_key(e.plan)]
            launcher = Launcher(self.root, on_state=lambda s, d, k=key: self._on_state(k, s, d), **self.launcher_kw)
            self._entries[key] = _Entry(slot, plan, launcher)
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="pipefusion-groups", daemon=True)
                self._watcher.start()
        for e in old:
            log.info("PipeFusion: group %s is replaced by %s", group_key(e.plan), key)
            e.launcher.stop()
        return launcher

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def warm(self) -> list[str]:
        """The keys of the groups that are started or starting."""
        with self._lock:
            entries = list(self._entries.items())
        return [k for k, e in entries if e.launcher.group is not None or e.launcher.state in ("starting",)]

    # ------------------------------------------------------------------------------------- stopping

    def stop(self, plan: GroupPlan) -> bool:
        """Stop the group of ``plan`` (waits for its job, if one runs); True when there was one."""
        with self._lock:
            entry = self._entries.pop(group_key(plan), None)
        if entry is None:
            return False
        entry.launcher.stop()
        return True

    def stop_all(self, why: str = "") -> list[str]:
        """Stop every group; returns their keys."""
        with self._lock:
            entries, self._entries = self._entries, {}
        stopped = [k for k, e in entries.items() if e.launcher.group is not None]
        if stopped:
            log.info("PipeFusion: stopping %d worker group(s)%s: %s", len(stopped), f" ({why})" if why else "",
                     ", ".join(stopped))
        threads = [threading.Thread(target=e.launcher.stop, name="pipefusion-stop", daemon=True)
                   for e in entries.values()]
        for t in threads:  # side by side: each waits for its ranks' exit
            t.start()
        for t in threads:
            t.join()
        return stopped

    def stop_on_devices(self, devices: set[int], why: str) -> list[str]:
        """Stop the idle groups that use any of the CUDA ``devices`` (a busy one is left alone)."""
        with self._lock:
            hits = [(k, e) for k, e in self._entries.items()
                    if e.plan.devices is not None and devices.intersection(e.plan.devices)]
        stopped = []
        for key, e in hits:
            if not e.launcher.lock.acquire(blocking=False):
                continue
            try:
                if e.launcher.group is not None:
                    log.warning("PipeFusion: stopping worker group %s: %s", key, why)
                    e.launcher.stop()
                    stopped.append(key)
            finally:
                e.launcher.lock.release()
        return stopped

    def kill_all(self) -> None:
        """End every group at once, without waiting for a job: the process is being terminated."""
        self._closed.set()
        for e in list(self._entries.values()):
            e.launcher.kill_now()
        for name in transport.shm_segments(os.getpid()):
            transport.unlink_segment(name)

    def close(self) -> None:
        """Stop every group at exit; one that runs a job is killed rather than waited for."""
        self._closed.set()
        with self._lock:
            entries, self._entries = self._entries, {}
        for e in entries.values():
            e.launcher.stop_or_kill()

    # ------------------------------------------------------------------------------------- watching

    def _watch(self) -> None:
        while not self._closed.wait(self.watch_every_s):
            with self._lock:
                entries = list(self._entries.items())
            for key, e in entries:
                if not e.launcher.lock.acquire(blocking=False):
                    continue  # a job runs: its own watch looks after the group
                try:
                    self._check(key, e.launcher)
                except Exception:
                    log.exception("PipeFusion: checking worker group %s failed", key)
                finally:
                    e.launcher.lock.release()

    def _check(self, key: str, launcher: Launcher) -> None:
        if launcher.group is None:
            return
        if launcher.drop_if_broken():
            return
        idle = time.monotonic() - launcher.last_used
        if self.idle_s is not None and idle > self.idle_s:
            log.info("PipeFusion: worker group %s was idle for %.0f s (PIPEFUSION_IDLE_S=%g): stopping it",
                     key, idle, self.idle_s)
            launcher.stop()

    def _on_state(self, key: str, state: str, detail: str) -> None:
        if state in ("ready", "stopped", "failed"):
            warm = self.warm()
            log.info("PipeFusion: group %s %s%s; warm groups: %s", key, state, f" ({detail})" if detail else "",
                     ", ".join(warm) if warm else "none")
        if self.on_state is not None:
            self.on_state(state, detail, group=key)

    # ------------------------------------------------------------------------------------- reporting

    def describe(self) -> list[dict]:
        """One dict per group that is warm or failed (GET /pipefusion/groups)."""
        with self._lock:
            entries = list(self._entries.items())
        out = []
        for key, e in entries:
            launcher, g = e.launcher, e.launcher.group
            if g is None and launcher.state not in ("starting", "failed"):
                continue
            pids = list(g.worker_pids) if g is not None else []
            out.append({"key": key, "world_size": e.plan.world_size,
                        "devices": list(e.plan.devices) if e.plan.devices is not None else "cpu",
                        "state": launcher.state, "detail": launcher.detail, "pids": pids,
                        "rss_bytes_per_rank": [_rss(p) for p in pids], "last_job": launcher.last_job})
        return out


def _rss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None
