"""Applying LoRA files to one rank's stage: each rank reads from each file only the entries whose targets it
holds, applies them in the order given (several files, any strengths, as ComfyUI chains LoraLoader nodes),
and keeps the original of every weight it changed, so that a new list of adapters (another strength, one more
or one less) restores and re-patches only the affected weights: no reload, the group stays warm.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from safetensors import safe_open

from ..models.keymap import KeyMap
from . import kinds
from .keys import Target, aliases, owners

log = logging.getLogger("comfy_pipefusion.adapters")


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file at one strength; ``stamp`` (size, mtime) makes an edited file read again."""

    path: str
    strength: float
    stamp: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"a LoRA needs the path of its file, got {self.path!r}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise ValueError(f"LoRA {self.path}: strength must be a number, got {self.strength!r}")


def read_entries(path: str, names: dict[str, Target],
                 wanted=lambda target: True) -> list[tuple[Target, object, object]]:
    """(target, weight adapter, bias adapter) of every entry of ``path`` whose target ``wanted`` accepts,
    reading only those tensors. A file none of whose keys names a target of this model is refused."""
    groups: dict[str, list[tuple[str, str]]] = {}
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        for key in keys:
            parts = kinds.split_key(key)
            if parts is not None:
                groups.setdefault(parts[0], []).append((parts[1], key))
        known = {p: names[p] for p in groups if p in names}
        if not known:
            seen = ", ".join(sorted(groups)[:3]) or ", ".join(keys[:3])
            raise ValueError(f"LoRA {path}: none of its {len(keys)} keys targets a weight of this model (e.g. "
                             f"{seen}); is it a LoRA for another model family, or for the text encoder?")
        skipped = sorted(set(groups) - set(known))
        if skipped:  # as ComfyUI: entries for other parts (text encoders) are left out, with a word in the log
            log.warning("LoRA %s: %d entries target nothing of this model and are left out, e.g. %s", path,
                        len(skipped), skipped[0])
        out = []
        for prefix, target in known.items():
            if not wanted(target):
                continue
            parts = {suffix: f.get_tensor(key) for suffix, key in groups[prefix]}
            weight, bias = kinds.parse(parts)
            if weight is not None or bias is not None:
                out.append((target, weight, bias))
    return out


def _assemble(key: str, own: list, get) -> torch.Tensor:
    """Original tensor ``key`` from our tensors (float32) that hold its rows."""
    chunks = []
    for ours, spans in own:
        t = get(ours)
        for start, stop, row in spans:
            n = t.shape[0] if stop is None else stop - start
            chunks.append((start, t[row:row + n]))
    chunks.sort(key=lambda c: c[0])
    return torch.cat([c for _, c in chunks]) if len(chunks) > 1 else chunks[0][1].clone()


def _scatter(key: str, full: torch.Tensor, own: list, get, put) -> None:
    for ours, spans in own:
        t = get(ours).clone()
        for start, stop, row in spans:
            n = t.shape[0] if stop is None else stop - start
            t[row:row + n] = full[start:start + n]
        put(ours, t)


def patch(params: dict[str, torch.Tensor], kmap: KeyMap, loras: list[tuple[list, float]]) -> dict[str, torch.Tensor]:
    """Our key -> its patched value (float32) for every held weight the adapters change; ``params`` (this
    stage's tensors) is not modified. ``loras``: (entries of read_entries, strength) in order."""
    work: dict[str, torch.Tensor] = {}
    get = lambda k: work[k] if k in work else params[k].float()  # noqa: E731
    put = work.__setitem__
    own = owners(kmap)
    for entries, strength in loras:
        for target, weight, bias in entries:
            for ad, key in ((weight, target.key), (bias, target.key[:-len("weight")] + "bias")):
                if ad is None:
                    continue
                if target.where == "ours":
                    if key in params:
                        put(key, kinds.apply(get(key), ad, strength))
                    continue
                held = [o for o in own.get(key, []) if o[0] in params]
                if not held:
                    continue
                if len(held) != len(own[key]):
                    raise ValueError(f"{key} is split over two stages; a stage split must keep each block whole")
                full = _assemble(key, held, get)
                if target.rows is None:
                    full = kinds.apply(full, ad, strength)
                else:
                    r0, r1 = target.rows
                    full[r0:r1] = kinds.apply(full[r0:r1], ad, strength)
                _scatter(key, full, held, get, put)
    return work


class StageAdapters:
    """What one rank's stage has applied, and how to undo it: ``reread(keys)`` reads those weights from the
    checkpoint again (no memory kept: the lean path serves models larger than RAM), else the originals of
    the weights that changed are kept on the CPU (a built-in model has no file)."""

    def __init__(self, reread=None) -> None:
        self.applied: tuple[LoraSpec, ...] = ()
        self.reread = reread
        self.affected: set[str] = set()  # the weights the applied list changed
        self.originals: dict[str, torch.Tensor] = {}
        self._files: dict[tuple[str, str], list] = {}  # (path, stamp) -> entries this stage needs

    def sync(self, model: torch.nn.Module, kmap: KeyMap, family: str, width: int,
             wanted: tuple[LoraSpec, ...]) -> dict | None:
        """Make the stage's weights the model's with ``wanted`` applied; None when nothing changed, else
        {"seconds" (undo, read and patch), "weights" (changed), "original_bytes" (kept for the undo)}."""
        if tuple(wanted) == self.applied:
            return None
        start = time.perf_counter()
        if self.reread is not None and self.affected:  # back to the model's own weights
            self.reread(sorted(self.affected))
        params = {k: v for k, v in model.state_dict().items() if v.device.type != "meta"}
        for k, t in self.originals.items():
            params[k].copy_(t)
        self.applied, self.affected = (), set()  # until the new list is in place (a failed read: none applied)
        names = aliases(kmap, family, width)
        own = owners(kmap)

        def held(target: Target) -> bool:
            if target.where == "ours":
                return target.key in params
            return any(o in params for o, _ in own.get(target.key, []))
        loras = []
        for spec in wanted:
            if (spec.path, spec.stamp) not in self._files:
                self._files[spec.path, spec.stamp] = read_entries(spec.path, names, held)
            loras.append((self._files[spec.path, spec.stamp], spec.strength))
        self._files = {k: v for k, v in self._files.items() if any((s.path, s.stamp) == k for s in wanted)}
        patched = patch(params, kmap, loras)
        for k in [k for k in self.originals if k not in patched]:
            del self.originals[k]
        for k, t in patched.items():
            if self.reread is None and k not in self.originals:
                self.originals[k] = params[k].detach().to("cpu", copy=True)
            params[k].copy_(t.to(params[k].dtype))
        self.applied, self.affected = tuple(wanted), set(patched)
        return {"seconds": time.perf_counter() - start, "weights": len(patched),
                "original_bytes": sum(t.numel() * t.element_size() for t in self.originals.values())}


def sync_model(model: torch.nn.Module, family: str, config: dict, wanted: tuple[LoraSpec, ...],
               reread=None) -> dict | None:
    """The job's adapters (in order) on this rank's stage ``model``; its StageAdapters live on the model
    object, so they go with it when the cache drops it. ``reread(keys)``: see StageAdapters."""
    from ..models.checkpoint import ORIGINAL_MAPS

    state = model.__dict__.get("pipefusion_adapters")
    if state is None:
        if not wanted:
            return None
        state = model.__dict__["pipefusion_adapters"] = StageAdapters(reread)
    width = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    return state.sync(model, ORIGINAL_MAPS[family](config), family, width, tuple(wanted))
