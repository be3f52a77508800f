"""PipeFusion KSampler: KSampler's inputs, sampled by the worker group of a PIPEFUSION_MODEL."""
from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils

from comfy_pipefusion.jobspec import TensorKey as K

from ..launcher import GroupError, JobCancelled, JobError
from . import admission
from .convert import check_latent, check_sampler, conditioning_tensors, latent_format, output_latent
from .errors import readable
from .preview import ksampler_preview
from .references import job_references
from .validate import check_sampling


class PipeFusionKSampler:
    CATEGORY = "PipeFusion"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    DESCRIPTION = "Denoises a latent like KSampler, with the model spread over the PipeFusion worker group."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pipefusion_model": ("PIPEFUSION_MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }, "optional": {
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                "tooltip": "time shift of Flux/SD3 sampling, as ModelSamplingFlux/SD3 set it; "
                                           "0 = what ComfyUI uses for this model (Flux-dev 1.15, SD3 3.0)"}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, sampler_name, scheduler):
        """At queue time: a sampler and scheduler the worker group implements."""
        return check_sampling(sampler_name, scheduler)

    def sample(self, pipefusion_model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, denoise=1.0, shift=0.0):
        model = pipefusion_model
        try:
            check_sampler(sampler_name, scheduler, denoise, seed)
            samples = check_latent(latent_image, model.family, model.model_config)
            batch, _, h, w = samples.shape
            model.parallel.check_image(h // 2, w // 2)  # before the group starts (Ulysses lanes: the columns)
            model.parallel.check_job(cfg)  # CFG parallelism needs a negative branch
            txt, pooled, guidance = conditioning_tensors(positive, model.family, model.model_config, batch)
            tensors = {K.TXT: txt, K.LATENT: samples}
            if pooled is not None:
                tensors[K.POOLED] = pooled
            if abs(cfg - 1.0) > 1e-6:  # true classifier-free guidance: the negative runs in the same batch
                neg_txt, neg_pooled, _ = conditioning_tensors(negative, model.family, model.model_config, batch,
                                                              "negative")
                tensors[K.NEG_TXT] = neg_txt
                if neg_pooled is not None:
                    tensors[K.NEG_POOLED] = neg_pooled
            # before the group starts or allocates: refused with the numbers if it cannot fit; ComfyUI's own
            # models leave the group's GPUs first
            refs, ref_method = job_references(positive, negative, cfg)
            tensors.update(refs)
            admission.check(model, admission.job_size(model, samples, txt, K.NEG_TXT in tensors, refs))
            job = model.job({"height": h * 8, "width": w * 8, "steps": steps, "seed": seed, "batch": batch,
                             "guidance": guidance, "sampler": sampler_name, "scheduler": scheduler,
                             "denoise": denoise, "cfg": cfg, "shift": shift if shift > 0 else None}, ref_method)
        except ValueError as exc:
            raise ValueError(f"PipeFusion KSampler: {exc}") from None
        fmt = latent_format(model.family, model.model_config)  # ComfyUI draws over its own LATENT's shape
        tensors[K.NOISE] = fmt.from_comfy(comfy.sample.prepare_noise(fmt.to_comfy(samples), seed,
                                                                     latent_image.get("batch_index")))
        if latent_image.get("noise_mask") is not None:  # inpainting: the mask as KSampler shapes it
            tensors[K.MASK] = fmt.from_comfy(comfy.sampler_helpers.prepare_mask(
                latent_image["noise_mask"], fmt.comfy_shape(samples.shape), "cpu"))
        bar = comfy.utils.ProgressBar(steps)
        try:
            out, _ = model.launcher.run(model.plan, job.to_wire(), tensors, tuple(samples.shape),
                                        on_progress=lambda step, total: bar.update_absolute(step, total),
                                        cancelled=comfy.model_management.processing_interrupted,
                                        on_preview=ksampler_preview(model.family, model.model_config,
                                                                    tuple(samples.shape), steps))
        except JobCancelled:
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise RuntimeError("PipeFusion: the job was cancelled") from None
        except GroupError as exc:  # the group failed: its tracebacks and log go to the log, not the dialog
            raise RuntimeError(readable(exc)) from None
        except JobError as exc:  # the workers refused the job with a message meant for the user
            raise RuntimeError(f"PipeFusion: {exc}") from None
        result = {k: v for k, v in latent_image.items() if k != "samples"}
        result["samples"] = output_latent(out, model.family, model.model_config)
        return (result,)
