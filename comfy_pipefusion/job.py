"""One sampling job's inputs, identical on every rank: schedule, initial latent, conditioning, positions.

The sampler works in the model's sampling space on packed tokens ([B, S_img, 4C]). Latents enter and
leave in ComfyUI's LATENT convention (the family's latent format), the schedule and the starting point
come from the model sampling ComfyUI's stock loader gives the model (optionally shifted), and with cfg != 1
the model runs on the batch [positive; negative] ([positive; negative; middle] for DualCFGGuider), so what a
job returns is what ComfyUI's KSampler returns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import MAX_SEED, SampleSpec
from .models import family, references
from .models.family import LatentFormat, pack_latent, unpack_latent
from .sampling.model_sampling import model_sampling_for
from .sampling.noise import comfy_noise
from .sampling.samplers import sampler_class
from .sampling.schedulers import scheduler_sigmas


@dataclass(frozen=True)
class Problem:
    """Everything a rank needs to sample one job (CPU tensors; ranks move them to their device)."""

    spec: SampleSpec
    sigmas: torch.Tensor  # [steps + 1] float32
    x0: torch.Tensor  # [B, S_img, 4C] float32, noised, sampling space
    txt: torch.Tensor  # [MB, S_txt, joint_dim] text-encoder states; MB = branches x B: [positive; negative; middle]
    pooled: torch.Tensor | None  # [MB, pooled_dim]; None for families without a pooled vector
    guidance: torch.Tensor | None  # [MB], None for models without a guidance embedding
    rows: int  # image token rows
    cols: int  # image token columns
    family: str = "flux"
    latent: LatentFormat = LatentFormat(16, 0.3611, 0.1159)
    sampling: str = "flux"  # the model sampling's kind (sampling/model_sampling.py)
    inpaint: "Inpaint | None" = None  # a LATENT's noise mask, as ComfyUI's KSampler applies it
    refs: tuple = ()  # reference latents (Kontext), each [MB, C, h, w] in the sampling space
    ref_method: str = "offset"  # how they are placed (models/references.py)
    branch: object = None  # CFG parallelism: this rank runs one branch (parallel/cfg.py's Branch), else None

    @property
    def branches(self) -> int:
        """Conditionings in the model batch: 1, 2 ([positive; negative]) or 3 (and the middle: DualCFGGuider)."""
        return self.txt.shape[0] // self.batch

    @property
    def cfg(self) -> bool:
        """Whether the model runs more than the positive (classifier-free guidance)."""
        return self.branches > 1

    @property
    def model_batch(self) -> int:
        return self.txt.shape[0]

    def model_sampling(self):
        return model_sampling_for(self.sampling, self.spec.shift)

    @property
    def joint_text(self) -> bool:
        return family.get(self.family).JOINT_TEXT

    @property
    def n_span_txt(self) -> int:
        """Tokens of the text stream inside the attention sequence: the text tokens as the sequence holds them
        and the reference tokens after them for joint-text families, else none."""
        return family.sequence_text(family.get(self.family), self.n_txt, self.n_ref)

    @property
    def n_ref(self) -> int:
        """Tokens of the reference latents (they ride with the text stream)."""
        return references.count(self.refs)

    @property
    def n_txt(self) -> int:
        return self.txt.shape[1]

    @property
    def n_img(self) -> int:
        return self.rows * self.cols

    @property
    def batch(self) -> int:
        return self.x0.shape[0]

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Packed sampling-space tokens -> ComfyUI LATENT samples [B, C, h, w]."""
        return self.latent.process_out(unpack_latent(x.float().cpu(), self.rows * 2, self.cols * 2))


@dataclass(frozen=True)
class Inpaint:
    """ComfyUI's noise-mask sampling (KSamplerX0Inpaint), packed like the latent [B, S, 4C]: before each
    evaluation the model input keeps the sampler's latent where ``mask`` is 1 and takes the input image,
    noised to the evaluation's sigma with ``noise``, where it is 0; after it the prediction does the same
    with the clean image. Every operation is per token, so a patch applies it to its own slice."""

    mask: torch.Tensor
    image: torch.Tensor
    noise: torch.Tensor

    def model_input(self, ms, sigma: float, x: torch.Tensor, sl: slice) -> torch.Tensor:
        m = self.mask[:, sl].to(x.device)
        kept = ms.noise_scaling(sigma, self.noise[:, sl].to(x.device), self.image[:, sl].to(x.device))
        return x * m + kept * (1.0 - m)

    def denoised(self, denoised: torch.Tensor, sl: slice) -> torch.Tensor:
        m = self.mask[:, sl].to(denoised.device)
        return denoised * m + self.image[:, sl].to(denoised.device) * (1.0 - m)


def sampling_kind(fam, config: dict) -> str:
    """The model sampling ComfyUI's stock loader gives this model."""
    if fam.NAME == "flux":
        return "flux" if config.get("guidance_embeds", True) else "flux_schnell"
    return getattr(fam, "SAMPLING", fam.NAME)


def make_problem(spec: SampleSpec, txt: torch.Tensor, pooled: torch.Tensor | None,
                 latent: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 fam: str = "flux", fmt: LatentFormat | None = None, sampling: str | None = None,
                 negative: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 mask: torch.Tensor | None = None, refs=(), neg_refs=None, ref_method: str | None = None,
                 sigmas: torch.Tensor | None = None, middle: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 mid_refs=None) -> Problem:
    """Build a job from conditioning, an optional input LATENT (zeros: text to image), optional noise
    (default: ComfyUI's noise for ``spec.seed``) and, for cfg != 1, the ``negative`` (text, pooled), for a
    model of family ``fam`` with latent format ``fmt`` and model sampling ``sampling``. ``mask``: a noise
    mask already shaped like the latent (ComfyUI's prepare_mask) for inpainting. ``refs``: reference LATENTs
    (ComfyUI's ReferenceLatent), ``neg_refs`` the negative's, placed by ``ref_method`` (default: the family's,
    as ComfyUI's model). ``sigmas``: [steps + 1] given by the caller (ComfyUI's own, from a sampling node),
    used instead of the spec's scheduler. ``middle`` (text, pooled) and ``mid_refs``: DualCFGGuider's middle
    conditioning, the third branch when ``spec.cfg_middle`` is set."""
    fmt = fmt or family.get(fam).LATENT
    sampling = sampling or getattr(family.get(fam), "SAMPLING", fam)
    h, w = spec.height // 8, spec.width // 8
    shape = (spec.batch, fmt.channels, h, w)
    if latent is None:
        latent = torch.zeros(shape)
    if tuple(latent.shape) != shape:
        raise ValueError(f"latent shape {tuple(latent.shape)} does not match {shape} for "
                         f"{spec.width}x{spec.height} with batch {spec.batch}")
    ms = model_sampling_for(sampling, spec.shift)
    sigmas = sigmas_of(spec, ms) if sigmas is None else given_sigmas(sigmas, spec.steps)
    if len(sigmas) < 2:
        raise ValueError(f"{spec.steps} steps at denoise {spec.denoise} leave nothing to sample")
    if noise is None:  # drawn over ComfyUI's LATENT, as prepare_noise draws it
        noise = fmt.from_comfy(comfy_noise(fmt.comfy_shape(shape), spec.seed))
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match the latent's {shape}")
    # ComfyUI leaves an all-zero (empty) latent as it is, and moves any other into the sampling space.
    image = fmt.process_in(latent.float()) if torch.count_nonzero(latent) else latent.float()
    x0 = pack_latent(ms.start(sigmas, noise, image).float())
    guidance = torch.full((spec.batch,), float(spec.guidance))
    condition = getattr(family.get(fam), "condition_text", None)  # e.g. Flux.2's padding, before CFG batching
    if condition is not None:
        txt = condition(txt)
        negative = None if negative is None else (condition(negative[0]), negative[1])
        middle = None if middle is None else (condition(middle[0]), middle[1])
    if spec.branches > 1:
        if negative is None:
            raise ValueError(f"cfg {spec.cfg} needs a negative conditioning (or set cfg to 1)")
        if spec.branches == 3 and middle is None:
            raise ValueError(f"cfg_middle {spec.cfg_middle} (DualCFGGuider) needs a middle conditioning (cond2)")
        txt, pooled = _batched([(txt, pooled), negative, middle][:spec.branches])
        guidance = guidance.repeat(spec.branches)
    inpaint = None
    if mask is not None:
        if tuple(mask.shape) != shape:
            raise ValueError(f"noise mask shape {tuple(mask.shape)} does not match the latent's {shape}")
        if spec.sampler == "ddim":  # ComfyUI's ddim keeps the masked area with noise of its own (seed + 1)
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(spec.seed + 1))
        inpaint = Inpaint(pack_latent(mask.float()), pack_latent(image), pack_latent(noise.float()))
    ref_method = ref_method or getattr(family.get(fam), "REFERENCE_METHOD", "offset")
    refs = _references(family.get(fam), fmt, spec, refs, (neg_refs, mid_refs), ref_method)
    return Problem(spec, sigmas, x0, txt, pooled, guidance, spec.height // 16, spec.width // 16, fam, fmt, sampling,
                   inpaint, refs, ref_method)


def _references(fam, fmt: LatentFormat, spec: SampleSpec, refs, others, method: str) -> tuple:
    """Reference LATENTs in the sampling space, batched as the model runs ([positive; negative] under cfg, and the
    middle's with DualCFGGuider); ``others``: the negative's and the middle's reference LATENTs."""
    if not refs:
        return ()
    references.check_method(method)
    if not getattr(fam, "REFERENCES", False):
        raise ValueError(f"the conditioning carries {len(refs)} reference latent(s) (ReferenceLatent), which a "
                         f"{fam.NAME} model does not take: remove the ReferenceLatent node or load a Kontext model")
    for i, r in enumerate(refs):  # ComfyUI's LATENTs (Flux.2's with its 2x2 patches folded into 128 channels)
        if r.ndim != 4 or r.shape[1] != fmt.comfy_channels:
            raise ValueError(f"reference latent {i} has shape {tuple(r.shape)}; this model needs {fmt.comfy_channels} "
                             "channels: encode the reference image with this model's VAE")
    pos = references.batched([fmt.process_in(fmt.from_comfy(r.float())) for r in refs], spec.batch)
    batch = [pos]
    for which, given in zip(("negative", "middle"), others[:spec.branches - 1]):
        more = references.batched([fmt.process_in(fmt.from_comfy(r.float())) for r in (given or ())], spec.batch,
                                  f"{which} reference")
        if [tuple(r.shape) for r in more] != [tuple(r.shape) for r in pos]:
            raise ValueError(f"cfg {spec.cfg} runs positive and {which} in one batch, but the positive has "
                             f"{len(pos)} reference latent(s) of sizes {[tuple(r.shape[-2:]) for r in pos]} and "
                             f"the {which} {[tuple(r.shape[-2:]) for r in more]}: give the {which} the same "
                             "ReferenceLatent (e.g. through ConditioningZeroOut after it), or set cfg to 1")
        batch.append(more)
    return tuple(torch.cat(rs) for rs in zip(*batch))


def given_sigmas(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """A caller's schedule, checked: [steps + 1] finite, non-negative float32 values."""
    sigmas = torch.as_tensor(sigmas).detach().float().cpu().reshape(-1)
    if len(sigmas) != steps + 1:
        raise ValueError(f"{len(sigmas)} sigmas given for {steps} steps; a schedule of n steps has n + 1 sigmas")
    if not torch.isfinite(sigmas).all() or (sigmas < 0).any():
        raise ValueError(f"the given sigmas {sigmas.tolist()} must be finite and non-negative")
    return sigmas


def sigmas_of(spec: SampleSpec, ms) -> torch.Tensor:
    """[steps + 1] sigmas of ``spec``: its scheduler's for the model sampling ``ms`` (KSampler's), unless the
    sampler brings its own schedule."""
    own = sampler_class(spec.sampler).schedule(spec.steps)
    if own is not None:
        return own
    return scheduler_sigmas(ms, spec.scheduler, spec.steps, spec.denoise, sampler=spec.sampler)


def evaluation_plan(spec: SampleSpec, sampling: str):
    """(model evaluations, evaluation -> sampling step) of ``spec`` for a model sampling kind."""
    from .sampling.samplers import make_sampler
    from .sampling.noise import SamplerNoise

    ms = model_sampling_for(sampling, spec.shift)
    sampler = make_sampler(spec.sampler, sigmas_of(spec, ms), ms, SamplerNoise((1, 1, 2, 2), spec.seed, pack_latent))
    return len(sampler.evals), sampler.step_of


def _batched(conds: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(text, pooled) of [positive; negative] (; middle) as one batch. Text of different lengths is repeated up
    to their least common multiple when that is at most 4x the shortest (ComfyUI's rule for running them in
    one batch); repeated text tokens change no attention output of the image."""
    names = ("positive", "negative", "middle")
    lengths = [t.shape[1] for t, _ in conds]
    n = math.lcm(*lengths)
    if n // min(lengths) > 4:
        raise ValueError(f"the {', '.join(names[:len(conds)])} prompts encode to {', '.join(map(str, lengths))} "
                         "tokens, which ComfyUI would not batch together; make them closer in length (e.g. "
                         "shorten the longer)")
    txt, pooled = conds[0]
    for which, (t, p) in zip(names[1:], conds[1:]):
        if t.shape[0] != txt.shape[0] or t.shape[2] != txt.shape[2]:
            raise ValueError(f"{which} conditioning {tuple(t.shape)} does not fit the positive "
                             f"{tuple(txt.shape)}: encode both with the same text encoders")
        if pooled is not None and (p is None or p.shape != pooled.shape):
            raise ValueError(f"the {which} conditioning has no pooled output matching the positive's; "
                             "encode both with the same text encoders")
    both = torch.cat([t.repeat(1, n // t.shape[1], 1) for t, _ in conds])
    return both, None if pooled is None else torch.cat([p for _, p in conds])


def synthetic_conditioning(config: dict, n_txt: int, batch: int, seed: int,
                           fam: str = "flux") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text-encoder-like inputs of the right shapes for built-in models (no text encoder needed)."""
    width, pooled_width = family.get(fam).conditioning_dims(config)
    g = torch.Generator().manual_seed((seed + 7919) & MAX_SEED)  # any KSampler seed, wrapped
    txt = torch.randn(batch, n_txt, width, generator=g)
    pooled = torch.randn(batch, pooled_width, generator=g) if pooled_width else None
    return txt, pooled


def synthetic_problem(fam, config: dict, spec: SampleSpec, n_txt: int, references_hw=()) -> Problem:
    """A job with text-encoder-like conditioning of the right shapes for ``config`` (benchmarks, tests);
    with cfg != 1 the negative is another draw, and so is the middle with cfg_middle. ``references_hw``: (h, w)
    latent sizes of random reference latents (Kontext presets), the same for the negative and the middle."""
    txt, pooled = synthetic_conditioning(config, n_txt, spec.batch, spec.seed, fam.NAME)
    negative = synthetic_conditioning(config, n_txt, spec.batch, (spec.seed + 1) & MAX_SEED, fam.NAME)
    middle = synthetic_conditioning(config, n_txt, spec.batch, (spec.seed + 2) & MAX_SEED, fam.NAME)
    fmt = fam.latent_format(config)
    g = torch.Generator().manual_seed((spec.seed + 104729) & MAX_SEED)
    refs = [torch.randn(1, fmt.comfy_channels, h, w, generator=g) for h, w in references_hw]
    return make_problem(spec, txt, pooled, fam=fam.NAME, fmt=fmt, sampling=sampling_kind(fam, config),
                        negative=negative, refs=refs, neg_refs=refs, middle=middle, mid_refs=refs)


def preset_problem(preset: str, spec: SampleSpec) -> Problem:
    fam, p = family.find_preset(preset)  # noqa: F811
    return synthetic_problem(fam, p["config"], spec, p["text_tokens"], p.get("references", ()))
