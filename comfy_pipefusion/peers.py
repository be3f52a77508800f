"""Peers: another tool's parallel method on the same model, seed and shape, run by the same group in the
same turns as our strategies (``bench --peers``), so that the figures compare like with like.

``diffusers-ulysses``: diffusers' own context parallelism (``ContextParallelConfig(ulysses_degree=N)``,
``enable_parallelism``) on a copy of this rank's whole model, driven by our serial sampling loop: every rank
calls diffusers' forward on the whole latent, diffusers' hooks split the sequence over the ranks and trade
tokens for heads at every attention (all_to_all on its own device mesh), and gather the output. Its
traffic does not go through ``Comm``, so it is not counted in bytes_sent.

diffusers 0.42 picks the rank's device as ``rank % torch.accelerator.device_count()``, which divides by
zero on a machine without an accelerator; on CPU the peer is set up with that count read as 1 (the CPU
device), the only change: everything after it is diffusers' own code on gloo.
"""
from __future__ import annotations

import copy
from unittest import mock

import torch

PEERS = ("diffusers-ulysses",)


def prepare_peer(name: str, model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    """A copy of ``model`` with the peer's parallelism applied (every rank at once: it makes groups)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}: choose one of {', '.join(PEERS)}")
    from diffusers import ContextParallelConfig

    if getattr(model, "_cp_plan", None) is None:
        raise ValueError(f"diffusers has no context-parallel plan for {type(model).__name__}; the "
                         "diffusers-ulysses peer runs on the models that have one (Flux)")
    heads = model.config.num_attention_heads
    if heads % world_size:
        raise ValueError(f"diffusers' Ulysses splits {heads} heads over {world_size} ranks: not divisible, which "
                         "it needs (our ulysses splits them unevenly); leave the peer out or use a world size "
                         "that divides the heads")
    peer = copy.deepcopy(model)
    peer.set_attention_backend("native")
    count = torch.accelerator.device_count() if torch.accelerator.is_available() else 0
    with mock.patch("torch.accelerator.device_count", lambda: count or 1):
        peer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))
    return peer


def run_peer(model, problem, dtype: torch.dtype, device: torch.device, control=None) -> torch.Tensor:
    """Sample with the peer's model on every rank (its hooks do the parallel work); the latent on all."""
    from .parallel.serial import run_serial

    return run_serial(model, problem, dtype, device, control)
