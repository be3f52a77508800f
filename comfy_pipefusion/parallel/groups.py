"""The process groups of a hybrid plan, and a ``Comm`` over a subset of the ranks.

A plan with CFG runs each branch on half the group: that half gets a ``SubComm`` (its own data and control
groups, and PipeFusion's hop and ring groups), so that the strategies run on it unchanged, with local
ranks 0..N/2 - 1. Besides it: one data group per pair of ranks holding the same tokens in the two
branches (they exchange the model's prediction once per evaluation), and one control group of the
branch leaders (local rank 0 of each branch: the ranks that ask whether the job is cancelled).

Every rank makes every group, in one fixed order, the first time the group runs the plan (making a process group
is a collective of the whole world); the groups are kept in the ``Comm`` for the next job of that plan.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ParallelConfig
from .comm import Channel, Comm


class SubComm(Comm):
    """The ``Comm`` of some ranks of a group (``members``, global ranks): local ranks, its own channels,
    and the counters of the whole rank (bytes, waits and operations add to the root's)."""

    def __init__(self, root: Comm, members: tuple[int, ...], channels: dict[str, Channel | None]) -> None:
        self.root, self.members = root, members
        self.rank, self.world_size = members.index(root.rank), len(members)
        self.device, self.channels, self.monitor = root.device, channels, root.monitor
        self.timeout, self.plans = root.timeout, {}

    # the counters are the root's: a rank's statistics cover every group it used
    bytes_sent = property(lambda self: self.root.bytes_sent,
                          lambda self, v: setattr(self.root, "bytes_sent", v))
    _wait_host = property(lambda self: self.root._wait_host,
                          lambda self, v: setattr(self.root, "_wait_host", v))
    _transfer_host = property(lambda self: self.root._transfer_host,
                              lambda self, v: setattr(self.root, "_transfer_host", v))
    _events = property(lambda self: self.root._events)
    ops = property(lambda self: self.root.ops)
    trace = property(lambda self: self.root.trace)  # the bench's timeline records every wait of the rank

    def reset_counters(self) -> None:
        self.root.reset_counters()

    def isend(self, tensor, dst: int, ch: Channel | None = None):
        return super().isend(tensor, self.members[dst], ch)

    def irecv(self, tensor, src: int, ch: Channel | None = None):
        return super().irecv(tensor, self.members[src], ch)

    def _broadcast(self, tensor, src: int = 0, ch: Channel | None = None):
        return super()._broadcast(tensor, self.members[src], ch)


@dataclass
class PlanGroups:
    """What one rank holds of a plan's groups."""

    branch: Comm
    """This rank's CFG branch (its half of the group), or the whole group without CFG."""
    pair: Channel | None
    """This rank and the rank holding the same tokens in the other branch (data); None without CFG."""
    leaders: Channel | None
    """The branch leaders (control); None without CFG, and on ranks that lead no branch."""


def plan_groups(comm: Comm, plan: ParallelConfig) -> PlanGroups:
    """The groups of ``plan`` on this rank, made on first use by every rank in the same order."""
    key = (plan.world_size, plan.cfg_degree)
    if key not in comm.plans:
        comm.plans[key] = _make(comm, plan)
    return comm.plans[key]


def _make(comm: Comm, plan: ParallelConfig) -> PlanGroups:
    if plan.world_size != comm.world_size:
        raise ValueError(f"plan for {plan.world_size} ranks on a group of {comm.world_size}")
    if plan.cfg_degree == 1:
        return PlanGroups(comm, None, None)
    half = comm.world_size // 2
    t = comm.timeout
    halves = [tuple(range(c * half, (c + 1) * half)) for c in range(2)]
    mine = halves[comm.rank // half]
    channels: dict[str, Channel | None] = {}
    for c, ranks in enumerate(halves):  # every rank makes every group, in this order
        data = comm.new_channel(f"cfg{c} data", ranks, True, t)
        control = comm.new_channel(f"cfg{c} control", ranks, False, t)
        hops = {f"hop{s}": comm.new_channel(f"cfg{c} hop {s}->{s + 1}", (ranks[s], ranks[s + 1]), True, t)
                for s in range(half - 1)}
        ring = {"ring": comm.new_channel(f"cfg{c} ring {half - 1}->0", (ranks[0], ranks[-1]), True, t)} \
            if half > 1 else {}
        if ranks == mine:
            channels = {"data": data, "control": control, **hops, **ring}
    pair = None
    for local in range(half):
        ch = comm.new_channel(f"cfg pair {local}", (local, half + local), True, t)
        pair = ch if ch is not None else pair
    leaders = comm.new_channel("cfg leaders", (0, half), False, t)
    return PlanGroups(SubComm(comm, mine, channels), pair, leaders)
