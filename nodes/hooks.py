"""Where the warm worker groups live in ComfyUI, and what frees them.

The groups belong to the ComfyUI process, not to a node object or a cache entry (ComfyUI's caches drop
those whenever a prompt does not use them). Their ``GroupRegistry`` is created on first use and kept as
an attribute of ``PromptServer.instance``: the one object ComfyUI creates once and keeps for the life of
the process, reachable from every node and route, without module-level state of ours (a reloaded or
re-imported node module finds the same registry).

Freed, besides by our Unload node, when ComfyUI frees memory: ``comfy.model_management.unload_all_models``
(``POST /free`` with ``unload_models`` or ``free_memory``, an out-of-memory error, ``--disable-smart-memory``
after each prompt) stops every group, and ``free_memory(required, cuda:i)`` still short after ComfyUI
unloaded its own models (one of its models loads on a GPU a group uses) stops the idle groups on that GPU,
like ComfyUI's own models give way. Both are wrapped at run time, looked up by name as main.py and
model_management do (0.3.52 to 0.3.75), never by editing ComfyUI's files; the /free flags are also
observed where the server sets them (``hook_free_flags``). On SIGTERM/SIGHUP the groups
are killed, their directories and our segments removed, their "stopped" sent to the pages (at most 1.5 s),
then ComfyUI's own handling of the signal runs.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
import threading

from ..launcher import GroupRegistry, idle_seconds, pressure_index
from .status import report_state

ATTR = "pipefusion_groups"
log = logging.getLogger("comfy_pipefusion.nodes")


def _host():
    from server import PromptServer

    return getattr(PromptServer, "instance", None)


def groups() -> GroupRegistry:
    """The ComfyUI process's group registry, created (and hooked into ComfyUI) on first use."""
    host = _host()
    if host is None:
        raise RuntimeError("PipeFusion: no ComfyUI server (PromptServer.instance) to keep the worker groups")
    reg = vars(host).get(ATTR)
    if reg is None:
        reg = vars(host).setdefault(ATTR, GroupRegistry(on_state=report_state, idle_s=idle_seconds()))
        loop = getattr(host, "loop", None)
        if loop is not None:  # signal handlers can only be set on the main thread, which runs the loop
            loop.call_soon_threadsafe(hook_exit_signals, reg)
    hook_memory(reg)  # at every use: a release that restores patched functions (hook_breaker) undoes it
    hook_free_flags(reg, getattr(host, "prompt_queue", None))
    return reg


def hook_free_flags(reg: GroupRegistry, queue) -> None:
    """``POST /free`` sets a flag that ComfyUI's prompt worker reads when it next wakes up; one set while
    the worker finishes a prompt waits for the next prompt (its wake-up was missed). So the flag itself
    is observed too: the idle groups stop at once (in a thread of their own: never in the server's loop);
    a busy one stops when the worker calls unload_all_models after the prompt."""
    if queue is None or getattr(queue.set_flag, "_pipefusion", False):
        return
    original = queue.set_flag

    def set_flag(name, data, *args, **kwargs):
        out = original(name, data, *args, **kwargs)
        if name in ("unload_models", "free_memory") and data:
            threading.Thread(target=reg.stop_idle, args=(f"POST /free {name}",), name="pipefusion-free",
                             daemon=True).start()
        return out
    set_flag._pipefusion = True
    queue.set_flag = set_flag  # on this instance only


# ------------------------------------------------------------------------------------- ComfyUI frees memory

def hook_memory(reg: GroupRegistry) -> None:
    import comfy.model_management as mm

    if not getattr(mm.unload_all_models, "_pipefusion", False):
        mm.unload_all_models = _after(mm.unload_all_models, lambda *a, **k: reg.stop_all("ComfyUI unloads all models"))
    if not getattr(mm.free_memory, "_pipefusion", False):
        def give_way(memory_required, device, *a, **k):
            if not reg.warm():
                return
            index = pressure_index(device, memory_required, mm.get_free_memory(device))
            if index is not None:
                reg.stop_on_devices({index}, f"ComfyUI needs {memory_required / 2**30:.2f} GiB on {device} "
                                             "for its own model after unloading its others")
        mm.free_memory = _after(mm.free_memory, give_way, skip_callers=_package())


def _package() -> str:
    """This package's module name under ComfyUI (the folder's name, e.g. ``comfy-pipefusion``)."""
    return __name__.rsplit(".", 2)[0]


def _after(original, then, skip_callers: str | None = None):
    """``original`` followed by ``then`` with the same arguments; ``then`` never breaks ComfyUI's call.
    With ``skip_callers`` (a package name), ``then`` is skipped when that package made the call: our own
    request that ComfyUI unload its models from a group's GPUs (admission) must not stop that group."""
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        caller = sys._getframe(1).f_globals.get("__name__", "") if skip_callers else ""
        if skip_callers and (caller == skip_callers or caller.startswith(skip_callers + ".")):
            return out
        try:
            then(*args, **kwargs)
        except Exception:
            log.exception("PipeFusion: freeing the worker groups after %s failed", original.__name__)
        return out
    wrapper._pipefusion = True
    return wrapper


# ------------------------------------------------------------------------------------- ComfyUI exits

def hook_exit_signals(reg: GroupRegistry) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)
        if previous in (signal.SIG_IGN, None) or getattr(previous, "_pipefusion", False):
            continue
        handler = functools.partial(_on_exit_signal, reg, previous)
        handler._pipefusion = True
        signal.signal(sig, handler)


def _on_exit_signal(reg: GroupRegistry, previous, signum, frame) -> None:
    """Kill every group now (a job may be running), let the pages hear their "stopped", then let the
    signal do what it did before (ComfyUI 0.3.x sets no handler: the process ends as SIGTERM ends it)."""
    try:
        reg.kill_all()  # each group reports "stopped": queued for the websocket
    finally:
        signal.signal(signum, previous if callable(previous) else signal.SIG_DFL)
        resignal = _once(lambda: os.kill(os.getpid(), signum))
        if not _flush_then(resignal):
            resignal()


def _once(fn):
    lock = threading.Lock()

    def call() -> None:
        if lock.acquire(blocking=False):
            fn()
    return call


def _flush_then(then, limit_s: float = 1.5) -> bool:
    """Run ``then`` once the server's loop has sent the queued websocket messages (at most ``limit_s``
    later, also when the loop never gets to it); False when there is no running loop to wait for."""
    host = _host()
    loop = getattr(host, "loop", None)
    queue = getattr(host, "messages", None)
    if loop is None or queue is None or not loop.is_running():
        return False

    async def flush() -> None:
        deadline = loop.time() + limit_s
        while not queue.empty() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the last message taken from the queue is being written
        then()
    loop.call_soon_threadsafe(lambda: loop.create_task(flush()))
    timer = threading.Timer(limit_s + 0.5, then)  # the loop is stuck: end anyway
    timer.daemon = True
    timer.start()
    return True


# ------------------------------------------------------------------------------------- routes

def add_routes() -> None:
    """``GET /pipefusion/groups``: {"groups": [{"key", "world_size", "devices", "state", "detail", "pids",
    "rss_bytes_per_rank", "last_job": {"wall_s", "compute_s", "wait_s", "transfer_s"} | null}]}. Called once by the
    package's ComfyUI entry (routes must exist before the server starts)."""
    from aiohttp import web

    host = _host()
    if host is None:
        return

    @host.routes.get("/pipefusion/groups")
    async def pipefusion_groups(request):
        reg = vars(host).get(ATTR)
        return web.json_response({"groups": reg.describe() if reg is not None else []})
