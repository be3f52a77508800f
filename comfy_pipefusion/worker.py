"""The torchrun entry point: one process per rank.

    python -m torch.distributed.run --standalone --nproc_per_node N -m comfy_pipefusion.worker \
        --jobs jobs.json --out DIR [--threads T]          # run a file of jobs, then exit
    ... -m comfy_pipefusion.worker --serve GROUP_DIR        # a warm group serving the launcher

Without torchrun (no RANK in the environment) it runs as a single rank with no process group, which is
how the serial reference is timed in a process of its own. CUDA ranks use NCCL on cuda:LOCAL_RANK, CPU
ranks use gloo. In job-file mode rank 0 writes ``DIR/NAME.safetensors`` (the LATENT samples) and
``DIR/NAME.json`` (timings, parameter bytes and bytes sent per rank) for each job.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .config import ParallelConfig, SampleSpec
from .job import make_problem, preset_problem, sampling_kind, synthetic_problem
from .models import family
from .parallel import strategy_fn
from .parallel.comm import Comm
from .parallel.plan import ModelSource, load_rank_model, rank_modules
from .parallel.runtime import Control
from .parallel.serial import run_serial
from .turns import Turns

log = logging.getLogger("comfy_pipefusion.worker")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLLECTIVE_TIMEOUT = timedelta(hours=1)  # idle ranks are pinged well within it (serve.py)


def init_group(threads: int, store: str | None = None) -> tuple[Comm, torch.device]:
    """Join the torchrun group (if any) on this rank's device; set CPU threads. ``store``: a file the
    ranks rendezvous in (no TCP store; see group.worker_command), else torchrun's environment."""
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
    return Comm(rank, world, device=device), device


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


class ModelCache:
    """One model per (source, modules this rank holds, dtype); a new one drops the old weights first."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.key, self.value = device, None, None
        self.meta_source, self.meta = None, None  # structure of the last source: header read once
        self.progress = None  # called before each tensor read (serve: cancel while loading)

    def describe(self, source: ModelSource) -> tuple[object, dict, torch.nn.Module]:
        """(family, config, meta-device model) of ``source``, read once per source."""
        if source != self.meta_source:
            fam, config = source.describe()
            self.meta_source, self.meta = source, (fam, config, fam.build_meta(config))
        return self.meta

    def get(self, source: ModelSource, cfg: ParallelConfig, rank: int, dtype: torch.dtype):
        fam, _, meta = self.describe(source)
        key = (source, tuple(rank_modules(fam, meta, cfg, rank)), dtype)
        if key != self.key:
            self.key, self.value = None, None  # a load that raises (a cancel) leaves nothing half-loaded
            self.value = load_rank_model(source, cfg, rank, self.device, dtype, self.progress)
            self.key = key
        return self.value


@dataclass
class Prepared:
    cfg: ParallelConfig
    spec: SampleSpec
    problem: object
    model: torch.nn.Module
    blocks: list
    dtype: torch.dtype


def prepare(job: dict, comm: Comm, models: ModelCache, tensors: dict | None = None) -> Prepared:
    """Validate a job and load what it needs on this rank (no communication)."""
    source = ModelSource(**job["model"])
    defaults = {k: family.find_preset(source.preset)[1][k] for k in ("height", "width", "steps")} \
        if source.preset else {}
    spec = SampleSpec(**{**defaults, **job["sample"]})
    par = dict(job["parallel"])
    asked = par.pop("world_size", comm.world_size)
    if asked != comm.world_size:
        raise ValueError(f"job {job.get('name', '')!r} asks for world_size {asked} but the group has "
                         f"{comm.world_size} ranks; start the group with {asked} ranks")
    cfg = ParallelConfig(world_size=comm.world_size, **par)
    if tensors is None and job.get("tensors"):  # a job file's real conditioning (the demo): txt, pooled
        tensors = load_file(job["tensors"])
    if tensors is None and source.preset:
        problem = preset_problem(source.preset, spec)
    elif tensors is None:  # a checkpoint with synthetic conditioning (the benchmark)
        fam, config, _ = models.describe(source)
        problem = synthetic_problem(fam, config, spec, int(job.get("text_tokens", 64)))
    else:
        fam, config, _ = models.describe(source)
        negative = (tensors["neg_txt"], tensors.get("neg_pooled")) if "neg_txt" in tensors else None
        problem = make_problem(spec, tensors["txt"], tensors.get("pooled"), tensors.get("latent"),
                               tensors.get("noise"), fam=fam.NAME, fmt=fam.latent_format(config),
                               sampling=sampling_kind(fam, config), negative=negative, mask=tensors.get("mask"))
    cfg.check_image(problem.rows)
    dtype = DTYPES[spec.dtype]
    model, blocks = models.get(source, cfg, comm.rank, dtype)
    return Prepared(cfg, spec, problem, model, blocks, dtype)


def execute(prep: Prepared, comm: Comm, device: torch.device, control: Control) -> torch.Tensor | None:
    """Sample once; returns the LATENT samples on rank 0."""
    with torch.inference_mode():
        if prep.cfg.strategy == "serial":
            x = run_serial(prep.model, prep.problem, prep.dtype, device, control)
        else:
            x = strategy_fn(prep.cfg.strategy)(prep.model, prep.blocks, prep.problem, prep.cfg, comm,
                                               prep.dtype, device, control)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return prep.problem.finish(x) if x is not None else None


def rank_stats(prep: Prepared, comm: Comm) -> list[dict]:
    local = {"param_bytes": family.param_bytes(prep.model), "bytes_sent": comm.bytes_sent, "wait_s": comm.wait_s,
             "pid": os.getpid()}
    if not dist.is_initialized():
        return [local]
    out = [None] * comm.world_size
    dist.all_gather_object(out, local)
    return out


def run_timed(prep: Prepared, comm: Comm, device: torch.device, repeats: int,
              turns: Turns | None = None) -> tuple[torch.Tensor | None, dict]:
    """Run ``repeats`` times with the model loaded; rank 0 gets the samples and the metrics. With ``turns``,
    the runs wait for this job's turn (the benchmark takes serial and the group in turns)."""
    turns = turns or Turns(None, "", comm.rank)
    walls, spans, samples = [], [], None
    turns.wait()
    for _ in range(repeats):
        comm.reset_counters()
        comm.barrier()
        begin, start = time.time(), time.perf_counter()
        samples = execute(prep, comm, device, Control())
        comm.barrier()
        walls.append(time.perf_counter() - start)
        spans.append([begin, time.time()])
    turns.done()
    stats = rank_stats(prep, comm)
    metrics = {"wall_s_runs": walls, "run_spans": spans, "wall_s_median": statistics.median(walls),
               "wall_s_min": min(walls),
               "param_bytes_per_rank": [r["param_bytes"] for r in stats],
               "bytes_sent_per_rank": [r["bytes_sent"] for r in stats],
               "wait_s_per_rank": [r["wait_s"] for r in stats],  # of the last run
               "params": sum(p.numel() for p in prep.model.parameters()),
               "device": str(device), "threads": torch.get_num_threads()}
    metrics["attention_layers"] = attention_layers(prep.model, prep.problem)
    metrics["width"] = prep.model.config.num_attention_heads * prep.model.config.attention_head_dim
    return samples, metrics


def attention_layers(model, problem) -> dict[str, int]:
    """How many attention layers of each kind ("joint", "image") the whole model has (the structure is
    there on every rank, weights or not): what DistriFusion's traffic depends on."""
    fam = family.get(problem.family)
    counts = {"joint": 0, "image": 0}
    for b in fam.blocks_of(model):
        got = fam.kv_buffers(model, b, lambda kind: kind)
        for kind in got if isinstance(got, (list, tuple)) else [got]:
            counts[kind] += 1
    return counts


def run_file(jobs_path: Path, out: Path, comm: Comm, device: torch.device, turns: Turns | None = None) -> None:
    """Run a file of jobs; with ``turns``, each job's timed runs wait for its turn (see turns.py)."""
    spec = json.loads(jobs_path.read_text())
    models = ModelCache(device)
    for job in spec["jobs"]:
        job = {"model": spec["model"], **job}
        log.info("job %s: %s", job["name"], job["parallel"])
        samples, metrics = run_timed(prepare(job, comm, models), comm, device, int(job.get("repeats", 1)), turns)
        if comm.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_file({"samples": samples.contiguous()}, str(out / f"{job['name']}.safetensors"))
            (out / f"{job['name']}.json").write_text(json.dumps(metrics))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", help="JSON file: {'model': {...}, 'jobs': [...]}")
    ap.add_argument("--out", help="folder for the results of --jobs (rank 0 writes)")
    ap.add_argument("--serve", help="group directory of a launcher: serve its jobs until shutdown")
    ap.add_argument("--store", help="file the ranks rendezvous in (set by the launcher)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("PIPEFUSION_THREADS", "1")))
    ap.add_argument("--turns", help="with --jobs: take each timed run in turn, as told in this folder (turns.py)")
    ap.add_argument("--turn-tag", default="group", help="with --turns: this process's name in the turns")
    args = ap.parse_args(argv)
    if bool(args.jobs) == bool(args.serve) or (args.jobs and not args.out):
        ap.error("give either --jobs FILE --out DIR, or --serve GROUP_DIR")
    comm, device = init_group(args.threads, args.store)
    setup_logging(comm.rank, comm.world_size)
    try:
        if args.serve:
            from .serve import serve
            serve(Path(args.serve), comm, device)
        else:
            from .group import die_with_parent
            die_with_parent()  # a one-shot group's rank ends with its agent (or its owner, for one rank)
            turns = Turns(Path(args.turns), args.turn_tag, comm.rank) if args.turns else None
            run_file(Path(args.jobs), Path(args.out), comm, device, turns)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
