"""Frozen, validated configuration for one parallel sampling job.

Every check raises ``ValueError`` whose message names the numbers involved and the fix, so that a bad
setting is refused before any process group starts.
"""
from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("serial", "pipefusion", "distrifusion", "naive_patch", "auto")
TEXT_STREAMS = ("last_patch", "first_patch", "every_patch")
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "uni_pc",
            "lcm")
SCHEDULERS = ("simple", "normal", "karras", "exponential", "sgm_uniform", "beta", "ddim_uniform",
              "linear_quadratic")
BALANCES = ("compute", "memory")
DTYPES = ("float32", "bfloat16", "float16")
MAX_SEED = 0xFFFFFFFFFFFFFFFF  # KSampler's widget range; torch's generators take seeds up to 2**64 - 1


def check_seed(seed: int, sampler: str) -> None:
    """A seed the stock KSampler can sample with ``sampler``.

    ComfyUI 0.3.75's ddim is euler with random inpainting noise: ``KSAMPLER.sample`` (comfy/samplers.py)
    seeds it with ``torch.manual_seed(seed + 1)`` on every ddim job, masked or not, which raises "Overflow
    when unpacking long long" at seed 2**64 - 1. The stock KSampler fails there, so this job is refused the
    same way, but before anything starts and with the way out.
    """
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed} is outside KSampler's range 0..{MAX_SEED}")
    if sampler == "ddim" and seed == MAX_SEED:
        raise ValueError(f"seed {seed} with sampler ddim: ComfyUI's ddim draws its inpainting noise from seed + 1, "
                         f"which overflows torch's 64-bit seed (the stock KSampler fails on it too); use a seed "
                         f"up to {MAX_SEED - 1}")


@dataclass(frozen=True)
class ParallelConfig:
    """How one image is spread over the ranks of a group."""

    strategy: str = "pipefusion"
    """serial | pipefusion | distrifusion | naive_patch | auto (the group picks the fastest plan that fits per
    job: parallel/planner.py)."""
    world_size: int = 1
    """Number of ranks (one per GPU, or CPU processes)."""
    patches: int = 0
    """PipeFusion's M: number of token-row bands per image; 0 means the default (= world_size)."""
    warmup_steps: int = 1
    """Synchronous full-image steps before the asynchronous (stale K/V) steps start; at least 1."""
    stage_split: tuple[int, ...] | None = None
    """PipeFusion only: number of blocks per stage, in block order; None splits by ``balance``."""
    text_stream: str = "last_patch"
    """PipeFusion's text-token scheme (see parallel/pipefusion.py)."""
    balance: str = "compute"
    """PipeFusion's automatic split: 'compute' (equal work per stage: fastest) or 'memory' (equal
    parameter bytes per stage: for models that only fit when spread evenly)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.text_stream not in TEXT_STREAMS:
            raise ValueError(f"unknown text_stream {self.text_stream!r}: choose one of {', '.join(TEXT_STREAMS)}")
        if self.balance not in BALANCES:
            raise ValueError(f"unknown balance {self.balance!r}: choose one of {', '.join(BALANCES)}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if self.strategy == "serial" and self.world_size != 1:
            raise ValueError(f"strategy 'serial' runs on exactly 1 rank, got world_size {self.world_size}")
        if self.strategy not in ("serial", "auto") and self.world_size < 2:
            raise ValueError(
                f"strategy {self.strategy!r} needs at least 2 ranks, got world_size {self.world_size}; "
                "use strategy 'serial' on a single device")
        if self.patches < 0:
            raise ValueError(f"patches must be 0 (default) or positive, got {self.patches}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1 (it fills the K/V buffers), got {self.warmup_steps}")
        if self.strategy == "auto" and self.patches:
            raise ValueError(f"patches {self.patches} with strategy 'auto': auto picks the patches per job; "
                             "set patches 0, or choose pipefusion")
        if self.stage_split is not None:
            if self.strategy != "pipefusion":
                raise ValueError(f"stage_split applies to pipefusion only, not {self.strategy!r}")
            if len(self.stage_split) != self.world_size or min(self.stage_split) < 1:
                raise ValueError(
                    f"stage_split {list(self.stage_split)} must give at least 1 block to each of the "
                    f"{self.world_size} stages")

    @property
    def num_patches(self) -> int:
        """M as used by the strategy: distrifusion and naive_patch use one band per rank."""
        if self.strategy == "pipefusion":
            return self.patches or self.world_size
        if self.strategy == "serial":
            return 1
        return self.world_size  # distrifusion, naive_patch; auto: at least one band per rank

    def check_image(self, token_rows: int) -> None:
        """Raise if the image has too few token rows for the bands; before any worker starts."""
        m = self.num_patches
        if m > token_rows:
            raise ValueError(
                f"{m} patches ({self.strategy}) need at least {m} token rows, but the image has only "
                f"{token_rows} (height/16); use at most {token_rows} patches/ranks or a taller image")

    def check_model(self, num_blocks: int) -> None:
        """Raise if the model has too few blocks for the stages; before any worker starts."""
        if self.strategy != "pipefusion":
            return
        if self.world_size > num_blocks:
            raise ValueError(
                f"pipefusion with {self.world_size} stages needs at least {self.world_size} blocks, "
                f"the model has {num_blocks}; use at most {num_blocks} ranks")
        if self.stage_split is not None and sum(self.stage_split) != num_blocks:
            raise ValueError(
                f"stage_split {list(self.stage_split)} covers {sum(self.stage_split)} blocks, "
                f"the model has {num_blocks}")


@dataclass(frozen=True)
class SampleSpec:
    """What to sample: size, steps, seed and the sampler."""

    height: int = 256
    """Image height in pixels, multiple of 16 (Flux packs 2x2 latent pixels of 8x8 image pixels)."""
    width: int = 256
    """Image width in pixels, multiple of 16."""
    steps: int = 8
    """Denoising steps, at least 1."""
    seed: int = 0
    """Seed of the initial noise, as ComfyUI's KSampler uses it."""
    sampler: str | type = "euler"
    """One of ComfyUI's samplers in SAMPLERS, or a ``sampling.base.Sampler`` subclass itself (the tests' own
    samplers, e.g. tests/frozen_sampler.py; the worker resolves their names with ``--test-samplers``)."""
    scheduler: str = "simple"
    """One of ComfyUI's schedulers in SCHEDULERS."""
    denoise: float = 1.0
    """Fraction of the schedule to run (img2img below 1), as ComfyUI's KSampler."""
    cfg: float = 1.0
    """Classifier-free guidance scale; 1 skips the negative pass (Flux uses its distilled guidance)."""
    batch: int = 1
    """Images per job."""
    dtype: str = "float32"
    """Compute dtype of the transformer."""
    guidance: float = 3.5
    """Flux distilled guidance (used when the model has a guidance embedding)."""
    shift: float | None = None
    """Time shift of the flow families (ModelSamplingFlux / ModelSamplingSD3); None: what ComfyUI's stock
    loader uses for the model (Flux.1-dev 1.15, schnell 1, SD3 3)."""

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < 16 or v % 16:
                raise ValueError(f"{name} {v} must be a positive multiple of 16 (e.g. {max(16, v // 16 * 16)})")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        check_seed(self.seed, self.sampler)
        if not isinstance(self.sampler, type) and self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not implemented: choose one of {', '.join(SAMPLERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} is not implemented: choose one of {', '.join(SCHEDULERS)}")
        if not 0.0 < self.denoise <= 1.0:
            raise ValueError(f"denoise {self.denoise} must be in (0, 1]: 1 samples from pure noise, 0.6 keeps "
                             "more of the input latent; 0 would not sample at all")
        if self.cfg < 0:
            raise ValueError(f"cfg {self.cfg} must not be negative (1 disables classifier-free guidance)")
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown: choose one of {', '.join(DTYPES)}")

    @property
    def token_rows(self) -> int:
        return self.height // 16

    @property
    def token_cols(self) -> int:
        return self.width // 16
