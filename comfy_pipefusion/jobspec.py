"""The job: what one sampling request asks of a worker group, as a frozen value and as its JSON wire form.

A ``Job`` is built by the nodes (nodes/handle.py), the benchmark's and tools' job files and the tests; it
travels as ``to_wire()`` (JSON values only: the launcher's control socket, a job file) and a rank reads it
back with ``from_wire()``, which validates it once and names the field at fault. Its tensors (text states,
latent, noise, mask ...) travel beside it in shared memory or a safetensors file, under the names of
``TensorKey``. ``Problem`` (job.py) is what a rank makes of a Job and its tensors.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from enum import StrEnum

from .adapters.apply import LoraSpec
from .config import ParallelConfig, SampleSpec
from .models import family
from .models.references import METHODS
from .parallel.plan import ModelSource


class TensorKey(StrEnum):
    """The names of a job's tensors (shared-memory segments, job-file tensors)."""

    TXT = "txt"  # [B, S_txt, width] text-encoder states of the positive prompt
    POOLED = "pooled"  # [B, P] pooled text vector (families with one)
    NEG_TXT = "neg_txt"  # the negative prompt's, with cfg != 1
    NEG_POOLED = "neg_pooled"
    MID_TXT = "mid_txt"  # the middle conditioning's (DualCFGGuider's cond2), with sample.cfg_middle
    MID_POOLED = "mid_pooled"
    LATENT = "latent"  # [B, C, H/8, W/8] the input LATENT's samples (img2img, inpainting)
    NOISE = "noise"  # [B, C, H/8, W/8] ComfyUI's noise for the seed
    MASK = "mask"  # the LATENT's noise mask as KSampler shapes it
    REF = "ref"  # ref0, ref1, ...: [B, C, h, w] reference LATENTs (ReferenceLatent: Kontext), a prefix
    NEG_REF = "neg_ref"  # neg_ref0, ...: the negative's, with cfg != 1
    MID_REF = "mid_ref"  # mid_ref0, ...: the middle's, with sample.cfg_middle
    SIGMAS = "sigmas"  # [steps + 1] ComfyUI's own schedule (the MODEL path), used instead of the scheduler's
    OUT = "out"  # the segment the sampled LATENT is written into (rank 0)
    PREVIEW = "preview"  # [K, S_img, 4C] each step's x0 for live previews (preview.py), when wanted
    PREVIEW_STAMP = "preview_stamp"  # [world] int64: the steps each rank has written into PREVIEW


OUTPUT_KEYS = frozenset({TensorKey.OUT.value, TensorKey.PREVIEW.value, TensorKey.PREVIEW_STAMP.value})
INPUT_KEYS = frozenset(k.value for k in TensorKey) - OUTPUT_KEYS - {TensorKey.REF.value, TensorKey.NEG_REF.value,
                                                                     TensorKey.MID_REF.value}
"""Tensors a job may bring by exact name; references come as ref<i> / neg_ref<i> / mid_ref<i> (REFERENCE_KEY)."""
REFERENCE_KEY = re.compile(r"(neg_|mid_)?ref\d{1,2}")
"""The names of reference latents: the REF, NEG_REF and MID_REF prefixes with the reference's index."""
_WIRE = ("name", "model", "model_stamp", "parallel", "sample", "text_tokens", "repeats", "warmup_runs",
         "tensors_file", "adapters", "predict", "weight_update", "peer", "reference_method")
_PRESET_DEFAULTS = ("height", "width", "steps")  # a preset's sample defaults, where the job gives none


@dataclass(frozen=True)
class Job:
    """One sampling job of a group: the model, the whole parallel plan and the sample spec."""

    model: ModelSource
    """Where the weights come from: a checkpoint file or a built-in preset."""
    parallel: ParallelConfig
    """The plan, its ``world_size`` that of the group that runs it."""
    sample: SampleSpec
    """What to sample."""
    name: str = ""
    """A job file's name for the job (its result files); empty for the launcher's jobs."""
    model_stamp: str | None = None
    """The checkpoint file's size, time and inode when the loader ran: a new stamp reads the file again."""
    text_tokens: int = 64
    """Synthetic conditioning's text length (a job without tensors: the benchmark)."""
    repeats: int = 1
    """Job files: timed runs of the job."""
    warmup_runs: int = 0
    """Job files: untimed runs before the timed ones where the process has not run this plan yet (its first
    runs of a plan are slower: the bench measured up to 40%)."""
    tensors_file: str | None = None
    """Job files: a safetensors file with the job's tensors (TensorKey names), e.g. the demo's prompts."""
    adapters: tuple[LoraSpec, ...] = ()
    """LoRAs in order, each rank applying them to its own stage (adapters/); () = the model's own weights."""
    predict: bool = False
    """The simulator's wall time for this plan beside the measured one (the bench; strategy 'auto' always
    predicts): the group probes its blocks and links for it (autoplan.py)."""
    weight_update: str | None = None
    """A safetensors file with some of the model's weights in its checkpoint's layout (those a LoRA change on
    the MODEL path touched): the ranks overwrite them in place on the weights they hold."""
    peer: str | None = None
    """The benchmark's peer rows: another tool's method on the same model (peers.py) instead of ours."""
    reference_method: str | None = None
    """How reference latents are placed (ComfyUI's reference_latents_method: offset, index, uxo); None: the
    family's default."""

    def __post_init__(self) -> None:
        self.parallel.check_job(self.sample.cfg, self.sample.branches)  # a CFG plan needs exactly two branches
        if self.text_tokens < 1:
            raise ValueError(f"job {self.name!r}: text_tokens must be at least 1, got {self.text_tokens}")
        if self.repeats < 1 or self.warmup_runs < 0:
            raise ValueError(f"job {self.name!r}: repeats must be at least 1 and warmup_runs at least 0, got "
                             f"{self.repeats} and {self.warmup_runs}")
        if self.reference_method is not None and self.reference_method not in METHODS:
            raise ValueError(f"job {self.name!r}: reference_method {self.reference_method!r} is unknown; choose "
                             f"one of {', '.join(METHODS)}")

    def to_wire(self) -> dict:
        """The JSON form (lists, not tuples; a test sampler by its name)."""
        par = dataclasses.asdict(self.parallel)
        if par["stage_split"] is not None:
            par["stage_split"] = list(par["stage_split"])
        sample = dataclasses.asdict(self.sample)
        if isinstance(self.sample.sampler, type):
            sample["sampler"] = self.sample.sampler.name
        model = {k: v for k, v in dataclasses.asdict(self.model).items() if v is not None}
        return {"name": self.name, "model": model, "model_stamp": self.model_stamp, "parallel": par,
                "sample": sample, "text_tokens": self.text_tokens, "repeats": self.repeats,
                "warmup_runs": self.warmup_runs, "tensors_file": self.tensors_file,
                "adapters": [dataclasses.asdict(a) for a in self.adapters],
                "predict": self.predict, "weight_update": self.weight_update, "peer": self.peer,
                "reference_method": self.reference_method}

    @classmethod
    def from_wire(cls, wire: dict, world_size: int | None = None, samplers: dict | None = None) -> "Job":
        """Read and validate a job's JSON. ``world_size``: the group's; a job that gives none gets it, one
        that asks for another is refused. ``samplers``: test samplers by name (the worker's
        ``--test-samplers``), which ``sample.sampler`` may name besides the production ones."""
        if not isinstance(wire, dict):
            raise ValueError(f"a job is a JSON object, got {type(wire).__name__}")
        name = str(wire.get("name") or "")
        _known(wire, _WIRE, f"job {name!r}")
        model = _section(wire, "model", name)
        _known(model, ("preset", "checkpoint", "seed"), f"field model of job {name!r}")
        source = _build(ModelSource, model, "model", name)
        par = _section(wire, "parallel", name)
        _known(par, tuple(f.name for f in dataclasses.fields(ParallelConfig)), f"field parallel of job {name!r}")
        if isinstance(par.get("stage_split"), list):  # JSON carries a list
            par["stage_split"] = tuple(par["stage_split"])
        asked = par.pop("world_size", None)
        if world_size is not None and asked is not None and asked != world_size:
            raise ValueError(f"job {name!r} asks for world_size {asked} but the group has {world_size} ranks; "
                             f"start the group with {asked} ranks")
        size = world_size if world_size is not None else asked
        cfg = _build(ParallelConfig, par if size is None else {**par, "world_size": size}, "parallel", name)
        sample = _section(wire, "sample", name)
        _known(sample, tuple(f.name for f in dataclasses.fields(SampleSpec)), f"field sample of job {name!r}")
        if samplers and sample.get("sampler") in samplers:
            sample["sampler"] = samplers[sample["sampler"]]
        if source.preset:
            preset = family.find_preset(source.preset)[1]
            sample = {**{k: preset[k] for k in _PRESET_DEFAULTS}, **sample}
        extra = {k: wire[k] for k in ("model_stamp", "text_tokens", "repeats", "warmup_runs", "tensors_file",
                                      "predict", "weight_update", "peer", "reference_method")
                 if wire.get(k) is not None}
        if not isinstance(extra.get("predict", False), bool):
            raise ValueError(f"job {name!r}: predict must be true or false, got {extra['predict']!r}")
        if not isinstance(extra.get("weight_update", ""), str):
            raise ValueError(f"job {name!r}: weight_update must be a file path, got {extra['weight_update']!r}")
        for k in ("text_tokens", "repeats", "warmup_runs"):
            if k in extra and not isinstance(extra[k], int):
                raise ValueError(f"job {name!r}: {k} must be an integer, got {extra[k]!r}")
        adapters = wire.get("adapters") or []
        if not isinstance(adapters, list) or not all(isinstance(a, dict) for a in adapters):
            raise ValueError(f"job {name!r}: field adapters must be a list of objects, got {adapters!r}")
        for a in adapters:
            _known(a, tuple(f.name for f in dataclasses.fields(LoraSpec)), f"an adapter of job {name!r}")
        extra["adapters"] = tuple(_build(LoraSpec, a, "adapters", name) for a in adapters)
        return cls(model=source, parallel=cfg, sample=_build(SampleSpec, sample, "sample", name), name=name, **extra)


def _section(wire: dict, key: str, name: str) -> dict:
    value = wire.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"job {name!r}: field {key} must be a JSON object, got {type(value).__name__}")
    return dict(value)


def _known(d: dict, fields: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {', '.join(unknown)}; the keys are {', '.join(fields)}")


def _build(kind: type, values: dict, key: str, name: str):
    """``kind(**values)``; a value of the wrong JSON type (a string for a number ...) names the field."""
    try:
        return kind(**values)
    except TypeError as exc:
        raise ValueError(f"job {name!r}: field {key} has a value of the wrong type ({exc}); "
                         f"it was {values}") from None
