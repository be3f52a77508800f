"""Checks ComfyUI runs when a prompt is queued (VALIDATE_INPUTS): what can be judged from the widget values
alone is refused by POST /prompt with the node and input highlighted, like stock validation errors, instead
of failing at run time. Each returns True or the message ComfyUI shows.

ComfyUI skips its own checks (combo lists, min/max) for the inputs a VALIDATE_INPUTS takes, and reports a
failure once per such input; so each node's check takes as few inputs as it needs and redoes the list
check for those. A value coming from a link is unknown (None) at queue time and is checked at run time.
"""
from __future__ import annotations

from comfy_pipefusion.config import SAMPLERS, SCHEDULERS, ParallelConfig

from .convert import parse_devices

STRATEGIES = ("auto", "pipefusion", "distrifusion", "serial", "cfg", "ulysses", "cfg+pipefusion",
              "cfg+distrifusion", "cfg+ulysses")
"""The loader's strategies: the engine's (config.STRATEGIES) but the naive-patch quality baseline."""


def check_plan(devices, strategy, gpu_count: int) -> bool | str:
    """The loader's devices and strategy: parseable devices that exist, a plan those ranks can run (enough
    of them, an even number for cfg, ...)."""
    if strategy is not None and strategy not in STRATEGIES:
        return f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}"
    if devices is None:
        return True
    try:
        devs, ranks = parse_devices(str(devices), gpu_count)
        if strategy is None:
            return True
        if strategy == "serial":
            ranks = 1  # serial uses the first device only (the loader says so in its docs)
        ParallelConfig(strategy=strategy, world_size=ranks)
    except ValueError as exc:
        return f"PipeFusion DiT Loader: {exc}"
    return True


def check_sampling(sampler_name, scheduler) -> bool | str:
    """The PipeFusion KSampler's sampler and scheduler: ones the worker group implements."""
    if sampler_name is not None and sampler_name not in SAMPLERS:
        return (f"PipeFusion KSampler: sampler {sampler_name!r} is not implemented by the worker group; choose "
                f"one of {', '.join(SAMPLERS)}, or use the stock KSampler for this one")
    if scheduler is not None and scheduler not in SCHEDULERS:
        return (f"PipeFusion KSampler: scheduler {scheduler!r} is not implemented by the worker group; choose "
                f"one of {', '.join(SCHEDULERS)}")
    return True
