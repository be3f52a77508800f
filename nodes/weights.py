"""The weights of a ComfyUI MODEL with its weight patches (LoRA, LoKr, ...) applied as ComfyUI applies them,
written for the worker group as a safetensors file in shared memory (/dev/shm).

ComfyUI's ModelPatcher computes a patched weight in ``patch_weight_to_device``: a float32 copy of the
stored weight, ``comfy.lora.calculate_weight`` over the key's patches, then stochastic rounding back to the
stored dtype (seeded by the key). ``patched_tensor`` makes the same calls on the CPU copy without touching
the model, one tensor at a time, so this process's memory grows by one tensor while the file is written.
The file is in the model's own key layout (ComfyUI's names are the original checkpoints' names), which the
ranks' checkpoint reader understands; each rank reads only its stage from it.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import secrets
import struct
from pathlib import Path

import torch

from comfy_pipefusion.transport import SHM_DIR, SHM_PREFIX, pid_namespace

PREFIX = "diffusion_model."
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL",
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
SCALES = ("weight_scale", "input_scale", "scale_weight", "scale_input")  # a quantised layer's scale tensors


def weight_keys(patcher) -> list[str]:
    """The transformer's state-dict keys (with ComfyUI's ``diffusion_model.`` prefix), in order."""
    return [k for k in patcher.model.state_dict().keys() if k.startswith(PREFIX)]


def _stored(patcher, key: str):
    """(weight as loaded, set_func, convert_func) of ``key``. Clones share their model's tensors, and a stock
    sampler may have patched them in place for its own MODEL: then the original is in the backup, a dict that
    every clone of the loader's ModelPatcher shares (ModelPatcher.clone)."""
    import comfy.model_patcher

    weight, set_func, convert_func = comfy.model_patcher.get_key_weight(patcher.model, key)
    if getattr(patcher.model, "current_weight_patches_uuid", None) is not None and key in patcher.backup:
        weight = patcher.backup[key].weight
    return weight, set_func, convert_func


def patched_tensor(patcher, key: str) -> torch.Tensor:
    """``key``'s weight as ComfyUI computes with it: its patches applied exactly as ModelPatcher's
    patch_weight_to_device applies them (on a CPU float32 copy; the model is left as it is). A quantised
    layer's patched weight is quantised again by the layer's own ``set_weight`` (its stochastic rounding, a
    new scale for a mixed-precision layer), as ComfyUI holds it; a mixed-precision result is then dequantised
    (the file carries float weights for those layers, and not their scales: ``_dropped_scales``)."""
    import comfy.float
    import comfy.lora
    import comfy.model_patcher

    weight, set_func, convert_func = _stored(patcher, key)
    if key not in patcher.patches:
        return _plain(weight, key)
    if _quantised(weight):  # its .to(float32) keeps it quantised: convert_func dequantises it
        temp = weight.detach()
    else:
        temp = weight.detach().to("cpu", torch.float32, copy=True)
    if convert_func is not None:
        temp = convert_func(temp, inplace=True)
    out = comfy.lora.calculate_weight(patcher.patches[key], temp, key)
    seed = comfy.model_patcher.string_to_seed(key)
    if set_func is None:
        return comfy.float.stochastic_rounding(out, weight.dtype, seed=seed)
    if "return_weight" not in inspect.signature(set_func).parameters:
        raise ValueError(f"weight {key} is quantised ({type(weight).__name__}) and carries patches, and this "
                         "ComfyUI's quantised layers cannot hand back a patched weight (set_weight has no "
                         "return_weight): update ComfyUI (0.3.75 or later) or load the model unquantised")
    return _plain(set_func(out, inplace_update=False, seed=seed, return_weight=True), key)


def _quantised(weight) -> bool:
    """A tensor subclass that stores its values encoded (ComfyUI's QuantizedTensor, ComfyUI-GGUF's tensors)."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter) and hasattr(weight, "dequantize")


def _plain(weight, key: str) -> torch.Tensor:
    """A weight as stored; a quantised tensor (ComfyUI's QuantizedTensor, ComfyUI-GGUF's) dequantised."""
    t = weight.detach()
    if _quantised(t):
        t = t.dequantize()
    if t.dtype not in ST_DTYPES:
        raise ValueError(f"weight {key} has dtype {t.dtype}, which the workers cannot read")
    return t.to("cpu")


def _dropped_scales(patcher, keys: list[str]) -> set[str]:
    """The scale tensors of the layers whose weights are written dequantised: the workers would scale the
    float weights again. ComfyUI's mixed-precision layers hold them as ``weight_scale`` / ``input_scale``."""
    out = set()
    for key in keys:
        if key.endswith(".weight") and _quantised(_stored(patcher, key)[0]):
            out.update(key[:-len("weight")] + s for s in SCALES)
    return out


def patch_fingerprints(patcher) -> dict[str, str]:
    """{key: what its patches are} for every patched key: the patch tensors' identity and the strengths. A
    LoRA whose strength changes, or one added or removed, changes exactly the keys it patches."""
    out = {}
    for key, patches in patcher.patches.items():
        if key.startswith(PREFIX):
            out[key] = hashlib.sha256(repr([_describe(p) for p in patches]).encode()).hexdigest()
    return out


def _describe(obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        sums = (float(t.float().sum()), float(t.float().abs().sum())) if t.is_floating_point() else ()
        return ("tensor", t.data_ptr(), tuple(t.shape), str(t.dtype), sums)
    if isinstance(obj, (list, tuple)):
        return tuple(_describe(o) for o in obj)
    if isinstance(obj, dict):
        return tuple(sorted((k, _describe(v)) for k, v in obj.items()))
    if isinstance(obj, (int, float, str, bool, type(None))):
        return obj
    if hasattr(obj, "__dict__"):  # a weight adapter object (comfy.weight_adapter): its class and tensors
        return (type(obj).__name__, _describe(vars(obj)))
    return (type(obj).__name__, id(obj))


def base_fingerprint(patcher) -> str:
    """The base model: the same object (ComfyUI's cache keeps it while its loader's inputs stay the same)."""
    return f"{id(patcher.model)}:{type(patcher.model).__name__}:{len(weight_keys(patcher))}"


def new_blob_path() -> Path:
    """A fresh name in /dev/shm, in the transport's naming (owner pid and pid namespace first)."""
    return SHM_DIR / f"{SHM_PREFIX}{os.getpid()}_{pid_namespace()}_{secrets.token_hex(16)}.safetensors"


def write_blob(path: Path, patcher, keys: list[str]) -> int:
    """Write ``keys`` of the patched model to ``path`` (prefix stripped) as safetensors, one tensor at a time:
    the header first (from shapes and dtypes), then each tensor as it is computed. Returns the bytes."""
    header, offset, shapes = {}, 0, []
    dropped = _dropped_scales(patcher, keys)
    for key in (k for k in keys if k not in dropped):
        weight = _stored(patcher, key)[0]
        plain = not _quantised(weight) and weight.dtype in ST_DTYPES
        dtype = weight.dtype if plain else torch.float32  # a quantised tensor is written dequantised
        n = weight.numel() * torch.empty((), dtype=dtype).element_size()
        header[key[len(PREFIX):]] = {"dtype": ST_DTYPES[dtype], "shape": list(weight.shape),
                                     "data_offsets": [offset, offset + n]}
        shapes.append((key, dtype, n))
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for key, dtype, n in shapes:
                t = patched_tensor(patcher, key).to(dtype).contiguous().reshape(-1)
                data = t.view(torch.uint8).numpy()
                if len(data) != n:
                    raise ValueError(f"weight {key}: {len(data)} bytes computed, {n} expected")
                fh.write(memoryview(data))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return 8 + len(raw) + offset
