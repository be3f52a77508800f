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

from . import memory
from .config import ParallelConfig, SampleSpec
from .job import make_problem, preset_problem, sampling_kind, synthetic_problem
from .models import family, fp8
from .parallel import strategy_fn
from .parallel.comm import Comm
from .parallel.plan import ModelSource, load_rank_model, rank_modules
from .parallel.runtime import Control
from .parallel.selftest import EXIT_SELFTEST, SelfTestFailed, self_test
from .parallel.serial import run_serial
from .sampling.samplers import load_samplers
from .turns import Turns

log = logging.getLogger("comfy_pipefusion.worker")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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


class ModelCache:
    """One model per (source, modules this rank holds, dtype); a new one drops the old weights first."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.key, self.value = device, None, None
        self.meta_source, self.meta = None, None  # structure of the last source (plan.Described): read once
        self.progress = None  # called before each tensor read (serve: cancel while loading)

    def describe(self, source: ModelSource) -> tuple[object, dict, torch.nn.Module]:
        """(family, config, meta-device model) of ``source``: its header read and its meta model built once
        per source, and used again by the load."""
        if source != self.meta_source:
            self.meta_source, self.meta = None, None
            self.meta, self.meta_source = source.open(), source
        return self.meta.fam, self.meta.config, self.meta.meta

    def _key(self, source: ModelSource, cfg: ParallelConfig, rank: int, dtype: torch.dtype):
        fam, _, meta = self.describe(source)
        return (source, tuple(rank_modules(fam, meta, cfg, rank)), dtype)

    def holds(self, source: ModelSource, cfg: ParallelConfig, rank: int, dtype: torch.dtype) -> tuple[bool, int]:
        """(whether the weights of this job are loaded, bytes of another model that a load would free)."""
        copies = fp8.copy_bytes(self.value[0]) if self.value is not None else 0  # dropped unless kept
        if self.key == self._key(source, cfg, rank, dtype):
            return True, copies
        return False, family.param_bytes(self.value[0]) + copies if self.value is not None else 0

    def get(self, source: ModelSource, cfg: ParallelConfig, rank: int, dtype: torch.dtype):
        key = self._key(source, cfg, rank, dtype)
        if key != self.key:
            self.key, self.value = None, None  # a load that raises (a cancel) leaves nothing half-loaded
            self.describe(source)
            self.value = load_rank_model(source, cfg, rank, self.device, dtype, self.progress, self.meta)
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
    base_bytes: int = 0  # this rank's memory before the load (RSS on CPU, allocated on GPU)
    load_s: float = 0.0  # time to load the weights (0 when they were loaded already)
    device: torch.device = torch.device("cpu")
    peer: str | None = None  # another tool's method on this model (peers.py), run instead of the strategy


def prepare(job: dict, comm: Comm, models: ModelCache, tensors: dict | None = None,
            samplers: dict | None = None) -> Prepared:
    """Validate a job and load what it needs on this rank (no communication). ``samplers``: test samplers
    by name (``--test-samplers``), which job files may name besides the production ones."""
    source = ModelSource(**job["model"])
    defaults = {k: family.find_preset(source.preset)[1][k] for k in ("height", "width", "steps")} \
        if source.preset else {}
    sample = dict(job["sample"])
    if samplers and sample.get("sampler") in samplers:
        sample["sampler"] = samplers[sample["sampler"]]
    spec = SampleSpec(**{**defaults, **sample})
    par = dict(job["parallel"])
    if par.get("stage_split") is not None:  # JSON carries a list
        par["stage_split"] = tuple(par["stage_split"])
    asked = par.pop("world_size", comm.world_size)
    if asked != comm.world_size:
        raise ValueError(f"job {job.get('name', '')!r} asks for world_size {asked} but the group has "
                         f"{comm.world_size} ranks; start the group with {asked} ranks")
    cfg = ParallelConfig(world_size=comm.world_size, **par)
    cfg.check_job(spec.cfg)
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
    mode = admit(source, cfg, problem, comm, models, dtype)
    base, start = memory_now(models.device), time.perf_counter()
    model, blocks = models.get(source, cfg, comm.rank, dtype)
    if mode is not None:
        use_fp8(model, mode, dtype)
    if job.get("peer"):  # the bench's peer row: a copy of the model with the peer's parallelism applied
        from .peers import prepare_peer
        model = prepare_peer(job["peer"], model, comm.world_size)
    return Prepared(cfg, spec, problem, model, blocks, dtype, base, time.perf_counter() - start, models.device,
                    job.get("peer"))


def admit(source: ModelSource, cfg: ParallelConfig, problem, comm: Comm, models: ModelCache,
          dtype: torch.dtype) -> str | None:
    """Refuse a job this rank's memory cannot hold, before anything of it is allocated (memory.py); for an
    fp8 checkpoint, return how its stage computes (models/fp8.py): an upcast copy when it fits."""
    fam, _, meta = models.describe(source)
    cfg.check_model(len(fam.blocks_of(meta)), meta.config.num_attention_heads)  # stages, Ulysses' heads
    loaded, freed = models.holds(source, cfg, comm.rank, dtype)
    budget = memory.rank_budget(models.device, comm.rank, comm.world_size, loaded, freed)
    fp8_file, size = memory.stored_fp8(source.checkpoint), memory.job_size(problem)
    memory.admit(fam, meta, cfg, size, budget, fp8_file)
    if not fp8_file:
        return None
    scaled = os.environ.get("PIPEFUSION_FP8_MATMUL", "") == "scaled" and fp8.scaled_mm_available(models.device)
    return memory.fp8_compute(fam, meta, cfg, size, budget, scaled)


def use_fp8(model: torch.nn.Module, mode: str, dtype: torch.dtype) -> None:
    """Set how this stage's 8-bit weights compute, and say so in the log (one line per rank and job)."""
    held = fp8.set_compute(model, mode, dtype)
    n = len(fp8.stored_layers(model))
    if mode == "upcast":
        log.info("fp8 weights: keeping an upcast %s copy of %d Linear weights (%s), not cast again per call",
                 str(dtype).removeprefix("torch."), n, memory.gib(held))
    elif mode == "scaled_mm":
        log.info("fp8 weights: %d Linear layers compute with torch._scaled_mm (8-bit activations)", n)
    else:  # the slow path: say it where the default log level shows it
        log.warning("fp8 weights: an upcast copy does not fit; %d Linear weights are cast to %s per call", n,
                 str(dtype).removeprefix("torch."))


def memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def memory_peak(device: torch.device) -> int:
    """This process's peak memory: allocated on its GPU (since the last load), its peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def execute(prep: Prepared, comm: Comm, device: torch.device, control: Control) -> torch.Tensor | None:
    """Sample once; returns the LATENT samples on rank 0."""
    with torch.inference_mode():
        if prep.peer:
            from .peers import run_peer
            x = run_peer(prep.model, prep.problem, prep.dtype, device, control)
            x = x if comm.rank == 0 else None
        elif prep.cfg.strategy == "serial":
            x = run_serial(prep.model, prep.problem, prep.dtype, device, control)
        else:
            x = strategy_fn(prep.cfg.strategy)(prep.model, prep.blocks, prep.problem, prep.cfg, comm,
                                               prep.dtype, device, control)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = prep.problem.finish(x) if x is not None else None
    if device.type == "cuda":  # the job's buffers are gone: give their cached blocks back (ComfyUI's VAE decode)
        del x
        torch.cuda.empty_cache()
    return out


def rank_stats(prep: Prepared, comm: Comm) -> list[dict]:
    local = {"param_bytes": family.param_bytes(prep.model), "bytes_sent": comm.bytes_sent, "wait_s": comm.wait_s,
             "pid": os.getpid(), "base_bytes": prep.base_bytes, "peak_bytes": memory_peak(prep.device),
             "load_s": prep.load_s}
    return comm.gather_object(local)


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
               "base_bytes_per_rank": [r["base_bytes"] for r in stats],  # before the load
               "peak_bytes_per_rank": [r["peak_bytes"] for r in stats],  # load and runs
               "load_s_per_rank": [r["load_s"] for r in stats],
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
        for kind in fam.kv_buffers(model, b, lambda kind: kind):
            counts[kind] += 1
    return counts


def run_file(jobs_path: Path, out: Path, comm: Comm, device: torch.device, turns: Turns | None = None,
             samplers: dict | None = None) -> None:
    """Run a file of jobs; with ``turns``, each job's timed runs wait for its turn (see turns.py);
    ``samplers``: see ``prepare``."""
    spec = json.loads(jobs_path.read_text())
    models = ModelCache(device)
    for job in spec["jobs"]:
        job = {"model": spec["model"], **job}
        log.info("job %s: %s", job["name"], job["parallel"])
        prep = prepare(job, comm, models, samplers=samplers)
        samples, metrics = run_timed(prep, comm, device, int(job.get("repeats", 1)), turns)
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
            from .oneshot import die_with_parent
            die_with_parent()  # a one-shot group's rank ends with its agent (or its owner, for one rank)
            turns = Turns(Path(args.turns), args.turn_tag, comm.rank) if args.turns else None
            run_file(Path(args.jobs), Path(args.out), comm, device, turns, load_samplers(args.test_samplers))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
