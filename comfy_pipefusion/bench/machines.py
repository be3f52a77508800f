"""The bench across machines (``--nnodes N --node-rank R --rdzv-endpoint HOST:PORT``): one command per machine,
the same but for its node rank, joined by torchrun's c10d rendezvous (multinode.py). Node rank 0 runs serial,
takes the turns (turns.py) and writes the report; the others run only their ranks of the group."""
from __future__ import annotations

from pathlib import Path

from ..jobspec import Job
from ..multinode import Nodes
from ..oneshot import owned_tempdir, run_jobs


def nodes_of(args) -> Nodes | None:
    """This machine's place in a group across machines (--nnodes > 1), validated before anything starts."""
    if args.nnodes == 1:
        if args.node_rank != 0 or args.rdzv_endpoint:
            raise ValueError("--node-rank and --rdzv-endpoint go with --nnodes > 1 (a group across machines)")
        return None
    if args.link:
        raise ValueError("--link runs both sides on this machine; --nnodes > 1 runs one side per machine: give one")
    if not args.rdzv_endpoint:
        raise ValueError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT, node rank 0's address and a "
                         "free port on it, the same on every machine")
    if args.world_size % args.nnodes:
        raise ValueError(f"--world-size {args.world_size} cannot be shared evenly by {args.nnodes} machines: "
                         f"give a multiple of {args.nnodes}")
    nodes = Nodes(args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id, args.local_addr, args.rdzv_timeout)
    nodes.interface()  # the address and its interface exist here
    return nodes


def run_other_node(args, source: dict, par_jobs: list[Job], nodes: Nodes) -> int:
    """Node rank > 0: this machine's ranks of the group and nothing else. No serial, no turns of its own:
    node rank 0's ranks take the group's turns, and the timed runs' barriers hold these ranks meanwhile;
    node rank 0 writes the report."""
    test_args = ["--test-samplers", args.test_samplers] if args.test_samplers else []
    with owned_tempdir("pipefusion-bench-") as tmp:
        out = run_jobs(None, args.seed, [j.to_wire() for j in par_jobs], world_size=args.world_size,
                       threads=args.threads_per_rank, model=source, nodes=nodes, rounds=args.rounds,
                       worker_args=["--probe-dir", str(Path(tmp) / "probes"), *test_args])
    here = next(iter(out.values()))[1].get("group_ranks_here")
    print(f"node rank {nodes.node_rank} of {nodes.nnodes} (group ranks {here}): ran {', '.join(out)}; "
          "the report is node rank 0's")
    return 0
