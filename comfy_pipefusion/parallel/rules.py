"""NCCL's ordering rules, emulated on gloo (``PIPEFUSION_COMM_RULES=nccl``), and the hang detector.

NCCL runs every operation of one communicator on one stream, in the order it was issued: a receive whose
sender has not sent yet blocks every operation issued after it on that communicator. Gloo does not: its
operations on one group progress independently, so an ordering that deadlocks on GPUs passes on CPUs. In
this mode every operation of a process group is handed to that group's ``Executor``: one thread per group
and rank that runs the real gloo operation and waits for it before it takes the next, exactly one at a
time in issue order, as an NCCL stream would (collectives too).

A hang in this mode is detected, not waited out. A rank is *blocked* while its main thread waits for an
operation (``Pending.wait``); computing, sleeping between jobs or polling for a turn is not blocked. When
every rank of the job has been blocked for ``PIPEFUSION_COMM_HANG_S`` seconds (default 30; the tests set
a few) and no operation completed on any rank in that time, nothing can ever complete: each rank raises
``CommHang`` naming the group and ranks it waits on, its own rank, and the operation at the head of that
group's queue (kind, peer, shape, issue index) that everything behind it waits for. A long compute on one
rank (seconds per step on a big model) is never called a hang, because that rank is not blocked.

The ranks share their state (blocked since, operations completed) through one small file mapped by every
rank (created by rank 0 in /dev/shm, unlinked as soon as all ranks mapped it): the mode needs every rank
on one machine, which is what the CPU tests run.
"""
from __future__ import annotations

import mmap
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass

import torch

MODE_ENV = "PIPEFUSION_COMM_RULES"
HANG_ENV = "PIPEFUSION_COMM_HANG_S"
MODES = ("gloo", "nccl")
POLL_S = 0.05


class CommHang(RuntimeError):
    """Every rank waits on another and nothing moves: the message names the group, ranks and operation."""


@dataclass(frozen=True)
class Rules:
    """How a ``Comm`` runs its operations, read once from the environment when the group is built."""

    mode: str = "gloo"
    """``gloo``: operations go straight to torch.distributed. ``nccl``: one executor per group, in order."""
    hang_s: float = 30.0
    """In ``nccl`` mode: how long every rank must be blocked with nothing completing to call it a hang."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"{MODE_ENV}={self.mode!r} is not a mode; use one of {', '.join(MODES)} "
                             "(nccl emulates NCCL's in-order streams on gloo), or leave it unset")
        if not self.hang_s > 0:
            raise ValueError(f"{HANG_ENV}={self.hang_s} must be a positive number of seconds")

    @property
    def nccl(self) -> bool:
        return self.mode == "nccl"

    @classmethod
    def from_env(cls, env=None) -> "Rules":
        env = os.environ if env is None else env
        hang = env.get(HANG_ENV) or "30"
        try:
            hang_s = float(hang)
        except ValueError:
            raise ValueError(f"{HANG_ENV}={hang!r} must be a number of seconds") from None
        return cls(env.get(MODE_ENV) or "gloo", hang_s)


@dataclass(frozen=True)
class OpInfo:
    """What an operation is, for the hang report."""

    kind: str
    peer: int | None
    shape: tuple
    dtype: str

    def __str__(self) -> str:
        peer = "" if self.peer is None else f" peer {self.peer}"
        return f"{self.kind}{peer} shape {list(self.shape)} {self.dtype}"


class Op:
    """One issued operation of an executor: done, or failed with ``error``."""

    def __init__(self, info: OpInfo, index: int, channel) -> None:
        self.info, self.index, self.channel = info, index, channel
        self.done = threading.Event()
        self.error: BaseException | None = None

    def describe(self) -> str:
        return f"{self.info} (issue #{self.index} on {self.channel.describe()})"


class Executor:
    """One group's stream: a thread that runs its operations one at a time in issue order."""

    def __init__(self, channel, monitor: "Monitor") -> None:
        self.channel, self.monitor = channel, monitor
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.issued = 0
        self.head: Op | None = None
        self._thread: threading.Thread | None = None

    def submit(self, info: OpInfo, fn) -> Op:
        """Queue ``fn`` (issues the real operation, returns its work or None); it runs after every earlier
        operation of this group has completed."""
        op = Op(info, self.issued, self.channel)
        self.issued += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                             name=f"pipefusion-stream-{self.channel.name}")
            self._thread.start()
        self.q.put((op, fn, torch.is_inference_mode_enabled()))  # the thread runs it in the caller's mode
        return op

    def _run(self) -> None:
        while True:
            op, fn, inference = self.q.get()
            self.head = op
            try:
                with torch.inference_mode(inference):
                    work = fn()
                    if work is not None:
                        work.wait()
            except BaseException as exc:  # handed to the waiter
                op.error = exc
            self.head = None
            self.monitor.completed()
            op.done.set()


class Monitor:
    """Every rank's state in one shared mapping: [blocked since (0: not blocked), operations completed]."""

    def __init__(self, rank: int, world: int, hang_s: float, path: str) -> None:
        self.rank, self.world, self.hang_s = rank, world, hang_s
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 16 * world)
        finally:
            os.close(fd)
        self.state = torch.frombuffer(self._map, dtype=torch.float64).view(world, 2)
        self._lock = threading.Lock()
        self.executors: list[Executor] = []

    @staticmethod
    def new_path(world: int) -> str:
        """A fresh zeroed file for ``world`` ranks' state (mode 0600), to be mapped by every rank."""
        fd, path = tempfile.mkstemp(prefix="pfrules-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            os.ftruncate(fd, 16 * world)
        finally:
            os.close(fd)
        return path

    def completed(self) -> None:
        with self._lock:
            self.state[self.rank, 1] += 1

    def wait(self, op: Op) -> None:
        """Block until ``op`` is done; raise ``CommHang`` when every rank is blocked and nothing moves."""
        if op.done.is_set():
            return
        self.state[self.rank, 0] = time.time()
        moved, last = time.monotonic(), float(self.state[:, 1].sum())
        try:
            while not op.done.wait(POLL_S):
                # One copy of the shared state per look: read live, a peer's wait could end between the
                # test that every rank is blocked and the read of the latest start, which would then be
                # this rank's own (old) one: a hang called on a peer that just got going again.
                state = self.state.clone()
                total = float(state[:, 1].sum())
                if total != last:
                    moved, last = time.monotonic(), total
                    continue
                since = state[:, 0]
                if bool((since > 0).all()) and time.time() - float(since.max()) >= self.hang_s \
                        and time.monotonic() - moved >= self.hang_s:
                    raise CommHang(self.report(op))
        finally:
            self.state[self.rank, 0] = 0.0

    def report(self, op: Op) -> str:
        ch = op.channel
        head = ch.executor.head
        lines = [f"NCCL-rules hang ({MODE_ENV}=nccl): every rank has been blocked for "
                 f"{self.hang_s:g} s and no operation completed on any rank.",
                 f"rank {self.rank} waits for {op.describe()};",
                 f"at the head of group {ch.describe()}: "
                 + (f"{head.describe()}, which every later operation of that group waits behind"
                    if head is not None else "nothing (the operation waits for its peer)") + "."]
        others = [f"{e.channel.describe()}: {e.head.describe()}" for e in self.executors
                  if e is not ch.executor and e.head is not None]
        if others:
            lines.append("other groups of this rank stuck at: " + "; ".join(others) + ".")
        lines.append("Under NCCL one communicator runs its operations in issue order: post a receive on a "
                     "group only after the sends its peer needs first on that group, or use another group.")
        return "\n".join(lines)
