"""Every call to torch.distributed, on two planes, each one counted.

- The *control* plane is a CPU gloo group on every device type: jobs, votes, errors, the cancel decision,
  pings, statistics. Its object collectives carry JSON, never pickles (a local user who reaches a gloo
  socket must not get code run by unpickling): ``broadcast_object``, ``gather_object``, ``agree``.
- The *data* plane carries tensors: the default group (NCCL on GPUs, gloo on CPUs) for DistriFusion's
  gathers and the final bands, one group per PipeFusion forward hop (s -> s + 1) and one for the ring
  (N - 1 -> 0), distinct even at N = 2, so that no group ever carries both directions between two ranks.
  Every rank creates them in the same order when the group starts.

``bytes_sent`` adds what this rank puts on the data plane (a send's size; an all_gather's own chunk once per
peer); ``wait_s`` the time it waits for data from others (a receive, a gather: pipeline bubbles, imbalance,
and the peers' transfer), ``transfer_s`` the time it spends moving its own data out (packing and issuing a
send, waiting for a send to complete): host time on CPU, CUDA events on the waiting stream on GPU, so the
figures mean the same on both. Control
traffic is counted in ``ops`` only. With ``PIPEFUSION_COMM_RULES=nccl`` every gloo group runs its
operations through one in-order executor per rank, and a deadlock ends with ``CommHang`` (rules.py).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist

from .rules import Executor, Monitor, OpInfo, Rules

log = logging.getLogger("comfy_pipefusion.comm")


class ObjectRefused(ValueError):
    """An object collective received bytes that are not JSON (a pickle, a foreign peer)."""


class Channel:
    """One process group: a name for messages, its (global) ranks, the torch handle, its executor."""

    def __init__(self, name: str, ranks: tuple[int, ...], group, data: bool) -> None:
        self.name, self.ranks, self.group, self.data = name, ranks, group, data
        self.executor: Executor | None = None

    def describe(self) -> str:
        return f"'{self.name}' (ranks {', '.join(map(str, self.ranks))})"


class Comm:
    """This rank's view of the worker group: the control channel, the data channels, the counters."""

    def __init__(self, rank: int, world_size: int, group=None, device: torch.device | None = None,
                 channels: dict[str, Channel] | None = None, monitor: Monitor | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        everyone = tuple(range(world_size))
        self.channels = channels or {"data": Channel("data", everyone, group, True),
                                     "control": Channel("control", everyone, group, False)}
        self.monitor = monitor
        self.bytes_sent = 0
        self._wait_host = 0.0
        self._transfer_host = 0.0
        self._events: list = []  # (begin, end, is a send) CUDA events of data-plane waits
        self.ops: Counter = Counter()
        self.trace = None  # a trace.Trace: each data-plane wait is recorded there too (the bench's timeline)
        self.timeout = timedelta(hours=1)  # of the groups made later (new_channel)
        self.plans: dict = {}  # the sub-groups of each plan this group ran (parallel/groups.py), made once

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def create(cls, rank: int, world: int, device: torch.device, timeout: timedelta) -> "Comm":
        """After init_process_group: the control group, one group per hop and the ring, every rank calling
        new_group in the same order; in nccl-rules mode, an executor per gloo group."""
        rules = Rules.from_env()
        everyone = tuple(range(world))
        control = dist.new_group(backend="gloo", timeout=timeout)
        channels = {"data": Channel("data", everyone, None, True),
                    "control": Channel("control", everyone, control, False)}
        pairs = {f"hop{s}": (f"hop {s}->{s + 1}", (s, s + 1)) for s in range(world - 1)}
        if world > 1:
            pairs["ring"] = (f"ring {world - 1}->0", (0, world - 1))
        for key, (name, ranks) in pairs.items():  # every rank creates every group, in this order
            group = dist.new_group(list(ranks), timeout=timeout)
            channels[key] = Channel(name, ranks, group, True) if rank in ranks else None
        comm = cls(rank, world, device=device, channels=channels)
        comm.timeout = timeout
        if rules.nccl:
            comm._emulate(rules)
        return comm

    def _emulate(self, rules: Rules) -> None:
        path = self.broadcast_object(Monitor.new_path(self.world_size) if self.rank == 0 else None)
        try:
            monitor = Monitor(self.rank, self.world_size, rules.hang_s, path)
        except OSError as exc:
            raise RuntimeError(f"PIPEFUSION_COMM_RULES=nccl needs every rank on one machine: rank {self.rank} "
                               f"cannot map {path} ({exc})") from None
        self.barrier()  # every rank mapped it
        if self.rank == 0:
            os.unlink(path)
        gloo = [c for c in self.channels.values() if c is not None and dist.get_backend(c.group) == "gloo"]
        for ch in gloo:
            ch.executor = Executor(ch, monitor)
        monitor.executors = [c.executor for c in gloo]
        self.monitor = monitor
        log.info("NCCL rules emulated on %d gloo groups (hang after %.3g s)", len(gloo), rules.hang_s)

    # -- channels ---------------------------------------------------------------------------------
    @property
    def data(self) -> Channel:
        return self.channels["data"]

    @property
    def control(self) -> Channel:
        return self.channels["control"]

    def hop(self, s: int) -> Channel:
        """The group of the forward hop s -> s + 1 (only its data); this rank must be s or s + 1."""
        return self._pair(f"hop{s}", f"hop {s}->{s + 1}")

    @property
    def ring(self) -> Channel:
        """The group of the ring N - 1 -> 0 (latent patches, and the final latent); ranks 0 and N - 1."""
        return self._pair("ring", f"ring {self.world_size - 1}->0")

    def _pair(self, key: str, name: str) -> Channel:
        if key not in self.channels:  # a Comm built by hand on one group: everything on it
            return self.data
        ch = self.channels[key]
        if ch is None:
            raise ValueError(f"rank {self.rank} is not a member of group {name}")
        return ch

    # -- counters ---------------------------------------------------------------------------------
    @property
    def wait_s(self) -> float:
        self._settle_events()
        return self._wait_host

    @property
    def transfer_s(self) -> float:
        self._settle_events()
        return self._transfer_host

    def _settle_events(self) -> None:
        if self._events:
            self._events[-1][1].synchronize()
            for a, b, send in self._events:
                if send:
                    self._transfer_host += a.elapsed_time(b) / 1000
                else:
                    self._wait_host += a.elapsed_time(b) / 1000
            self._events.clear()

    def reset_counters(self) -> None:
        self.bytes_sent, self._wait_host, self._transfer_host, self._events, self.ops = 0, 0.0, 0.0, [], Counter()

    # -- issue ------------------------------------------------------------------------------------
    def _issue(self, ch: Channel, kind: str, peer, tensor: torch.Tensor, fn) -> "Pending":
        self.ops[ch.name, kind] += 1
        if ch.executor is None:
            return Pending(fn(), tensor, self, ch.data, f"{kind} {ch.name}")
        info = OpInfo(kind, peer, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
        return Pending(ch.executor.submit(info, fn), tensor, self, ch.data, f"{kind} {ch.name}")

    def isend(self, tensor: torch.Tensor, dst: int, ch: Channel | None = None) -> "Pending":
        ch = ch or self.data
        start = time.perf_counter()
        tensor = tensor.contiguous()
        if ch.data:
            self.bytes_sent += tensor.numel() * tensor.element_size()
        pending = self._issue(ch, "send", dst, tensor, lambda: dist.isend(tensor, dst, group=ch.group))
        if ch.data:
            self._transfer_host += time.perf_counter() - start
        return pending

    def irecv(self, tensor: torch.Tensor, src: int, ch: Channel | None = None) -> "Pending":
        ch = ch or self.data
        return self._issue(ch, "recv", src, tensor, lambda: dist.irecv(tensor, src, group=ch.group))

    def all_gather_into(self, out: torch.Tensor, tensor: torch.Tensor, async_op: bool = False,
                        ch: Channel | None = None):
        """All ranks' ``tensor`` [K, ...] into ``out`` [N * K, ...] (rank order) on the data plane (or the
        data channel ``ch``): one preallocated buffer, one collective."""
        tensor = tensor.contiguous()
        ch = ch or self.data
        self.bytes_sent += tensor.numel() * tensor.element_size() * (len(ch.ranks) - 1)
        pending = self._issue(ch, "all_gather", None, out, lambda: _gather_into(out, tensor, ch.group))
        if async_op:
            return pending
        pending.wait()
        return None

    def all_to_all(self, out: torch.Tensor, tensor: torch.Tensor, ch: Channel | None = None) -> torch.Tensor:
        """Chunk j of ``tensor`` [N, ...] to rank j of the group; chunk j of ``out`` [N, ...] from rank j (one
        collective, equal chunks: pad uneven ones). Ulysses' exchange of heads for tokens."""
        ch = ch or self.data
        tensor = tensor.contiguous()
        n = len(ch.ranks)
        if tensor.shape[0] != n or out.shape != tensor.shape:
            raise ValueError(f"all_to_all over {n} ranks takes [N={n}, ...] chunks, got {list(tensor.shape)} "
                             f"into {list(out.shape)}")
        self.bytes_sent += tensor[0].numel() * tensor.element_size() * (n - 1)
        return self._issue(ch, "all_to_all", None, out,
                           lambda: dist.all_to_all_single(out, tensor, group=ch.group, async_op=True)).wait()

    def new_channel(self, name: str, ranks: tuple[int, ...], data: bool, timeout: timedelta) -> Channel | None:
        """A process group over ``ranks`` (global), made by EVERY rank of the world in the same order (a
        collective of the default group); returns its channel on members, None elsewhere. Control channels
        are gloo on every device type; under NCCL rules a gloo group gets its executor here."""
        group = dist.new_group(list(ranks), timeout=timeout, backend=None if data else "gloo")
        if self.rank not in ranks:
            return None
        ch = Channel(name, tuple(ranks), group, data)
        if self.monitor is not None and dist.get_backend(group) == "gloo":
            ch.executor = Executor(ch, self.monitor)
            self.monitor.executors.append(ch.executor)
        return ch

    def all_reduce(self, tensor: torch.Tensor, ch: Channel | None = None) -> torch.Tensor:
        ch = ch or self.data
        return self._issue(ch, "all_reduce", None, tensor,
                           lambda: dist.all_reduce(tensor, group=ch.group, async_op=True)).wait()

    def _broadcast(self, tensor: torch.Tensor, src: int = 0, ch: Channel | None = None) -> torch.Tensor:
        ch = ch or self.control
        return self._issue(ch, "broadcast", src, tensor,
                           lambda: dist.broadcast(tensor, src, group=ch.group, async_op=True)).wait()

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        ch = self.control
        out = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype)
        return self._issue(ch, "all_gather", None, out, lambda: _gather_into(out, tensor[None], ch.group)).wait()

    # -- control plane ----------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world_size > 1:
            self._all_gather(torch.zeros(1, dtype=torch.uint8))

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (a one-byte broadcast on the control plane)."""
        if self.world_size == 1:
            return bool(flag)
        return bool(self._broadcast(torch.tensor([1 if flag and self.rank == 0 else 0], dtype=torch.uint8))[0])

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s JSON value on every rank (``src`` gets the decoded copy too, so all ranks agree)."""
        raw = encode_object(obj).numpy().tobytes() if self.rank == src else None
        return decode_object(self.broadcast_bytes(raw, src), src)

    def broadcast_bytes(self, raw: bytes | None, src: int = 0) -> bytes:
        """Rank ``src``'s bytes on every rank (its length first, then the bytes): what the caller decodes,
        never a pickle (e.g. a result tensor's raw bytes, a JSON text)."""
        if self.world_size == 1:
            return raw
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if self.rank == src and raw else None
        n = self._broadcast(torch.tensor([0 if data is None else data.numel()], dtype=torch.int64), src)
        if int(n[0]) == 0:
            return b""
        buf = data if data is not None else torch.empty(int(n[0]), dtype=torch.uint8)
        return self._broadcast(buf, src).numpy().tobytes()

    def gather_object(self, obj) -> list:
        """Every rank's JSON value, in rank order, on every rank."""
        data = encode_object(obj)
        if self.world_size == 1:
            return [decode_object(data.numpy().tobytes(), 0)]
        sizes = self._all_gather(torch.tensor([data.numel()], dtype=torch.int64))[:, 0].tolist()
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[:data.numel()] = data
        rows = self._all_gather(padded)
        return [decode_object(rows[r, :n].numpy().tobytes(), r) for r, n in enumerate(sizes)]


class Pending:
    """A request in flight; holds its tensor alive until it completes."""

    def __init__(self, work, tensor: torch.Tensor, comm: Comm, counted: bool, what: str = "") -> None:
        self.work, self.tensor, self.comm, self.counted, self.what = work, tensor, comm, counted, what

    def is_completed(self) -> bool:
        if self.work is None:
            return True
        if hasattr(self.work, "done"):  # an executor's operation
            return self.work.done.is_set()
        return self.work.is_completed()

    def wait(self) -> torch.Tensor:
        if self.work is None:
            return self.tensor
        work, self.work = self.work, None
        comm = self.comm
        send = self.what.startswith("send")
        cuda = self.counted and comm.device.type == "cuda" and hasattr(work, "is_completed")
        if cuda:  # the time the compute stream sits behind the transfer
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            work.wait()
            end.record()
            comm._events.append((begin, end, send))
            return self.tensor
        start = time.perf_counter()
        if hasattr(work, "done"):
            comm.monitor.wait(work)
            if work.error is not None:
                raise work.error
        elif work is not None:
            work.wait()
        if self.counted:
            took = time.perf_counter() - start
            if send:  # this rank's own data leaving
                comm._transfer_host += took
            else:
                comm._wait_host += took
            if comm.trace is not None:  # the wait just ended, on the trace's clock
                now = comm.trace.clock()
                comm.trace.wait(now - took, now, self.what)
        return self.tensor


def _gather_into(out: torch.Tensor, tensor: torch.Tensor, group):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, tensor, group=group, async_op=True)


def encode_object(obj) -> torch.Tensor:
    """A JSON value as bytes in a uint8 tensor (what the control plane's object collectives carry)."""
    try:
        raw = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"object collectives carry JSON values only, not {type(obj).__name__}: {exc}") from None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)


def decode_object(raw: bytes, rank: int):
    """The JSON value rank ``rank`` sent; anything else (a pickle, garbage) is refused, never unpickled."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        what = "a pickle" if raw[:1] == b"\x80" else "not JSON"
        raise ObjectRefused(f"the control plane received {len(raw)} bytes from rank {rank} that are {what} "
                            f"(first bytes {raw[:12]!r}); object collectives carry JSON only. Another process "
                            "may have connected to the group's sockets, or the ranks run different versions "
                            "of comfy-pipefusion: restart the group") from None
