"""Frozen, validated configuration for one parallel sampling job.

Every check raises ``ValueError`` whose message names the numbers involved and the fix, so that a bad
setting is refused before any process group starts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

STRATEGIES = ("serial", "pipefusion", "distrifusion", "naive_patch", "cfg", "ulysses", "cfg+ulysses",
              "cfg+pipefusion", "cfg+distrifusion", "ulysses+pipefusion", "ulysses+distrifusion",
              "cfg+ulysses+pipefusion", "cfg+ulysses+distrifusion", "auto")
"""Every strategy a plan may name: the single methods, then the hybrids (methods joined by '+', outermost
first: CFG halves, then what runs inside each half), and auto (the group picks the plan per job)."""
METHOD_ORDER = ("cfg", "ulysses", "pipefusion", "distrifusion", "naive_patch", "serial")
TEXT_STREAMS = ("last_patch", "first_patch", "every_patch")
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "uni_pc",
            "lcm")
SCHEDULERS = ("simple", "normal", "karras", "exponential", "sgm_uniform", "beta", "ddim_uniform",
              "linear_quadratic")
BALANCES = ("compute", "memory")
DTYPES = ("float32", "bfloat16", "float16")
GUIDE_STYLES = ("regular", "nested")  # DualCFGGuider's styles (ComfyUI's Guider_DualCFG)
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
    """The plan: how one image is spread over the ranks of a group.

    ``strategy`` names one method or a hybrid (``cfg+pipefusion``). The degrees multiply to the world size:
    ``cfg_degree`` (2 when the positive and negative branches run on two halves of the group, else 1) x
    ``ulysses_degree`` (ranks sharing each attention by heads) x ``stages`` (ranks of the patch method:
    PipeFusion's stages, DistriFusion's bands). Rank r sits at ``coords(r)`` = (branch, stage, ulysses
    rank), the CFG branch outermost. The bench, the nodes and the worker pass this one value.
    """

    strategy: str = "pipefusion"
    """serial | pipefusion | distrifusion | naive_patch | cfg | ulysses, a hybrid in STRATEGIES, or auto (the
    group picks the fastest plan that fits per job: parallel/planner.py)."""
    world_size: int = 1
    """Number of ranks (one per GPU, or CPU processes)."""
    patches: int = 0
    """PipeFusion's M: number of token-row bands per image; 0 means the default (= its stages)."""
    warmup_steps: int = 1
    """Synchronous full-image steps before the asynchronous (stale K/V) steps start; at least 1."""
    stage_split: tuple[int, ...] | None = None
    """PipeFusion only: number of blocks per stage, in block order; None splits by ``balance``."""
    text_stream: str = "last_patch"
    """PipeFusion's text-token scheme (see parallel/pipefusion.py)."""
    balance: str = "compute"
    """PipeFusion's automatic split: 'compute' (equal work per stage: fastest) or 'memory' (equal
    parameter bytes per stage: for models that only fit when spread evenly)."""
    ulysses: int = 0
    """Ulysses degree (ranks that split each attention's heads); 0: every rank of a CFG branch for Ulysses
    alone, 2 inside a patch method (``ulysses+pipefusion``: each stage on that many ranks). Only with
    'ulysses' in the strategy."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}"
                             + _hybrid_hint(self.strategy))
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
        self._check_degrees()
        if self.patches < 0:
            raise ValueError(f"patches must be 0 (default) or positive, got {self.patches}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1 (it fills the K/V buffers), got {self.warmup_steps}")
        if self.strategy == "auto" and self.patches:
            raise ValueError(f"patches {self.patches} with strategy 'auto': auto picks the patches per job; "
                             "set patches 0, or choose pipefusion")
        if self.stage_split is not None:
            if self.patch_method != "pipefusion":
                raise ValueError(f"stage_split applies to pipefusion only, not {self.strategy!r}")
            if len(self.stage_split) != self.stages or min(self.stage_split) < 1:
                raise ValueError(
                    f"stage_split {list(self.stage_split)} must give at least 1 block to each of the "
                    f"{self.stages} stages")

    def _check_degrees(self) -> None:
        w, methods = self.world_size, self.methods
        if self.ulysses < 0:
            raise ValueError(f"ulysses degree must be 0 (all ranks of a branch) or positive, got {self.ulysses}")
        if self.ulysses and "ulysses" not in methods:
            raise ValueError(f"ulysses degree {self.ulysses} given but strategy {self.strategy!r} has no "
                             "ulysses; use strategy 'ulysses' or 'cfg+ulysses', or leave ulysses at 0")
        if "cfg" in methods and w % 2:
            raise ValueError(f"{self.strategy} runs the positive and negative branches on two halves of the "
                             f"group: world_size {w} is odd; use {w - 1} or {w + 1} ranks")
        branch = w // self.cfg_degree
        if self.strategy == "cfg" and branch != 1:
            raise ValueError(f"cfg on {w} ranks leaves {branch} ranks per branch with nothing to split them: "
                             f"use cfg+pipefusion, cfg+distrifusion or cfg+ulysses on {w} ranks, or cfg on 2")
        if "cfg" in methods and len(methods) > 1 and branch < 2:
            raise ValueError(f"{self.strategy} on {w} ranks leaves {branch} rank per branch for "
                             f"{'+'.join(methods[1:])}, which needs at least 2: use {2 * w} ranks, or strategy "
                             "'cfg'")
        if self.ulysses and self.ulysses != branch and self.patch_method == "serial":
            raise ValueError(f"world_size {w} != cfg {self.cfg_degree} x ulysses {self.ulysses}: Ulysses takes "
                             f"every rank of a branch ({branch}); set ulysses to {branch} or 0")
        if "ulysses" in methods and self.patch_method != "serial":
            u = self.ulysses_degree
            if u < 2 or branch % u or branch // u < 2:
                fits = [d for d in range(2, branch // 2 + 1) if branch % d == 0]
                raise ValueError(
                    f"{self.strategy} on {w} ranks: world_size {w} != cfg {self.cfg_degree} x ulysses {u} x "
                    f"{self.patch_method} ranks (at least 2); "
                    + (f"set ulysses to {' or '.join(map(str, fits))}" if fits else
                       f"{branch} ranks per branch do not factor into ulysses x {self.patch_method}: use "
                       f"{2 * self.cfg_degree * 2} ranks, or strategy {self.patch_method}"))

    # -- the plan's shape ------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        """The methods of the plan, outermost first (``cfg+pipefusion`` -> ('cfg', 'pipefusion'))."""
        return tuple(self.strategy.split("+"))

    @property
    def cfg_degree(self) -> int:
        """2 when the CFG branches run on two halves of the group, else 1."""
        return 2 if "cfg" in self.methods else 1

    @property
    def ulysses_degree(self) -> int:
        """Ranks that share each attention by heads (1: no Ulysses)."""
        if "ulysses" not in self.methods:
            return 1
        if self.ulysses:
            return self.ulysses
        return 2 if self.patch_method != "serial" else self.world_size // self.cfg_degree

    @property
    def patch_method(self) -> str:
        """What runs over the ranks of one branch and Ulysses lane: pipefusion, distrifusion, naive_patch,
        or serial (one rank, or Ulysses alone)."""
        rest = [m for m in self.methods if m not in ("cfg", "ulysses")]
        return rest[0] if rest else "serial"

    @property
    def stages(self) -> int:
        """Ranks of the patch method (PipeFusion's stages, DistriFusion's bands); 1 for serial."""
        return self.world_size // (self.cfg_degree * self.ulysses_degree)

    @property
    def branch_strategy(self) -> str:
        """The strategy each CFG branch runs on its half of the group (the whole plan without CFG)."""
        rest = [m for m in self.methods if m != "cfg"]
        return "+".join(rest) if rest else "serial"

    def branch(self) -> "ParallelConfig":
        """The plan of one CFG branch: this plan without CFG, on half the ranks (itself without CFG)."""
        if self.cfg_degree == 1:
            return self
        return replace(self, strategy=self.branch_strategy, world_size=self.world_size // 2)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(CFG branch, stage, Ulysses rank) of ``rank``; rank = (branch * stages + stage) * ulysses + u."""
        u = rank % self.ulysses_degree
        rest = rank // self.ulysses_degree
        return rest // self.stages, rest % self.stages, u

    def stage_of(self, rank: int) -> int:
        return self.coords(rank)[1]

    @property
    def num_patches(self) -> int:
        """M as used by the strategy: distrifusion and naive_patch use one band per rank, Ulysses one per
        rank of a branch."""
        if self.patch_method == "pipefusion":
            return self.patches or self.stages
        if self.patch_method == "serial":
            return self.ulysses_degree  # 1 without Ulysses
        return self.stages  # distrifusion (Ulysses inside: its bands), naive_patch; auto: a band per rank

    def check_image(self, token_rows: int, token_cols: int | None = None) -> None:
        """Raise if the image has too few token rows for the bands or, with Ulysses inside a patch method,
        a patch with fewer image tokens than the lanes that share it (``token_cols`` given: an image
        narrower than the Ulysses degree); before any worker starts."""
        m = self.num_patches
        if m > token_rows:
            raise ValueError(
                f"{m} patches ({self.strategy}) need at least {m} token rows, but the image has only "
                f"{token_rows} (height/16); use at most {token_rows} patches/ranks or a taller image")
        u = self.ulysses_degree
        if token_cols is None or u < 2 or self.patch_method == "serial":
            return
        rows = token_rows // m  # the shortest of the m bands (patches.split_even)
        if rows * token_cols < u:
            wide = -(-u // rows)
            raise ValueError(
                f"{self.strategy} shares each of its {m} patches among {u} Ulysses ranks, but the image is "
                f"{token_rows}x{token_cols} tokens (height/16 x width/16): its smallest patch has "
                f"{rows * token_cols} image tokens, fewer than {u}; use an image at least {16 * wide} pixels "
                f"wide, {'fewer patches, ' if self.patch_method == 'pipefusion' else ''}a Ulysses degree of at "
                f"most {rows * token_cols}, or another strategy")

    def check_model(self, num_blocks: int, heads: int | None = None) -> None:
        """Raise if the model has too few blocks for the stages, or fewer attention heads than the Ulysses
        degree (a degree that does not divide them splits them unevenly); before any worker starts."""
        u = self.ulysses_degree
        if heads is not None and heads < u:
            raise ValueError(f"{self.strategy} splits the model's {heads} attention heads over {u} ranks, but "
                             f"there are fewer heads than ranks; use a Ulysses degree of at most {heads}, or "
                             "another strategy")
        if self.patch_method != "pipefusion":
            return
        if self.stages > num_blocks:
            raise ValueError(
                f"pipefusion with {self.stages} stages needs at least {self.stages} blocks, "
                f"the model has {num_blocks}; use at most {num_blocks} stages")
        if self.stage_split is not None and sum(self.stage_split) != num_blocks:
            raise ValueError(
                f"stage_split {list(self.stage_split)} covers {sum(self.stage_split)} blocks, "
                f"the model has {num_blocks}")

    def check_job(self, cfg_scale: float, branches: int | None = None) -> None:
        """Raise if the plan needs what the job lacks: CFG parallelism needs a true-CFG job (cfg != 1) of
        exactly two branches (``branches``: the job's, SampleSpec.branches; None: from ``cfg_scale``)."""
        branches = branches if branches is not None else (2 if abs(cfg_scale - 1.0) > 1e-9 else 1)
        other = self.branch_strategy if self.branch_strategy != "serial" else "pipefusion"
        if self.cfg_degree == 2 and branches == 1:
            raise ValueError(f"strategy {self.strategy} runs the negative branch on half the ranks, but cfg "
                             f"{cfg_scale:g} has no negative branch; set cfg != 1 (true CFG) or use strategy "
                             f"{other}")
        if self.cfg_degree == 2 and branches > 2:
            raise ValueError(f"strategy {self.strategy} runs the two branches of CFG on two halves of the group, "
                             f"but this job has {branches} (DualCFGGuider: positive, middle and negative), which "
                             f"do not split evenly in two; use strategy {other} or auto (they carry all "
                             f"{branches} in one batch)")


def _hybrid_hint(strategy: str) -> str:
    """For an unknown strategy that is made of known methods: the spelling that exists, or what is missing."""
    parts = strategy.split("+")
    if len(parts) < 2 or not all(p in METHOD_ORDER for p in parts):
        return ""
    ordered = "+".join(sorted(parts, key=METHOD_ORDER.index))
    if ordered in STRATEGIES:
        return f" (write it outermost first: {ordered!r})"
    if "ulysses" in parts:
        return "; Ulysses combines with cfg, pipefusion and distrifusion only (e.g. ulysses+pipefusion)"
    return "; hybrids combine cfg with one of ulysses, pipefusion, distrifusion"


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
    cfg_middle: float | None = None
    """DualCFGGuider's ``cfg_cond2_negative``: the job has a third branch, the middle conditioning (ComfyUI's
    cond2), guided from the negative by this scale while ``cfg`` (its ``cfg_conds``) guides from the middle to
    the positive; None: plain CFG."""
    cfg_style: str = "regular"
    """How DualCFGGuider combines its two scales (its ``style``, GUIDE_STYLES): ``regular`` adds the two
    guidances, ``nested`` applies ``cfg_middle`` to the positive-vs-middle result."""

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
        if self.cfg_middle is not None and self.cfg_middle < 0:
            raise ValueError(f"cfg_middle {self.cfg_middle} must not be negative (DualCFGGuider's "
                             "cfg_cond2_negative; None for plain CFG)")
        if self.cfg_style not in GUIDE_STYLES:
            raise ValueError(f"cfg_style {self.cfg_style!r} unknown: choose one of {', '.join(GUIDE_STYLES)}")
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown: choose one of {', '.join(DTYPES)}")

    @property
    def branches(self) -> int:
        """Conditionings the model runs per image and evaluation: [positive; negative; middle] with a middle
        (DualCFGGuider), [positive; negative] under true CFG (cfg != 1), else the positive alone."""
        if self.cfg_middle is not None:
            return 3
        return 2 if abs(self.cfg - 1.0) > 1e-9 else 1

    @property
    def token_rows(self) -> int:
        return self.height // 16

    @property
    def token_cols(self) -> int:
        return self.width // 16
