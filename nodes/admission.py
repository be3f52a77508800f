"""Memory admission in the ComfyUI process, before the worker group starts (header -> config -> estimate),
and making room on the GPUs the group uses: ComfyUI's own models there are unloaded first.

The estimate is the core's (comfy_pipefusion/memory.py; each rank's bytes per plan in footprint.py); each rank
checks again before it allocates.
"""
from __future__ import annotations

import os

import psutil
import torch

from comfy_pipefusion import memory
from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.oneshot import visible_devices
from comfy_pipefusion.models import family, references


def group_state(launcher, plan) -> tuple[bool, int]:
    """(the launcher's warm group is this plan's, RAM its workers hold that a restart would free)."""
    g = getattr(launcher, "group", None)
    if g is None:
        return False, 0
    if g.plan == plan and g.alive():
        return True, 0
    held = 0
    for pid in g.worker_pids:
        try:
            held += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return False, held


def budget(devices: tuple[int, ...] | None, warm: bool, freed: int) -> memory.Budget | None:
    """What the group will draw on; None where this process cannot tell (GPUs held by another group)."""
    if devices is None:
        return memory.Budget("cpu", (memory.available_ram(),), warm, warm, freed=freed)
    free = None if freed else gpu_free(devices)  # another group's GPU memory: the ranks check after it stops
    return None if free is None else memory.Budget("cuda", free, warm, warm)


def gpu_free(devices: tuple[int, ...]) -> tuple[int, ...] | None:
    """Each of ``devices``' free memory without creating a CUDA context on it: NVML where it is installed
    (indices mapped through this process's CUDA_VISIBLE_DEVICES), else torch only for ComfyUI's current
    device (which has a context already); None where that does not cover every device."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML: fall back
        pynvml = None
    out = []
    for d in devices:
        if pynvml is not None:
            ident = visible_devices((d,), os.environ.get("CUDA_VISIBLE_DEVICES"))
            handle = pynvml.nvmlDeviceGetHandleByUUID(ident) if not ident.isdigit() else \
                pynvml.nvmlDeviceGetHandleByIndex(int(ident))
            out.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).free))
        elif torch.cuda.is_initialized() and d == torch.cuda.current_device():
            out.append(memory.free_gpu_bytes([d])[0])
        else:
            return None
    return tuple(out)


def smallest_job(model) -> memory.JobSize:
    """The smallest image: what the weights and the processes alone need."""
    fam = family.get(model.family)
    rows = max(model.parallel.num_patches, model.parallel.world_size)  # one token row per band
    cols = model.parallel.ulysses_degree  # a token for each Ulysses rank of a band
    return memory.JobSize(rows, cols, 1, fam.conditioning_dims(model.model_config)[0], dtype=model.dtype,
                          channels=4 * fam.latent_format(model.model_config).channels)


def check(model, size: memory.JobSize, label: str | None = None, fp8: bool | None = None) -> None:
    """Refuse a job of ``model`` (a PipeFusionModel) that cannot fit, before the group starts: the
    checkpoint's header gives the configuration, the configuration the estimate. Before the check,
    ComfyUI's own models are unloaded from the group's GPUs as far as the job needs. ``fp8``: whether the
    weights are stored in 8 bits, when the caller knows (else the checkpoint's header says)."""
    fam = family.get(model.family)
    meta = fam.build_meta(model.model_config)
    fp8 = memory.stored_fp8(model.path) if fp8 is None else fp8
    devices = model.plan.devices
    if devices:
        need = memory.estimate(fam, meta, model.parallel, size, "cuda", fp8)
        free_comfy_gpus(devices, [r.total + memory.CUDA_CONTEXT_BYTES for r in need])
    warm, freed = group_state(model.launcher, model.plan)
    b = budget(devices, warm, freed)
    if b is not None:
        memory.admit(fam, meta, model.parallel, size, b, fp8, label)


def job_size(model, samples: torch.Tensor, txt: torch.Tensor, cfg: bool, refs: dict | None = None,
             middle: bool = False) -> memory.JobSize:
    """The JobSize of a KSampler call: LATENT samples [B, C, h, w], text states [B, S, D], reference latents
    (``ref0``, ...: their tokens ride with the text; ComfyUI's LATENTs, unfolded as the latent is for Flux.2);
    ``middle``: DualCFGGuider's third branch."""
    b, c, h, w = samples.shape
    fmt = family.get(model.family).latent_format(model.model_config)
    n_ref = references.count([fmt.from_comfy(r) for r in references.listed(refs or {}, "ref")])
    return memory.JobSize(h // 2, w // 2, txt.shape[1], txt.shape[-1], b, cfg, middle, 4 * c, model.dtype,
                          n_ref=n_ref)


def free_comfy_gpus(devices: tuple[int, ...] | None, needs: list[int] | None = None) -> None:
    """Ask ComfyUI to unload its own models from the GPUs the group uses (enough for each rank's
    estimated bytes; everything there without an estimate). A no-op for CPU ranks."""
    if not devices:
        return
    import comfy.model_management as mm

    for rank, d in enumerate(devices):
        want = needs[rank] if needs else 1 << 62
        mm.free_memory(want, torch.device("cuda", d))
    mm.soft_empty_cache()


def check_ranks(parallel: ParallelConfig, devices: tuple[int, ...] | None) -> None:
    """``cpu:N`` is bounded by this machine's cores."""
    if devices is None:
        memory.check_cpu_ranks(parallel.world_size)


def weights_per_rank(fam_name: str, config: dict, parallel: ParallelConfig, dtype: str) -> list[int]:
    """Each rank's weight bytes under ``parallel`` (from the meta model: nothing is read or allocated)."""
    fam = family.get(fam_name)
    meta = fam.build_meta(config)
    size = memory.JobSize(parallel.world_size, 1, 1, fam.conditioning_dims(config)[0], dtype=dtype)
    return [r.weights for r in memory.estimate(fam, meta, parallel, size, "cuda")]
