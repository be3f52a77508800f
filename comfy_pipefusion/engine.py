"""The per-job engine of a rank, shared by the job-file mode (bench/timing.py) and the warm group (serve.py):
the model cache, ``prepare`` (validate a job, admit it against memory, load this rank's weights) and
``execute`` (sample once). No communication before ``execute``; no entry point here (worker.py)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from . import adapters, memory
from .config import ParallelConfig, SampleSpec
from .job import make_problem, preset_problem, sampling_kind, synthetic_problem
from .jobspec import INPUT_KEYS, REFERENCE_KEY, Job
from .jobspec import TensorKey as K
from .models import checkpoint, family, fp8, references
from .parallel import strategy_fn
from .parallel.comm import Comm
from .parallel.plan import ModelSource, load_rank_model, rank_modules
from .parallel.runtime import Control
from .parallel.serial import run_serial

log = logging.getLogger("comfy_pipefusion.engine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelCache:
    """One model per (source, modules this rank holds, dtype); a new one drops the old weights first."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.key, self.value = device, None, None
        self.meta_source, self.meta = None, None  # structure of the last source (plan.Described): read once
        self.progress = None  # called before each tensor read (serve: cancel while loading)
        self.planner = None  # strategy=auto's probes and choice, kept for the group (autoplan.py)
        self.probe_dir = None  # where block probes are cached (None: autoplan's default)
        self.on_read = None  # called with the plan just before this rank reads weights (serve: "loading")

    def planner_for(self, comm: Comm):
        if self.planner is None:
            from .autoplan import GroupPlanner, default_cache_dir

            self.planner = GroupPlanner(comm, self.device, torch.get_num_threads(),
                                        self.probe_dir or default_cache_dir())
        return self.planner

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
            from .parallel.planner import label

            log.info("reading this rank's weights for plan %s (%s)", label(cfg),
                     "none held yet" if self.key is None else "it holds other modules than the last job's")
            if self.on_read is not None:
                self.on_read(cfg)
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
    choice: object = None  # strategy=auto: the planner's Choice (parallel/planner.py)
    predicted_s: float | None = None  # the simulator's wall time for this plan (auto, or a job asking)
    link: dict | None = None  # the group's probed link (bandwidth B/s, latency s) behind the prediction
    peer: str | None = None  # another tool's method on this model (peers.py), run instead of the strategy
    probes: dict | None = None  # what the prediction was made from, and when (autoplan.GroupPlanner.probes)


def prepare(job: Job, comm: Comm, models: ModelCache, tensors: dict | None = None) -> Prepared:
    """Load what a job (validated by ``Job.from_wire``) needs on this rank (no communication). ``tensors``:
    the job's tensors by TensorKey (shared memory); without them, a job file's ``tensors_file``, else
    synthetic conditioning (a preset's, or a checkpoint's: the benchmark)."""
    source, spec, cfg = job.model, job.sample, job.parallel
    if cfg.world_size != comm.world_size:
        raise ValueError(f"job {job.name!r} asks for world_size {cfg.world_size} but the group has "
                         f"{comm.world_size} ranks; start the group with {cfg.world_size} ranks")
    if tensors is None and job.tensors_file:  # a job file's real conditioning (the demo): txt, pooled
        tensors = load_file(job.tensors_file)
    if tensors is None and source.preset:
        problem = preset_problem(source.preset, spec)
    elif tensors is None:  # a checkpoint with synthetic conditioning (the benchmark)
        fam, config, _ = models.describe(source)
        problem = synthetic_problem(fam, config, spec, job.text_tokens)
    else:
        fam, config, _ = models.describe(source)
        unknown = sorted(k for k in set(tensors) - INPUT_KEYS if not REFERENCE_KEY.fullmatch(k))
        if unknown:
            raise ValueError(f"job {job.name!r} has tensors named {', '.join(unknown)}; the names are "
                             f"{', '.join(sorted(INPUT_KEYS))}")
        if K.TXT not in tensors:
            raise ValueError(f"job {job.name!r} has no {K.TXT.value!r} tensor (the prompt's text states)")
        negative = (tensors[K.NEG_TXT], tensors.get(K.NEG_POOLED)) if K.NEG_TXT in tensors else None
        middle = (tensors[K.MID_TXT], tensors.get(K.MID_POOLED)) if K.MID_TXT in tensors else None
        problem = make_problem(spec, tensors[K.TXT], tensors.get(K.POOLED), tensors.get(K.LATENT),
                               tensors.get(K.NOISE), fam=fam.NAME, fmt=fam.latent_format(config),
                               sampling=sampling_kind(fam, config), negative=negative, mask=tensors.get(K.MASK),
                               refs=references.listed(tensors, K.REF), neg_refs=references.listed(tensors, K.NEG_REF),
                               ref_method=job.reference_method, sigmas=tensors.get(K.SIGMAS), middle=middle,
                               mid_refs=references.listed(tensors, K.MID_REF))
    dtype = DTYPES[spec.dtype]
    choice, predicted, probes = None, None, None
    if cfg.strategy == "auto" or job.predict:  # collective: every rank of the group gets here with the job
        cfg, choice, predicted, probes = models.planner_for(comm).plan_job(
            cfg, problem, *models.describe(source), spec.dtype,
            lambda c: admit(source, c, problem, comm, models, dtype) or True)
    cfg.check_image(problem.rows, problem.cols)
    mode = admit(source, cfg, problem, comm, models, dtype)
    base, start = memory_now(models.device), time.perf_counter()
    model, blocks = models.get(source, cfg, comm.rank, dtype)
    if job.adapters and mode is not None:
        raise ValueError("LoRAs on an fp8 checkpoint are not supported yet; use a bf16/fp16 checkpoint")
    if job.adapters or "pipefusion_adapters" in model.__dict__:  # apply, change or undo LoRAs
        afam, aconfig, _ = models.describe(source)
        info = models.meta.info if source.checkpoint else None  # undo by reading the weights again

        def reread(keys: list[str]) -> None:
            checkpoint.load_modules(model, info, keys, models.device, dtype)
        patched = adapters.sync_model(model, afam.NAME, aconfig, job.adapters, reread if info else None)
        if patched is not None:
            log.info("LoRAs: %d weights of this stage patched in %.3f s (undo: %s)", patched["weights"],
                     patched["seconds"], "read again from the checkpoint" if info else
                     f"originals kept, {patched['original_bytes'] / 2 ** 20:.1f} MiB")
    if mode is not None:
        use_fp8(model, mode, dtype)
    if job.weight_update:  # some weights changed (a LoRA's strength): only they are read again
        fam, _, meta = models.describe(source)
        checkpoint.update_modules(model, models.meta.info, job.weight_update, rank_modules(fam, meta, cfg, comm.rank))
    if job.peer:  # the bench's peer row: a copy of the model with the peer's parallelism applied
        from .peers import prepare_peer
        model = prepare_peer(job.peer, model, comm.world_size)
    return Prepared(cfg, spec, problem, model, blocks, dtype, base, time.perf_counter() - start, models.device,
                    choice, predicted, probes and probes["link"], job.peer, probes)


def admit(source: ModelSource, cfg: ParallelConfig, problem, comm: Comm, models: ModelCache,
          dtype: torch.dtype) -> str | None:
    """Refuse a job this rank's memory cannot hold, before anything of it is allocated (memory.py); for an
    fp8 checkpoint, return how its stage computes (models/fp8.py): an upcast copy when it fits."""
    fam, _, meta = models.describe(source)
    cfg.check_model(len(fam.blocks_of(meta)), family.attention_shape(meta)[0])  # stages, Ulysses' heads
    loaded, freed = models.holds(source, cfg, comm.rank, dtype)
    budget = memory.rank_budget(models.device, comm.rank, comm.world_size, loaded, freed)
    # from the header read once per source (a checkpoint in shared memory is gone once the ranks loaded it)
    info = models.meta.info if models.meta is not None else None
    fp8_file, size = info is not None and info.dtype in fp8.FP8, memory.job_size(problem)
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


def plan_report(prep: Prepared, measured_s: float) -> dict:
    """The plan a job ran with, its predicted and measured wall time (and auto's candidates); logged."""
    from .parallel.planner import label

    out = {"plan": label(prep.cfg), "strategy": prep.cfg.strategy, "patches": prep.cfg.num_patches,
           "warmup_steps": prep.cfg.warmup_steps, "ulysses": prep.cfg.ulysses, "stage_split": prep.cfg.stage_split,
           "predicted_s": prep.predicted_s, "measured_s": measured_s,
           "auto": prep.choice.as_dict() if prep.choice is not None else None, "link": prep.link,
           "probes": prep.probes}
    if prep.predicted_s is not None:
        log.info("plan %s: predicted %.2f s, measured %.2f s", out["plan"], prep.predicted_s, measured_s)
    return out


def rank_stats(prep: Prepared, comm: Comm) -> list[dict]:
    local = {"param_bytes": family.param_bytes(prep.model), "bytes_sent": comm.bytes_sent, "wait_s": comm.wait_s,
             "transfer_s": comm.transfer_s,
             "pid": os.getpid(), "base_bytes": prep.base_bytes, "peak_bytes": memory_peak(prep.device),
             "load_s": prep.load_s}
    return comm.gather_object(local)
