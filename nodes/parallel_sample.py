"""One sampling call of ComfyUI's guider, run on the worker group (PipeFusion Parallelize's wrapper).

Weights: the group's first job of a base model gets the whole patched model as a safetensors file in
/dev/shm; later jobs on the warm group send only the weights whose patches changed (a LoRA's strength, a
LoRA added or removed) and the ranks overwrite those in place. Each file is removed once the job that
reads it has ended. What the group holds is remembered on its Launcher (``HELD``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.jobspec import TensorKey as K
from comfy_pipefusion.models import family as families
from comfy_pipefusion.models.checkpoint import open_checkpoint

from ..launcher import GroupError, GroupPlan, JobCancelled, JobError
from ..launcher.client import weights_of
from . import admission, weights
from .convert import check_latent, conditioning_tensors, latent_format, parse_devices, parse_stage_split
from .errors import readable
from .handle import PipeFusionModel
from .hooks import groups
from .model_checks import Refused, check_model, check_pixart_positions, guider_conds, sampler_name
from .preview import previews_on, x0_hook
from .references import job_references

log = logging.getLogger("comfy_pipefusion")
SLOT = "pipefusion-parallelize"  # one group for the MODEL path: another base model replaces it
HELD = "pipefusion_parallelize_held"  # the Launcher attribute with what its group holds (Held)


@dataclass
class Held:
    """What a warm group of the MODEL path holds: the job weights key, the (removed) file its ranks read,
    the file's header, the patch fingerprint of every patched key, and the base model object itself (a
    weak reference: another model that Python places at the same address is not taken for it)."""

    key: str
    path: str
    info: object
    patches: dict = field(default_factory=dict)
    base: object = None


def plan_for(s, blocks: int) -> tuple[ParallelConfig, tuple[int, ...] | None, str]:
    """(parallel config, CUDA devices or None, weight dtype) of the node's settings."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devs, ranks = parse_devices(s.devices, gpus)
    if s.strategy == "serial" and ranks != 1:
        devs, ranks = (devs[:1] if devs else None), 1
    parallel = ParallelConfig(strategy=s.strategy, world_size=ranks, patches=s.patches, warmup_steps=s.warmup_steps,
                              balance=s.balance, stage_split=parse_stage_split(s.stage_split, s.strategy),
                              ulysses=s.ulysses_degree)
    if blocks > 1:
        parallel.check_model(blocks)
    dtype = s.weight_dtype if s.weight_dtype != "default" else ("bfloat16" if devs else "float32")
    return parallel, devs, dtype


def sample_on_group(settings, guider, noise, latent_image, sampler, sigmas, denoise_mask, seed, callback=None):
    """The guider's outer_sample, done by the worker group: returns the LATENT samples (CPU, float32).
    ``callback``: the sampling node's (ComfyUI's preview callback); with a preview method on, it gets each
    step's x0 from the group, as from the stock sampler."""
    patcher = guider.model_patcher
    try:
        check_model(patcher)
        name = sampler_name(sampler)
        guide = guider_conds(guider)
        n_keys = len(weights.weight_keys(patcher))
        if n_keys == 0:
            raise Refused("the MODEL has no transformer weights (diffusion_model.*)")
        base = weights.base_fingerprint(patcher)
        ms = patcher.get_model_object("model_sampling")
        shift = getattr(ms, "shift", None)
    except ValueError as exc:
        raise ValueError(f"PipeFusion Parallelize: {exc}") from None
    parallel, devs, dtype = plan_for(settings, 0)
    split = f"|split {','.join(map(str, parallel.stage_split))}" if parallel.stage_split else ""
    plan = GroupPlan(world_size=parallel.world_size, devices=devs,
                     key=f"model {base}|{settings.strategy}|{dtype}|{settings.balance}{split}"
                         + (f"|u{settings.ulysses_degree}" if settings.ulysses_degree else ""))
    launcher = groups().launcher(plan, SLOT)
    sigmas = sigmas.detach().float().cpu()
    with launcher.lock:  # what the group holds cannot change between the check and the job
        held = getattr(launcher, HELD, None)
        # 8-bit weights are never updated in place (the ranks may keep an upcast copy): those reload
        warm = held is not None and held.base() is patcher.model and launcher._usable(plan) \
            and launcher.weights == held.key \
            and held.info.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)
        made, update, info = [], None, None
        try:
            fps = weights.patch_fingerprints(patcher)
            if warm:
                changed = sorted(k for k in fps.keys() | held.patches.keys() if fps.get(k) != held.patches.get(k))
                path, info = held.path, held.info
                if changed:
                    update = weights.new_blob_path()
                    made.append(update)
                    start = time.perf_counter()
                    weights.write_blob(update, patcher, changed)
                    log.info("PipeFusion Parallelize: %d changed weights written in %.2f s", len(changed),
                             time.perf_counter() - start)
            else:
                path = weights.new_blob_path()
                made.append(path)
                start = time.perf_counter()
                size = weights.write_blob(path, patcher, weights.weight_keys(patcher))
                info = open_checkpoint(path)
                log.info("PipeFusion Parallelize: %.1f MiB of patched weights written in %.2f s", size / 2**20,
                         time.perf_counter() - start)
            if info.family == "pixart":
                check_pixart_positions(patcher, info.config)
            model = PipeFusionModel(str(path), info.config, parallel, plan, dtype, slot=SLOT, stamp=base,
                                    family=info.family)
            parallel.check_model(families.num_blocks(info.config), families.config_attention(info.config)[0])
            job, tensors, shape = _job(model, name, guide, noise, latent_image, sigmas, denoise_mask, seed, shift)
            # before the group starts or allocates (ComfyUI's own models leave the group's GPUs first)
            refs = {k: v for k, v in tensors.items() if k.startswith(("ref", "neg_ref", "mid_ref"))}
            size = admission.job_size(model, tensors[K.LATENT], tensors[K.TXT], K.NEG_TXT in tensors, refs,
                                      K.MID_TXT in tensors)
            admission.check(model, size, fp8=info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2))
            wire = dataclasses.replace(job, weight_update=str(update) if update is not None else None).to_wire()
            setattr(launcher, HELD, None)  # until the job has the weights in place
            fmt = latent_format(model.family, model.model_config)
            on_preview = x0_hook(callback, shape, fmt) if callback is not None and previews_on() else None
            try:
                return fmt.to_comfy(_run(model, wire, tensors, shape, len(sigmas) - 1, on_preview))
            finally:  # done, or cancelled once sampling began: the ranks hold this job's weights
                if launcher.weights == weights_of(wire):
                    setattr(launcher, HELD, Held(weights_of(wire), str(path), info, fps, weakref.ref(patcher.model)))
        except ValueError as exc:
            raise ValueError(f"PipeFusion Parallelize: {exc}") from None
        finally:
            for p in made:
                Path(p).unlink(missing_ok=True)


def _job(model, name, guide, noise, latent_image, sigmas, denoise_mask, seed, shift):
    """(job, tensors, output shape) of one sampling call (``guide``: the guider's model_checks.Guidance)."""
    import comfy.sampler_helpers

    samples = check_latent({"samples": latent_image.float().cpu()}, model.family, model.model_config)
    batch, _, h, w = samples.shape
    model.parallel.check_image(h // 2, w // 2)
    txt, pooled, guidance = conditioning_tensors(guide.positive, model.family, model.model_config, batch)
    fmt = latent_format(model.family, model.model_config)  # noise and mask come shaped like ComfyUI's LATENT
    tensors = {K.TXT: txt.float().contiguous(), K.LATENT: samples.contiguous(), K.SIGMAS: sigmas,
               K.NOISE: fmt.from_comfy(noise.detach().float().cpu()).contiguous()}
    if pooled is not None:
        tensors[K.POOLED] = pooled.float().contiguous()
    if abs(guide.cfg - 1.0) > 1e-6 or guide.middle is not None:
        if guide.negative is None:
            raise ValueError(f"cfg {guide.cfg} needs a negative conditioning")
        for cond, which, keys in ((guide.negative, "negative", (K.NEG_TXT, K.NEG_POOLED)),
                                  (guide.middle, "middle", (K.MID_TXT, K.MID_POOLED))):
            if cond is None:
                continue
            more_txt, more_pooled, _ = conditioning_tensors(cond, model.family, model.model_config, batch, which)
            tensors[keys[0]] = more_txt.float().contiguous()
            if more_pooled is not None:
                tensors[keys[1]] = more_pooled.float().contiguous()
    if denoise_mask is not None:
        tensors[K.MASK] = fmt.from_comfy(comfy.sampler_helpers.prepare_mask(
            denoise_mask, fmt.comfy_shape(samples.shape), "cpu")).float().contiguous()
    refs, ref_method = job_references(guide.positive, guide.negative or [], guide.cfg, guide.middle)
    tensors.update({k: v.float().cpu().contiguous() for k, v in refs.items()})
    job = model.job({"height": h * 8, "width": w * 8, "steps": len(sigmas) - 1, "seed": int(seed or 0),
                     "batch": batch, "guidance": guidance, "sampler": name, "scheduler": "simple", "denoise": 1.0,
                     **guide.sample, "shift": float(shift) if shift is not None else None}, ref_method)
    return job, tensors, tuple(samples.shape)


def _run(model, wire: dict, tensors, shape, steps, on_preview=None):
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(steps)
    try:
        out, _ = model.launcher.run(model.plan, wire, tensors, shape,
                                    on_progress=lambda step, total: bar.update_absolute(step, total),
                                    cancelled=comfy.model_management.processing_interrupted,
                                    on_preview=on_preview)
    except JobCancelled:
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise RuntimeError("PipeFusion: the job was cancelled") from None
    except GroupError as exc:
        raise RuntimeError(readable(exc)) from None
    except JobError as exc:
        raise RuntimeError(f"PipeFusion: {exc}") from None
    return out
