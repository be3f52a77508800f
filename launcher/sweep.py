"""Finding and removing what a dead owner left: worker groups and shared memory segments.

Each group directory in the private run root has an ``owner`` file (pid and start time of the ComfyUI
process that started it) and a ``pids`` file (torchrun and worker pids). A group whose owner is gone is
killed and removed (in this user's fallback run directories beside the root too); our segments (our uid,
our pid namespace) named after a dead owner pid are unlinked.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import psutil

from comfy_pipefusion import transport
from comfy_pipefusion.oneshot import kill_now

log = logging.getLogger("comfy_pipefusion.launcher")


def process_identity(pid: int | None = None) -> dict:
    p = psutil.Process(pid or os.getpid())
    return {"pid": p.pid, "create_time": p.create_time()}


def is_alive(ident: dict) -> bool:
    """The process ``ident`` names still runs (a reused pid with another start time does not count)."""
    try:
        p = psutil.Process(int(ident["pid"]))
        return abs(p.create_time() - float(ident["create_time"])) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, ValueError, TypeError):
        return False


def read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def kill_tree(idents: list[dict], grace_s: float = 5.0) -> None:
    """Terminate the processes ``idents`` name (only if they are still those processes) and children:
    SIGTERM (and SIGCONT, so that a stopped process can act on it), SIGKILL after ``grace_s``; with
    ``grace_s`` 0, SIGKILL at once."""
    procs = []
    for ident in idents:
        if not is_alive(ident):
            continue
        try:
            p = psutil.Process(int(ident["pid"]))
            procs += [p] + p.children(recursive=True)
        except psutil.Error:
            continue
    alive = procs
    if grace_s > 0:
        for p in procs:
            for sig in (signal.SIGTERM, signal.SIGCONT):
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
    kill_now(alive)


def remove_group(gdir: Path, grace_s: float = 5.0) -> None:
    kill_tree(read_json(gdir / "pids", []), grace_s)
    shutil.rmtree(gdir, ignore_errors=True)


def sweep(root: Path, keep: set[Path] = frozenset(), same_owner_too: bool = False) -> list[Path]:
    """Remove groups whose owner died (and, with ``same_owner_too``, this process's other groups), and
    segments whose owner died. Returns the group directories removed."""
    me = process_identity()
    removed = []
    roots = [root] + [r for r in transport.fallback_roots(root.parent) if r != root]
    for gdir in sorted(g for r in roots for g in r.glob("group-*")):
        if gdir in keep:
            continue
        owner = read_json(gdir / "owner")
        mine = owner is not None and owner.get("pid") == me["pid"] and is_alive(owner)
        try:
            too_young = owner is None and time.time() - gdir.stat().st_mtime < 30  # still being set up
        except OSError:  # removed meanwhile
            continue
        if (mine and not same_owner_too) or too_young or (owner is not None and not mine and is_alive(owner)):
            continue
        remove_group(gdir, grace_s=0 if owner is None or not is_alive(owner) else 5.0)  # orphans: no grace
        removed.append(gdir)
    for name in transport.shm_segments():  # ours only: our uid and pid namespace
        if psutil.pid_exists(transport.segment_owner(name)):
            continue
        try:
            transport.unlink_segment(name)
        except OSError as exc:  # one segment must never stop a start
            log.warning("could not remove the dead owner's segment /dev/shm/%s: %s", name, exc)
    return removed
