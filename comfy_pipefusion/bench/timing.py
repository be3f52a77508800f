"""The job-file mode's timed runs (``worker --jobs``): each job prepared by the engine, run ``repeats`` times,
its samples and metrics written by rank 0; with turns (turns.py) the runs wait for their turn."""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..engine import ModelCache, Prepared, execute, plan_report, prepare, rank_stats
from ..jobspec import Job
from ..models import family
from ..parallel.comm import Comm
from ..parallel.runtime import Control
from ..parallel.trace import Trace
from .turns import Turns

log = logging.getLogger("comfy_pipefusion.bench")


def run_timed(prep: Prepared, comm: Comm, device: torch.device, repeats: int,
              turns: Turns | None = None) -> tuple[torch.Tensor | None, dict]:
    """Run ``repeats`` times with the model loaded; rank 0 gets the samples and the metrics. With ``turns``,
    the runs wait for this job's turn (the benchmark takes serial and the group in turns)."""
    turns = turns or Turns(None, "", comm.rank)
    walls, spans, samples = [], [], None
    turns.wait()
    for i in range(repeats):
        comm.reset_counters()
        comm.barrier()
        begin, start = time.time(), time.perf_counter()
        trace = comm.trace = Trace() if i == repeats - 1 else None  # the last run's timeline
        samples = execute(prep, comm, device, Control(trace=trace))
        comm.trace = None
        if trace is not None:
            trace.finish()
        comm.barrier()
        walls.append(time.perf_counter() - start)
        spans.append([begin, time.time()])
    turns.done()
    stats = rank_stats(prep, comm)
    timelines = comm.gather_object(trace.to_json())  # JSON only, every rank's in rank order
    metrics = {"wall_s_runs": walls, "run_spans": spans, "wall_s_median": statistics.median(walls),
               "wall_s_min": min(walls),
               "param_bytes_per_rank": [r["param_bytes"] for r in stats],
               "bytes_sent_per_rank": [r["bytes_sent"] for r in stats],
               "wait_s_per_rank": [r["wait_s"] for r in stats],  # of the last run
               "transfer_s_per_rank": [r["transfer_s"] for r in stats],  # of the last run
               "timeline": timelines,  # of the last run: parallel/trace.py
               "base_bytes_per_rank": [r["base_bytes"] for r in stats],  # before the load
               "peak_bytes_per_rank": [r["peak_bytes"] for r in stats],  # load and runs
               "load_s_per_rank": [r["load_s"] for r in stats],
               "params": sum(p.numel() for p in prep.model.parameters()),
               "device": str(device), "threads": torch.get_num_threads()}
    metrics["plan"] = plan_report(prep, metrics["wall_s_median"])
    metrics["attention_layers"] = attention_layers(prep.model, prep.problem)
    heads, head_dim = family.attention_shape(prep.model)
    metrics["width"] = heads * head_dim
    return samples, metrics


def attention_layers(model, problem) -> dict[str, int]:
    """How many attention layers of each kind ("joint", "image") the whole model has (the structure is
    there on every rank, weights or not): what DistriFusion's traffic depends on."""
    fam = family.get(problem.family)
    counts = {"joint": 0, "image": 0}
    for b in fam.blocks_of(model):
        for kind in fam.kv_buffers(model, b, lambda kind: kind):
            counts[kind] += 1
    return counts


def run_file(jobs_path: Path, out: Path, comm: Comm, device: torch.device, turns: Turns | None = None,
             samplers: dict | None = None, probe_dir: Path | None = None) -> None:
    """Run a file of jobs ({"model": {...}, "jobs": [Job wire forms without their model]}); with ``turns``,
    each job's timed runs wait for its turn (see turns.py); ``samplers``: test samplers by name, which the
    jobs may name besides the production ones (``Job.from_wire``)."""
    spec = json.loads(jobs_path.read_text())
    models = ModelCache(device)
    models.probe_dir = probe_dir  # the planner's block probes (autoplan.py)
    for wire in spec["jobs"]:
        job = Job.from_wire({"model": spec["model"], **wire}, comm.world_size, samplers)
        log.info("job %s: %s", job.name, job.parallel)
        prep = prepare(job, comm, models)
        samples, metrics = run_timed(prep, comm, device, job.repeats, turns)
        if comm.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_file({"samples": samples.contiguous()}, str(out / f"{job.name}.safetensors"))
            (out / f"{job.name}.json").write_text(json.dumps(metrics))
