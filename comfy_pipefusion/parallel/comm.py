"""Point-to-point and collective calls, each one counted.

Every tensor a strategy hands to torch.distributed goes through a ``Comm``, which adds the bytes this rank
sends to ``bytes_sent``: for a send its size, for an all_gather its own chunk once per peer (what a ring
or direct exchange puts on the wire from this rank), and to ``wait_s`` the time it spends blocked waiting
for a request (idle time: pipeline bubbles, imbalance, transfer). The benchmark reports both.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


class Comm:
    """This rank's view of a process group, with a byte counter."""

    def __init__(self, rank: int, world_size: int, group=None, device: torch.device | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.device = device or torch.device("cpu")
        self.bytes_sent = 0
        self.wait_s = 0.0

    def reset_counters(self) -> None:
        self.bytes_sent, self.wait_s = 0, 0.0

    def isend(self, tensor: torch.Tensor, dst: int):
        tensor = tensor.contiguous()
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return _Pending(dist.isend(tensor, dst, group=self.group), tensor, self)

    def irecv(self, tensor: torch.Tensor, src: int):
        return _Pending(dist.irecv(tensor, src, group=self.group), tensor, self)

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor, async_op: bool = False):
        tensor = tensor.contiguous()
        self.bytes_sent += tensor.numel() * tensor.element_size() * (self.world_size - 1)
        start = time.perf_counter()
        work = dist.all_gather(outputs, tensor, group=self.group, async_op=async_op)
        if not async_op:
            self.wait_s += time.perf_counter() - start
        return _Pending(work, tensor, self) if async_op else None

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)


class _Pending:
    """A request in flight; holds the tensor alive until it completes."""

    def __init__(self, work, tensor: torch.Tensor, comm: Comm) -> None:
        self.work = work
        self.tensor = tensor
        self.comm = comm

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            start = time.perf_counter()
            self.work.wait()
            self.comm.wait_s += time.perf_counter() - start
            self.work = None
        return self.tensor
