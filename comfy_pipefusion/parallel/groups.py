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
    lanes: "LaneGroups | None" = None
    """Ulysses inside a patch method: this rank's lane groups; None otherwise."""


@dataclass
class LaneGroups:
    """What one rank holds of a Ulysses-inside-a-patch-method plan (in its branch)."""

    index: int
    """This rank's lane: its Ulysses rank within its stage (or band)."""
    stage: Comm
    """The lanes of this rank's stage (local rank = lane): the all_to_all over heads."""
    lane: Comm
    """The ranks of this lane across the stages (local rank = stage): the patch method's own groups."""
    leaders: Channel | None
    """Stage 0 of every lane (control), on those ranks; None elsewhere."""


def plan_groups(comm: Comm, plan: ParallelConfig) -> PlanGroups:
    """The groups of ``plan`` on this rank, made on first use by every rank in the same order. (A CFG branch's
    ``SubComm`` holds its own plan's groups, made with the whole plan's: ``plan_groups(branch, plan.branch())``.)"""
    key = _key(plan)
    if key not in comm.plans:
        comm.plans[key] = _make(comm, plan)
    return comm.plans[key]


def _key(plan: ParallelConfig) -> tuple:
    return plan.world_size, plan.cfg_degree, (plan.ulysses_degree, plan.patch_method) if has_lanes(plan) else None


def has_lanes(plan: ParallelConfig) -> bool:
    """Whether ``plan`` runs Ulysses inside a patch method (each stage or band on several lanes)."""
    return plan.ulysses_degree > 1 and plan.patch_method in ("pipefusion", "distrifusion")


def _make(comm: Comm, plan: ParallelConfig) -> PlanGroups:
    if plan.world_size != comm.world_size:
        raise ValueError(f"plan for {plan.world_size} ranks on a group of {comm.world_size}")
    if isinstance(comm, SubComm):
        raise ValueError(f"the groups of plan {plan.strategy} are made by the whole group, not a part of it")
    size, t = comm.world_size // plan.cfg_degree, comm.timeout
    branches = [tuple(range(c * size, (c + 1) * size)) for c in range(plan.cfg_degree)]
    mine = branches[comm.rank // size]
    lanes = None
    if plan.cfg_degree == 1:
        if has_lanes(plan):
            lanes = _lanes(comm, plan, mine, t, "")
        return PlanGroups(comm, None, None, lanes)
    channels: dict[str, Channel | None] = {}
    for c, ranks in enumerate(branches):  # every rank makes every group, in this order
        data = comm.new_channel(f"cfg{c} data", ranks, True, t)
        control = comm.new_channel(f"cfg{c} control", ranks, False, t)
        hops = {f"hop{s}": comm.new_channel(f"cfg{c} hop {s}->{s + 1}", (ranks[s], ranks[s + 1]), True, t)
                for s in range(size - 1)}
        ring = {"ring": comm.new_channel(f"cfg{c} ring {size - 1}->0", (ranks[0], ranks[-1]), True, t)} \
            if size > 1 else {}
        if ranks == mine:
            channels = {"data": data, "control": control, **hops, **ring}
    pair = None
    for local in range(size):
        ch = comm.new_channel(f"cfg pair {local}", (local, size + local), True, t)
        pair = ch if ch is not None else pair
    leaders = comm.new_channel("cfg leaders", (0, size), False, t)
    branch = SubComm(comm, mine, channels)
    if has_lanes(plan):
        for c, ranks in enumerate(branches):
            made = _lanes(comm, plan.branch(), ranks, t, f"cfg{c} ")
            lanes = made if ranks == mine else lanes
        branch.plans[_key(plan.branch())] = PlanGroups(branch, None, None, lanes)
    return PlanGroups(branch, pair, leaders)


def _lanes(comm: Comm, plan: ParallelConfig, ranks: tuple[int, ...], t, prefix: str) -> LaneGroups | None:
    """The lane groups of one branch (``ranks``, global; ``plan`` without CFG): rank (stage s, lane j) is
    ranks[s * u + j] (``ParallelConfig.coords``). Returns this rank's, or None where it is not in ``ranks``."""
    u, n = plan.ulysses_degree, plan.stages
    at = [[ranks[s * u + j] for j in range(u)] for s in range(n)]  # at[stage][lane]
    stages = [comm.new_channel(f"{prefix}ulysses stage {s} data", tuple(at[s]), True, t) for s in range(n)]
    lanes = []
    for j in range(u):
        members = tuple(at[s][j] for s in range(n))
        chans = {"control": comm.new_channel(f"{prefix}lane {j} control", members, False, t)}
        if plan.patch_method == "pipefusion":
            for s in range(n - 1):
                chans[f"hop{s}"] = comm.new_channel(f"{prefix}lane {j} hop {s}->{s + 1}", (at[s][j], at[s + 1][j]),
                                                    True, t)
            chans["ring"] = comm.new_channel(f"{prefix}lane {j} ring {n - 1}->0", (at[0][j], at[n - 1][j]), True, t)
        else:  # distrifusion: the gathers of this lane's heads' K/V over the bands
            chans["data"] = comm.new_channel(f"{prefix}lane {j} data", members, True, t)
        lanes.append((members, chans))
    leaders = comm.new_channel(f"{prefix}lane leaders", tuple(at[0]), False, t)
    if comm.rank not in ranks:
        return None
    s, j = divmod(ranks.index(comm.rank), u)
    return LaneGroups(j, SubComm(comm, tuple(at[s]), {"data": stages[s]}),
                      SubComm(comm, lanes[j][0], lanes[j][1]), leaders)
