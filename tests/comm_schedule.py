"""Two-rank schedules for test_comm_rules.py, run under torchrun: ``old`` is PipeFusion's first ordering
(stage 0 posts its ring receive before it sends item 0, everything on one group), kept here only to show
that the NCCL-rules mode catches it; ``new`` is the same exchange on the hop and ring groups; ``slow`` is ``new`` with rank 1 computing for a
while first (longer than the hang timeout, which must not be called a hang). Each rank
prints ``OK rank r`` when its exchange completed with the right values."""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from comfy_pipefusion.parallel.comm import Comm, ObjectRefused
from comfy_pipefusion.parallel.rules import CommHang


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("order", choices=("old", "new", "slow", "hostile", "cancel"))
    ap.add_argument("--compute-s", type=float, default=0.0, help="slow: rank 1 computes this long first")
    ap.add_argument("--marker", help="hostile: the file the pickle would create if it were ever loaded")
    ap.add_argument("--store", required=True)
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=rank, world_size=world)
    comm = Comm.create(rank, world, torch.device("cpu"), timedelta(minutes=5))
    if args.order == "hostile":
        return hostile(comm, args.marker)
    if args.order == "cancel":
        return cancel(comm)
    fwd, back = (comm.data, comm.data) if args.order == "old" else (comm.hop(0), comm.ring)
    try:
        if rank == 0:
            ring = comm.irecv(torch.zeros(4), 1, back)  # the latent patch of the next item, posted ahead
            out = comm.isend(torch.arange(4.0), 1, fwd)  # item 0 forward
            got = ring.wait()
            out.wait()
            assert got.tolist() == [1.0, 2.0, 3.0, 4.0], got
        else:
            if args.order == "slow":  # a long compute: rank 0 blocked all along, rank 1 is not
                time.sleep(args.compute_s)
            x = comm.irecv(torch.zeros(4), 0, fwd).wait()
            comm.isend(x + 1, 0, back).wait()
    except CommHang as exc:
        print(f"HANG rank {rank}: {exc}", file=sys.stderr, flush=True)
        os._exit(3)  # executor threads stay stuck in gloo: do not wait for them
    print(f"OK rank {rank}", flush=True)
    dist.destroy_process_group()
    return 0


class _Payload:
    """What an attacker would put on the wire: unpickling it creates ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def hostile(comm: Comm, marker: str) -> int:
    """Rank 1 plays a peer that answers gather_object with a pickle (framed as gather_object frames its
    bytes); rank 0 must refuse it without loading it."""
    if comm.rank == 1:
        raw = pickle.dumps(_Payload(marker))
        comm._all_gather(torch.tensor([len(raw)], dtype=torch.int64))
        comm._all_gather(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        print("SENT rank 1", flush=True)
    else:
        try:
            comm.gather_object({"rank": 0})
        except ObjectRefused as exc:
            print(f"REFUSED rank 0: {exc}", flush=True)
    dist.destroy_process_group()
    return 0


def cancel(comm: Comm) -> int:
    """Each strategy cancelled by rank 0 after 1 and after 3 steps, then an exact job on the same group:
    every rank must stop with nothing left in flight, or the next job would hang or read stale bytes."""
    from comfy_pipefusion.errors import JobCancelled
    from comfy_pipefusion.parallel.runtime import Control
    from comfy_pipefusion.parallel.serial import run_serial
    from comfy_pipefusion.engine import ModelCache, execute, prepare
    from comfy_pipefusion.jobspec import Job

    device, models, steps = torch.device("cpu"), ModelCache(torch.device("cpu")), 6
    # on 4 ranks also the exact methods (issue 13): Ulysses over 4 heads, and CFG's branches on 2 + 2 ranks
    extra = ("ulysses", "cfg+pipefusion", "cfg+ulysses", "ulysses+pipefusion", "ulysses+distrifusion") \
        if comm.world_size == 4 else ()
    for strategy in ("pipefusion", "distrifusion") + extra:
        cfg = 2.0 if strategy.startswith("cfg") else 1.0
        for stop_at in (1, 3):
            patches = comm.world_size + 1 if strategy == "pipefusion" else 0
            job = {"name": "c", "model": {"preset": "tiny", "seed": 0}, "sample": {"steps": steps, "cfg": cfg},
                   "parallel": {"strategy": strategy, "warmup_steps": 1, "patches": patches}}
            done: list = []
            control = Control(on_step=done.append, cancelled=lambda: len(done) >= stop_at)
            try:
                execute(prepare(Job.from_wire(job, comm.world_size), comm, models), comm, device, control)
                print(f"FINISHED {strategy} rank {comm.rank}", flush=True)
            except JobCancelled:
                print(f"CANCELLED {strategy} {stop_at} rank {comm.rank} after {len(done)}", flush=True)
        job = {"name": "x", "model": {"preset": "tiny", "seed": 0}, "sample": {"steps": 2, "cfg": cfg},
               "parallel": {"strategy": strategy, "warmup_steps": 2}}
        prep = prepare(Job.from_wire(job, comm.world_size), comm, models)
        x = execute(prep, comm, device, Control())
        if comm.rank == 0:
            serial = prepare(Job.from_wire({**job, "parallel": {"strategy": "serial", "world_size": 1}}, 1),
                             Comm(0, 1), ModelCache(device))
            with torch.inference_mode():
                ref = prep.problem.finish(run_serial(serial.model, serial.problem, serial.dtype, device))
            # relative to the latent's scale: true CFG amplifies float rounding (tests/test_exact.py)
            print(f"EXACT {strategy} {float((x - ref).abs().max() / max(1.0, float(ref.abs().max()))):.3g}",
                  flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
