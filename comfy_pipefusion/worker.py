"""The torchrun entry point: one process per rank.

    python -m torch.distributed.run --standalone --nproc_per_node N -m comfy_pipefusion.worker \
        --jobs jobs.json --out DIR [--threads T]

Without torchrun (no RANK in the environment) it runs as a single rank with no process group, which is
how the serial reference is timed in a process of its own. CUDA ranks use NCCL on cuda:LOCAL_RANK, CPU
ranks use gloo. Rank 0 writes ``DIR/NAME.safetensors`` (the LATENT samples) and ``DIR/NAME.json``
(timings, parameter bytes and bytes sent per rank) for each job of the file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from .config import ParallelConfig, SampleSpec
from .job import preset_problem
from .models import flux
from .parallel import strategy_fn
from .parallel.comm import Comm
from .parallel.plan import load_rank_model, rank_modules
from .parallel.serial import run_serial

log = logging.getLogger("comfy_pipefusion.worker")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def init_group(threads: int) -> tuple[Comm, torch.device]:
    """Join the torchrun group (if any) on this rank's device; set CPU threads."""
    torch.set_num_threads(max(1, threads))
    if "RANK" not in os.environ:
        return Comm(0, 1), torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} wants cuda:{local} but only {torch.cuda.device_count()} GPUs "
                               "are visible; start fewer ranks per node or set CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return Comm(rank, world), device


def _setup_logging(rank: int, world: int) -> None:
    logging.basicConfig(level=os.environ.get("PIPEFUSION_LOG", "WARNING"),
                        format=f"%(asctime)s [rank {rank}/{world}] %(name)s: %(message)s")


class ModelCache:
    """One model per distinct set of modules this rank holds (a new split or strategy rebuilds it)."""

    def __init__(self, config: dict, seed: int, device: torch.device) -> None:
        self.config, self.seed, self.device = config, seed, device
        self.key, self.value = None, None

    def get(self, cfg: ParallelConfig, rank: int, dtype: torch.dtype):
        meta = flux.build_meta(self.config)
        key = (tuple(rank_modules(meta, cfg, rank)), dtype)
        if key != self.key:
            self.value = None  # drop the old weights before loading new ones
            self.value = load_rank_model(self.config, self.seed, cfg, rank, self.device, dtype)
            self.key = key
        return self.value


def run_job(job: dict, comm: Comm, device: torch.device, models: ModelCache) -> dict | None:
    """Run one job ``repeats`` times; rank 0 returns the latent and the metrics."""
    preset = flux.PRESETS[job["preset"]]
    spec = SampleSpec(**{**{k: preset[k] for k in ("height", "width", "steps")}, **job["sample"]})
    par = dict(job["parallel"])
    asked = par.pop("world_size", comm.world_size)
    if asked != comm.world_size:
        raise ValueError(f"job {job['name']!r} asks for world_size {asked} but the group has "
                         f"{comm.world_size} ranks; start the group with {asked} ranks")
    cfg = ParallelConfig(world_size=comm.world_size, **par)
    problem = preset_problem(job["preset"], spec)
    cfg.check_image(problem.rows)
    dtype = DTYPES[spec.dtype]
    model, blocks = models.get(cfg, comm.rank, dtype)
    walls, x = [], None
    for _ in range(int(job.get("repeats", 1))):
        comm.bytes_sent = 0
        comm.barrier()
        start = time.perf_counter()
        with torch.inference_mode():
            if cfg.strategy == "serial":
                x = run_serial(model, problem, dtype, device)
            else:
                x = strategy_fn(cfg.strategy)(model, blocks, problem, cfg, comm, dtype, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        comm.barrier()
        walls.append(time.perf_counter() - start)
    local = {"param_bytes": flux.param_bytes(model), "bytes_sent": comm.bytes_sent}
    per_rank = [local]
    if dist.is_initialized():
        per_rank = [None] * comm.world_size
        dist.all_gather_object(per_rank, local)
    if comm.rank != 0:
        return None
    metrics = {"wall_s_runs": walls, "wall_s_median": statistics.median(walls), "wall_s_min": min(walls),
               "param_bytes_per_rank": [r["param_bytes"] for r in per_rank],
               "bytes_sent_per_rank": [r["bytes_sent"] for r in per_rank],
               "params": sum(p.numel() for p in flux.build_meta(models.config).parameters()),
               "device": str(device), "threads": torch.get_num_threads()}
    return {"samples": problem.finish(x), "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", required=True, help="JSON file: {'model': {...}, 'jobs': [...]}")
    ap.add_argument("--out", required=True, help="folder for the results (rank 0 writes)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("PIPEFUSION_THREADS", "1")))
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.jobs).read_text())
    comm, device = init_group(args.threads)
    _setup_logging(comm.rank, comm.world_size)
    preset = flux.PRESETS[spec["model"]["preset"]]
    models = ModelCache(preset["config"], int(spec["model"].get("seed", 0)), device)
    out = Path(args.out)
    try:
        for job in spec["jobs"]:
            job = {"preset": spec["model"]["preset"], **job}
            log.info("job %s: %s", job["name"], job["parallel"])
            result = run_job(job, comm, device, models)
            if result is not None:
                out.mkdir(parents=True, exist_ok=True)
                save_file({"samples": result["samples"].contiguous()}, str(out / f"{job['name']}.safetensors"))
                (out / f"{job['name']}.json").write_text(json.dumps(result["metrics"]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
