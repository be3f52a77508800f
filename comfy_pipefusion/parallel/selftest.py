"""The data plane's self-test when a group starts: it proves every link a job will use, and warms them.

1. an all_reduce on the default group: each rank adds ``rank + 1``, every rank must see N(N + 1) / 2;
2. one send/receive on every hop group (s -> s + 1) and then on the ring (N - 1 -> 0), in that fixed order
   on every rank, each waited before the next: the communicators come up one after another along the
   chain, never in a cycle. The payload carries a checksum the receiver verifies.

A wrong sum or a link that does not answer within ``timeout_s`` ends the rank with ``EXIT_SELFTEST`` and,
in a launcher's group, writes ``GROUP_DIR/selftest-failed`` with the reason, so the launcher can restart
the group once with ``NCCL_P2P_DISABLE=1`` (consumer GPUs without peer-to-peer, IOMMU/ACS boards) and say why.
A wait inside NCCL cannot be interrupted, hence a timer that ends the process.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger("comfy_pipefusion.selftest")
EXIT_SELFTEST = 75
MARKER = "selftest-failed"
PAYLOAD = 1024


class SelfTestFailed(RuntimeError):
    """A data-plane link gave a wrong result; the message names the link and the numbers."""


def _payload(key: int, device: torch.device) -> torch.Tensor:
    return torch.arange(PAYLOAD, dtype=torch.float32, device=device) * (key + 1)


def self_test(comm, timeout_s: float, marker_dir: Path | None = None, corrupt: bool = False) -> None:
    """Run the checks above on this rank; ``corrupt`` (tests only) makes this rank send wrong data."""
    if comm.world_size == 1:
        return
    timer = threading.Timer(timeout_s, _timed_out, (comm.rank, timeout_s, marker_dir))
    timer.daemon = True
    timer.start()
    try:
        _check(comm, corrupt)
    except SelfTestFailed as exc:
        fail(str(exc), marker_dir)
        raise
    finally:
        timer.cancel()
    log.info("data plane self-test passed (%d ranks, %d links)", comm.world_size, comm.world_size)


def _check(comm, corrupt: bool) -> None:
    n, rank, dev = comm.world_size, comm.rank, comm.device
    got = comm.all_reduce(torch.tensor([float(rank + 1)], device=dev))
    want = n * (n + 1) / 2
    if float(got[0]) != want:
        raise SelfTestFailed(f"all_reduce on the data plane gave {float(got[0])} on rank {rank}, expected {want}")
    links = [(f"hop {s}->{s + 1}", s, s + 1, lambda s=s: comm.hop(s)) for s in range(n - 1)]
    links.append((f"ring {n - 1}->0", n - 1, 0, lambda: comm.ring))
    for key, (name, src, dst, channel) in enumerate(links):
        if rank == src:
            data = _payload(key, dev) + (1 if corrupt else 0)
            comm.isend(data, dst, channel()).wait()
        elif rank == dst:
            got = comm.irecv(torch.empty(PAYLOAD, device=dev), src, channel()).wait()
            want_sum, got_sum = float(_payload(key, dev).sum()), float(got.sum())
            if got_sum != want_sum:
                raise SelfTestFailed(f"link {name}: rank {rank} received checksum {got_sum:.0f} from rank {src}, "
                                     f"expected {want_sum:.0f}")
    comm.reset_counters()


def fail(reason: str, marker_dir: Path | None) -> None:
    log.error("data plane self-test failed: %s", reason)
    if marker_dir is not None:
        try:
            (Path(marker_dir) / MARKER).write_text(reason + "\n")
        except OSError:
            pass


def _timed_out(rank: int, timeout_s: float, marker_dir: Path | None) -> None:
    fail(f"rank {rank}: a data-plane link did not answer within {timeout_s:g} s", marker_dir)
    os._exit(EXIT_SELFTEST)
