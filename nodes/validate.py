"""Checks ComfyUI runs when a prompt is queued (VALIDATE_INPUTS): what can be judged from the widget values
alone is refused by POST /prompt with the node and input highlighted, like stock validation errors, instead
of failing at run time. Each returns True or the message ComfyUI shows.

ComfyUI skips its own checks (combo lists, min/max) for the inputs a VALIDATE_INPUTS takes, and reports a
failure once per such input; so each node's check takes as few inputs as it needs and redoes the list
check for those. A value coming from a link is unknown (None) at queue time and is checked at run time.
"""
from __future__ import annotations

from comfy_pipefusion import config
from comfy_pipefusion.config import SAMPLERS, SCHEDULERS, ParallelConfig

from .convert import check_patches, parse_devices, parse_stage_split

STRATEGIES = ("auto",) + tuple(s for s in config.STRATEGIES if s not in ("auto", "naive_patch"))
"""The loader's strategies: the engine's (config.STRATEGIES) but the naive-patch quality baseline, auto first
(the default)."""
PATCHES_MAX = 256  # the loader's widget range
ULYSSES_MAX = 64


def check_plan(devices, strategy, gpu_count: int, patches=0, stage_split="", ulysses=0) -> bool | str:
    """The loader's plan as far as its widgets tell it: parseable devices that exist, enough ranks for the
    strategy (an even number for cfg, ...), patches that the strategy uses, a stage split with one entry per
    stage, a Ulysses degree (0: automatic) that divides the ranks of a CFG half and leaves a patch method at
    least 2 stages. What needs the checkpoint (blocks per stage, heads) or the image (patches per token row,
    image tokens per Ulysses rank) is checked when the nodes run."""
    if strategy is not None and strategy not in STRATEGIES:
        return f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}"
    try:
        if patches is not None:  # ComfyUI leaves the range check to us for the inputs taken here
            if not isinstance(patches, int) or not 0 <= patches <= PATCHES_MAX:
                bound = "smaller than min of 0" if isinstance(patches, int) and patches < 0 else \
                    f"bigger than max of {PATCHES_MAX}"
                raise ValueError(f"patches: Value {patches} {bound} (0 = one patch per rank)")
            if strategy is not None:
                check_patches(patches, strategy)
        if ulysses is not None and (not isinstance(ulysses, int) or not 0 <= ulysses <= ULYSSES_MAX):
            bound = "smaller than min of 0" if isinstance(ulysses, int) and ulysses < 0 else \
                f"bigger than max of {ULYSSES_MAX}"
            raise ValueError(f"ulysses_degree: Value {ulysses} {bound} (0 = automatic)")
        if devices is None or strategy is None:
            return True
        devs, ranks = parse_devices(str(devices), gpu_count)
        if strategy == "serial":
            ranks = 1  # serial uses the first device only (the loader says so in its docs)
        ParallelConfig(strategy=strategy, world_size=ranks, ulysses=ulysses or 0,
                       stage_split=None if stage_split is None else parse_stage_split(str(stage_split), strategy))
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
