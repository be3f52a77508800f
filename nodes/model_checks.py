"""What the worker group can honour of a ComfyUI MODEL, its guider and its sampler; everything else is refused
before sampling with a message that names it. ComfyUI's objects are read, never changed."""
from __future__ import annotations

import math
from dataclasses import dataclass

WRAPPER_KEY = "pipefusion"  # our OUTER_SAMPLE wrapper's key on the MODEL
REFERENCE_KEYS = ("reference_latents", "reference_latents_method")  # ReferenceLatent (Flux.1 Kontext)
# Conditioning keys the group uses or that carry nothing for it; any other (area, mask, strength, ControlNet,
# GLIGEN, hooks, timestep ranges, ...) is refused by name. prompt_type (DualCFGGuider marks its middle "negative")
# is read by ComfyUI's SDXL refiner alone.
COND_KEYS = {"cross_attn", "pooled_output", "guidance", "model_conds", "uuid", "prompt_type", *REFERENCE_KEYS}
# model_options keys that change nothing the group computes
NEUTRAL_OPTIONS = {"transformer_options"}
NEUTRAL_TRANSFORMER_OPTIONS = {"wrappers", "callbacks"}


class Refused(ValueError):
    """Something the worker group cannot honour; the message names it and the way out."""


def check_model(patcher) -> None:
    """Refuse model patches that are not weight patches: attention replacements, block patches, model
    function wrappers, CFG functions, other wrappers and callbacks, object patches other than the model
    sampling (ModelSamplingFlux / ModelSamplingSD3), additional models and hooks."""
    opts = patcher.model_options
    found = [f"model option {k!r}" for k in opts if k not in NEUTRAL_OPTIONS]
    tr = opts.get("transformer_options", {})
    found += [f"transformer option {k!r}" + (f" ({', '.join(map(str, tr[k]))})" if isinstance(tr[k], dict) else "")
              for k in tr if k not in NEUTRAL_TRANSFORMER_OPTIONS and tr[k]]
    for kind, source in (("wrapper", _merged(patcher.wrappers, tr.get("wrappers"))),
                         ("callback", _merged(patcher.callbacks, tr.get("callbacks")))):
        for wtype, by_key in source.items():
            found += [f"{kind} {wtype!r} from {key!r}" for key, fns in by_key.items()
                      if fns and not (kind == "wrapper" and key == WRAPPER_KEY)]
    found += [f"object patch {k!r}" for k in patcher.object_patches if k != "model_sampling"]
    found += [f"additional model {k!r}" for k, v in getattr(patcher, "additional_models", {}).items() if v]
    found += [f"injection {k!r}" for k, v in getattr(patcher, "injections", {}).items() if v]
    found += ["hook patches" for v in getattr(patcher, "hook_patches", {}).values() if v][:1]
    found += [f"weight wrapper on {k!r}" for k, v in getattr(patcher, "weight_wrapper_patches", {}).items() if v][:3]
    if found:
        raise Refused(f"the MODEL carries {'; '.join(sorted(set(found)))}, which the worker group cannot apply "
                      "(it runs the model's weights, with weight patches such as LoRAs, and nothing else); "
                      "remove the node that adds it, or sample without PipeFusion Parallelize")


def check_pixart_positions(patcher, config: dict) -> None:
    """ComfyUI's PixArt scales its sin-cos positions by ``pe_interpolation``, read at load from the file's
    pos_embed table (sample size // 64), or computed per image when the file has none; the ranks take it from
    the file they read, and ComfyUI's state dict no longer carries that table (so: a 1024 model's, 2).
    Refused where the two differ, rather than sampling other positions than ComfyUI's."""
    net = getattr(patcher.model, "diffusion_model", None)
    theirs = getattr(net, "pe_interpolation", None)
    ours = config.get("interpolation_scale") or max(int(config.get("sample_size", 128)) // 64, 1)
    if getattr(net, "pe_precision", None) is None and theirs is not None and float(theirs) == float(ours):
        return
    said = f"by {theirs:g}" if theirs is not None else "by a factor computed per image"
    raise Refused(f"this PixArt model scales its positions {said} in ComfyUI, and the worker group would scale "
                  f"them by {ours:g} (a 1024 model's): only PixArt models trained at 1024 run on PipeFusion "
                  "Parallelize yet; use the PipeFusion DiT Loader and PipeFusion KSampler for this one")


def _merged(*sources) -> dict:
    out: dict = {}
    for src in sources:
        for wtype, by_key in (src or {}).items():
            for key, fns in (by_key or {}).items():
                out.setdefault(wtype, {}).setdefault(key, []).extend(fns or [])
    return out


@dataclass(frozen=True)
class Guidance:
    """What a stock guider asks of the group: its conditionings (each the [[tensor, extras]] list a
    CONDITIONING is) and scales, as SampleSpec takes them (``sample``)."""

    positive: list
    negative: list | None
    cfg: float
    middle: list | None = None  # DualCFGGuider's cond2, when it runs three branches
    cfg_middle: float | None = None  # its cfg_cond2_negative then
    style: str = "regular"

    @property
    def sample(self) -> dict:
        return {"cfg": self.cfg, "cfg_middle": self.cfg_middle, "cfg_style": self.style}


def guider_conds(guider) -> Guidance:
    """The conditionings and scales of a stock CFGGuider, BasicGuider or DualCFGGuider; any other guider is
    refused by name."""
    import comfy.samplers

    kind = type(guider)
    names = set(guider.conds)
    stock = kind.__mro__[1] is comfy.samplers.CFGGuider and kind.__module__.endswith("nodes_custom_sampler")
    if stock and kind.__name__ == "Guider_DualCFG":
        return _dual(guider, names)
    if kind is comfy.samplers.CFGGuider or (stock and kind.__name__ == "Guider_Basic"):
        if not names <= {"positive", "negative"} or "positive" not in names:
            raise Refused(f"the guider has conditionings {sorted(names)}; only positive and negative are supported")
    else:
        raise Refused(f"guider {kind.__module__}.{kind.__name__} is not supported by the worker group (it runs the "
                      "stock CFGGuider, BasicGuider and DualCFGGuider); use one of those")
    cfg = float(getattr(guider, "cfg", 1.0))
    positive = _as_conditioning(guider.conds["positive"], "positive")
    negative = _as_conditioning(guider.conds["negative"], "negative") if "negative" in names else None
    return Guidance(positive, negative, cfg)


def _dual(guider, names: set) -> Guidance:
    """DualCFGGuider (ComfyUI's Guider_DualCFG: cond1 the positive, cond2 the middle, cfg1 = cfg_conds,
    cfg2 = cfg_cond2_negative, style regular or nested). Its regular style skips the negative's pass when
    cfg2 is 1 (leaving CFG of the positive over the middle) and the middle's too when cfg1 is also 1, exactly
    as here, so those run as the two- and one-branch jobs they are."""
    if names != {"positive", "middle", "negative"}:
        raise Refused(f"DualCFGGuider has conditionings {sorted(names)}; it needs cond1, cond2 and negative")
    cfg1, cfg2, nested = float(guider.cfg1), float(guider.cfg2), bool(getattr(guider, "nested", False))
    conds = {k: _as_conditioning(guider.conds[k], k) for k in ("positive", "middle", "negative")}
    if not nested and math.isclose(cfg2, 1.0):
        if math.isclose(cfg1, 1.0):
            return Guidance(conds["positive"], None, 1.0)
        return Guidance(conds["positive"], conds["middle"], cfg1)  # the middle as CFG's negative
    return Guidance(conds["positive"], conds["negative"], cfg1, conds["middle"], cfg2,
                    "nested" if nested else "regular")


def _as_conditioning(conds: list, which: str) -> list:
    """ComfyUI's converted conds (dicts with cross_attn) back to a CONDITIONING, refusing what we cannot run."""
    if len(conds) != 1:
        raise Refused(f"{which} conditioning has {len(conds)} entries (combined or concatenated conditioning); "
                      "the worker group takes a single conditioning per prompt")
    c = conds[0]
    extra = sorted(k for k, v in c.items() if k not in COND_KEYS and v is not None)
    if extra:
        raise Refused(f"{which} conditioning carries {', '.join(extra)} (area, mask, ControlNet, timestep range "
                      "or other per-conditioning settings), which the worker group does not apply; remove the "
                      "node that sets it, or sample without PipeFusion Parallelize")
    if c.get("model_conds"):
        raise Refused(f"{which} conditioning carries model inputs {sorted(c['model_conds'])}, which the worker "
                      "group does not take")
    return [[c["cross_attn"], {k: v for k, v in c.items() if k in ("pooled_output", "guidance", *REFERENCE_KEYS)}]]


def sampler_name(sampler) -> str:
    """Our name for a stock ComfyUI sampler object (KSAMPLER, from KSampler, KSamplerSelect, ...), by its
    sampler function; any other sampler, or one with options, is refused by name."""
    import comfy.k_diffusion.sampling as kd
    import comfy.samplers
    from comfy_pipefusion.config import SAMPLERS

    if type(sampler) is not comfy.samplers.KSAMPLER:
        kind = type(sampler)
        raise Refused(f"sampler {kind.__module__}.{kind.__name__} is not a stock ComfyUI sampler; the worker group "
                      f"runs ComfyUI's own ({', '.join(SAMPLERS)}): choose one with KSamplerSelect")
    fn = sampler.sampler_function
    name = None
    for ours in SAMPLERS:
        if ours == "uni_pc":
            import comfy.extra_samplers.uni_pc as up

            if fn is up.sample_unipc:
                name = ours
        elif ours != "ddim" and fn is getattr(kd, f"sample_{ours}", None):
            name = ours
    inpaint = dict(sampler.inpaint_options or {})
    if name == "euler" and inpaint.get("random"):
        name, inpaint = "ddim", {}  # ComfyUI's ddim is euler with its own noise for the masked area
    if name is None:
        label = getattr(fn, "__name__", type(fn).__name__)
        raise Refused(f"sampler function {label} is not implemented by the worker group; choose one of "
                      f"{', '.join(SAMPLERS)}")
    if sampler.extra_options or inpaint:
        raise Refused(f"sampler {name} with options {sorted({**sampler.extra_options, **inpaint})} is not "
                      "supported; use it with its defaults (KSamplerSelect)")
    return name
