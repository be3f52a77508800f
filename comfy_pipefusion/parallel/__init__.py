"""Parallel strategies. Each ``run_*`` samples one job on this rank and returns the latent on rank 0."""
from __future__ import annotations


def strategy_fn(name: str):
    """The function that runs strategy ``name`` on a rank (imports lazily: nothing at import time)."""
    if name == "pipefusion":
        from .pipefusion import run_pipefusion
        return run_pipefusion
    if name == "distrifusion":
        from .distrifusion import run_distrifusion
        return run_distrifusion
    if name in ("ulysses+pipefusion", "ulysses+distrifusion"):
        from .lanes import run_lanes
        return run_lanes
    if name == "ulysses":
        from .ulysses import run_ulysses
        return run_ulysses
    if name.split("+")[0] == "cfg":
        from .cfg import run_cfg
        return run_cfg
    if name == "naive_patch":
        from .naive import run_naive_patch
        return run_naive_patch
    raise ValueError(f"no parallel runner for strategy {name!r}")
