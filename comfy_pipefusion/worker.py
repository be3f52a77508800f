"""The torchrun entry point: one process per rank.

    python -m torch.distributed.run --standalone --nproc_per_node N -m comfy_pipefusion.worker \
        --jobs jobs.json --out DIR [--threads T]          # run a file of jobs, then exit
    ... -m comfy_pipefusion.worker --serve GROUP_DIR        # a warm group serving the launcher

Without torchrun (no RANK in the environment) it runs as a single rank with no process group, which is
how the serial reference is timed in a process of its own. CUDA ranks use NCCL on cuda:LOCAL_RANK, CPU
ranks use gloo. In job-file mode rank 0 writes ``DIR/NAME.safetensors`` (the LATENT samples) and
``DIR/NAME.json`` (timings, parameter bytes and bytes sent per rank) for each job; in a group across
machines the first rank of every machine writes them, in its machine's DIR.
"""
from __future__ import annotations

import argparse
import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from .parallel.comm import Comm
from .parallel.selftest import EXIT_SELFTEST, SelfTestFailed, self_test
from .sampling.samplers import load_samplers

log = logging.getLogger("comfy_pipefusion.worker")
COLLECTIVE_TIMEOUT = timedelta(hours=1)  # idle ranks are pinged well within it (serve.py)
SELFTEST_S = 120.0  # the data plane's self-test at group start (first NCCL use includes communicator set-up)


def init_group(threads: int, store: str | None = None, marker_dir: Path | None = None,
               corrupt: bool = False) -> tuple[Comm, torch.device]:
    """Join the torchrun group (if any) on this rank's device; set CPU threads. ``store``: a file the
    ranks rendezvous in (no TCP store; see oneshot.worker_command), else torchrun's environment. Then the
    control plane, the hop and ring groups, and the data plane's self-test (selftest.py; ``marker_dir``
    gets its failure marker, ``corrupt`` is the tests' way to make it fail)."""
    torch.set_num_threads(max(1, threads))
    if "RANK" not in os.environ:
        return Comm(0, 1), torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init = f"file://{store}" if store else None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} wants cuda:{local} but only {torch.cuda.device_count()} GPUs "
                               "are visible; start fewer ranks per node or set CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world, device_id=device,
                                timeout=COLLECTIVE_TIMEOUT)
    else:
        device = torch.device("cpu")
        pin_cpus(rank, world, threads)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    comm = Comm.create(rank, world, device, COLLECTIVE_TIMEOUT)
    self_test(comm, SELFTEST_S, marker_dir, corrupt)
    return comm, device


def pin_cpus(rank: int, world: int, threads: int) -> None:
    """With PIPEFUSION_PIN_CPUS=1, CPU rank r keeps to its own ``threads`` cores (when there are enough), so
    ranks do not migrate onto each other's cores and caches."""
    if os.environ.get("PIPEFUSION_PIN_CPUS") != "1" or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= world * threads:
        os.sched_setaffinity(0, cpus[rank * threads:(rank + 1) * threads])


def setup_logging(rank: int, world: int) -> None:
    logging.basicConfig(level=os.environ.get("PIPEFUSION_LOG", "WARNING"),
                        format=f"%(asctime)s [rank {rank}/{world}] %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", help="JSON file: {'model': {...}, 'jobs': [...]}")
    ap.add_argument("--out", help="folder for the results of --jobs (rank 0 writes; across machines, the first "
                    "rank of each)")
    ap.add_argument("--serve", help="group directory of a launcher: serve its jobs until shutdown")
    ap.add_argument("--store", help="file the ranks rendezvous in (set by the launcher)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("PIPEFUSION_THREADS", "1")))
    ap.add_argument("--turns", help="with --jobs: take each timed run in turn, as told in this folder (bench/turns.py)")
    ap.add_argument("--turn-tag", default="group", help="with --turns: this process's name in the turns")
    ap.add_argument("--probe-dir", help="with --jobs: cache the planner's block probes here (default: "
                    "PIPEFUSION_PROBE_DIR or ~/.cache/comfy-pipefusion/probes)")
    # tests only: a broken peer-to-peer link (wrong bytes) unless NCCL_P2P_DISABLE=1, to fail the self-test
    ap.add_argument("--selftest-broken-p2p", action="store_true", help=argparse.SUPPRESS)
    # tests only: a Python file whose SAMPLERS ({name: Sampler subclass}) job files may name (--jobs)
    ap.add_argument("--test-samplers", help=argparse.SUPPRESS)
    # tests only: with --serve, every weight load takes this many seconds more (a window to cancel a load in)
    ap.add_argument("--debug-load-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if bool(args.jobs) == bool(args.serve) or (args.jobs and not args.out):
        ap.error("give either --jobs FILE --out DIR, or --serve GROUP_DIR")
    setup_logging(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    try:
        comm, device = init_group(args.threads, args.store, Path(args.serve) if args.serve else None,
                                  args.selftest_broken_p2p and os.environ.get("NCCL_P2P_DISABLE") != "1")
    except SelfTestFailed:  # logged, and marked in the group directory
        logging.shutdown()
        os._exit(EXIT_SELFTEST)  # a peer may still wait in a collective: do not tear the group down
    try:
        if args.serve:
            from .serve import serve
            serve(Path(args.serve), comm, device, args.debug_load_delay_s)
        else:
            from .bench.timing import run_file
            from .bench.turns import Turns
            from .oneshot import die_with_parent
            die_with_parent()  # a one-shot group's rank ends with its agent (or its owner, for one rank)
            turns = Turns(Path(args.turns), args.turn_tag, comm.rank) if args.turns else None
            run_file(Path(args.jobs), Path(args.out), comm, device, turns, load_samplers(args.test_samplers),
                     Path(args.probe_dir) if args.probe_dir else None, node=os.environ.get("GROUP_RANK", "0"),
                     writes=int(os.environ.get("LOCAL_RANK", "0")) == 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
