"""The job-file mode's timed runs (``worker --jobs``): each job prepared by the engine, run ``repeats`` times,
its samples and metrics written by rank 0; with turns (turns.py) the runs wait for their turn. A file with
``"rounds": R`` runs its jobs R times over (job A, B, ..., then A, B, ... again), each round with probes of
its own: on a machine whose speed drifts over minutes, every job then has runs (and predictions) from every
stretch of it, not one stretch each."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save

from ..engine import ModelCache, Prepared, execute, plan_report, prepare, rank_stats
from ..jobspec import Job
from ..models import family
from ..parallel.comm import Comm
from ..parallel.runtime import Control
from ..parallel.trace import Trace
from .turns import Turns

log = logging.getLogger("comfy_pipefusion.bench")


def run_timed(prep: Prepared, comm: Comm, device: torch.device, repeats: int,
              turns: Turns | None = None, warmup_runs: int = 0) -> tuple[torch.Tensor | None, dict]:
    """Run ``warmup_runs`` times untimed, then ``repeats`` times timed, with the model loaded; rank 0 gets the
    samples and the metrics. With ``turns``, the turn this job's caller waited for before ``prepare`` ends
    after the runs (see ``run_file``)."""
    turns = turns or Turns(None, "", comm.rank)
    walls, spans, samples, untimed = [], [], None, []
    for _ in range(warmup_runs):
        begin = time.time()
        execute(prep, comm, device, Control())
        untimed.append([begin, time.time()])
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
    metrics = {"wall_s_runs": walls, "run_spans": spans, "warmup_spans": untimed,
               "wall_s_median": statistics.median(walls),
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
             samplers: dict | None = None, probe_dir: Path | None = None, node: str = "0",
             writes: bool = True) -> None:
    """Run a file of jobs ({"model": {...}, "jobs": [Job wire forms without their model]}); with ``turns``,
    each job's timed runs wait for its turn (see turns.py); ``samplers``: test samplers by name, which the
    jobs may name besides the production ones (``Job.from_wire``). ``node``: this rank's machine (torchrun's
    GROUP_RANK); ``writes``: whether this rank writes the results (the first rank of each machine). A group
    across machines checks that every machine was given the same jobs, and rank 0 sends each job's results
    to every machine's writer: c10d may have put rank 0 on another machine than the one that reads them."""
    raw = jobs_path.read_bytes()
    spec = json.loads(raw)
    seen = comm.gather_object({"node": node, "jobs": hashlib.sha256(raw).hexdigest()})
    across = len({s["node"] for s in seen}) > 1
    if len({s["jobs"] for s in seen}) > 1:
        differ = sorted({s["node"] for s in seen if s["jobs"] != seen[0]["jobs"]})
        raise ValueError(f"the machines were given different jobs (the jobs of rank 0's machine differ from "
                         f"those of machine(s) {', '.join(differ)}): run the same command on every machine, "
                         "only the node rank may differ")
    here = [r for r, s in enumerate(seen) if s["node"] == node]
    turns = turns or Turns(None, "", comm.rank)
    models = ModelCache(device)
    rounds = int(spec.get("rounds", 1))
    if rounds < 1:
        raise ValueError(f"a jobs file's rounds must be >= 1, got {rounds}")
    probe_at = spec.get("probe_at", [])  # also probe again before these jobs (their index in a round)
    if not all(isinstance(i, int) and 0 < i < len(spec["jobs"]) for i in probe_at):
        raise ValueError(f"a jobs file's probe_at must list job indices from 1 to {len(spec['jobs']) - 1}, "
                         f"got {probe_at}")
    done: dict[str, list[dict]] = {}
    seen: set = set()  # the plans this process has run
    for r in range(rounds):
        # every round probes again, in a folder of this round and process (the bench's probe folder is its
        # own: no probe of an earlier run is used; in the first round's, the serial process's probe, one rank
        # alone, and the group's, every rank at once, are cached apart)
        models.planner = None
        models.probe_dir = probe_dir / f"{turns.tag or 'jobs'}-round-{r}" if probe_dir is not None and r \
            else probe_dir
        for i, wire in enumerate(spec["jobs"]):
            if i in probe_at:  # e.g. the bench's serial process, one job per turn: a probe per group round
                models.planner = None
                models.probe_dir = probe_dir / f"{turns.tag or 'jobs'}-round-{r}-job-{i}" if probe_dir else None
            job = Job.from_wire({"model": spec["model"], **wire}, comm.world_size, samplers)
            log.info("job %s (round %d of %d): %s", job.name, r + 1, rounds, job.parallel)
            # the turn starts before prepare: its load and the planner's probes (a few seconds of timed compute
            # whose numbers every prediction scales with) get the machine to themselves, like the timed runs.
            # Probed beside the other process's start-up or probes, the block costs read up to 2x slow.
            turns.wait()
            prep = prepare(job, comm, models)
            plan = (job.parallel, job.peer)  # a frozen value
            warm = 0 if plan in seen else job.warmup_runs  # a plan's first runs in a process are slower
            seen.add(plan)
            samples, metrics = run_timed(prep, comm, device, job.repeats, turns, warm)
            done.setdefault(job.name, []).append(metrics)
            if r < rounds - 1:
                continue
            metrics = combine(done[job.name])
            if across:
                samples, metrics = from_rank0(comm, samples, metrics)
            if writes and (across or comm.rank == 0):
                out.mkdir(parents=True, exist_ok=True)
                metrics = {**metrics, "group_ranks_here": here}  # this machine's ranks
                write_atomic(out / f"{job.name}.safetensors", save({"samples": samples.contiguous()}))
                write_atomic(out / f"{job.name}.json", json.dumps(metrics).encode())


def combine(rounds: list[dict]) -> dict:
    """One job's metrics over its rounds (rank 0's; ``run_timed``'s on the other ranks): every run's wall
    time and span, the median of the rounds' predictions, and each round's plan, prediction, measurement and
    probes (``plan["rounds"]``); the rest (bytes, waits, timeline, memory, the plan) as of the last round."""
    if len(rounds) == 1:
        return rounds[-1]
    pooled = pool(rounds)
    predicted = [m["plan"]["predicted_s"] for m in rounds]
    each = [{k: m["plan"].get(k) for k in ("plan", "strategy", "patches", "warmup_steps", "ulysses", "stage_split",
                                            "predicted_s", "measured_s", "link", "probes")} for m in rounds]
    return {**pooled, "plan": {**pooled["plan"], "rounds": each,
                               "predicted_s": None if None in predicted else statistics.median(predicted)}}


def pool(runs: list[dict]) -> dict:
    """Several metrics of one plan as one: every run's wall time and span, the median measured; the rest as of
    the last (a round's runs, or the bench's serial turns, one job each, between two probes)."""
    walls = [w for m in runs for w in m["wall_s_runs"]]
    return {**runs[-1], "wall_s_runs": walls, "run_spans": [s for m in runs for s in m["run_spans"]],
            "warmup_spans": [s for m in runs for s in m["warmup_spans"]],
            "wall_s_median": statistics.median(walls), "wall_s_min": min(walls),
            "plan": {**runs[-1]["plan"], "measured_s": statistics.median(walls)}}


def from_rank0(comm: Comm, samples: torch.Tensor | None, metrics: dict | None) -> tuple[torch.Tensor, dict]:
    """Rank 0's samples and metrics on every rank (the control plane: JSON text and the tensor's bytes)."""
    head = comm.broadcast_object({"shape": list(samples.shape), "dtype": str(samples.dtype).removeprefix("torch.")}
                                 if comm.rank == 0 else None)
    text = comm.broadcast_bytes(json.dumps(metrics).encode() if comm.rank == 0 else None)
    data = comm.broadcast_bytes(samples.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                if comm.rank == 0 else None)
    tensor = torch.frombuffer(bytearray(data), dtype=getattr(torch, head["dtype"])).reshape(head["shape"])
    return tensor, json.loads(text)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (two machines' writers may share a folder, as namespaces do)."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.write_bytes(data)
    os.replace(part, path)
