"""Checkpoints on disk: what a file is (from its header alone) and one rank's modules loaded from it.

    info = open_checkpoint(path)                 # family, diffusers config, layout, stored dtype, files
    load_modules(model, info, names, device, dtype)
                                                 # fill only ``names`` of a meta-device model, tensor by tensor

``path`` is a .safetensors file (original single-file layouts, or a diffusers transformer), a sharded diffusers
transformer given by its ``*.safetensors.index.json`` or by any one of its shards (the index next to it is
found), or a diffusers folder holding either. Detection reads headers only; a file we cannot load is refused
with a CheckpointError that names what was found and lists what is supported, before any worker starts.

Loading reads each tensor's bytes straight into the memory that keeps it (``tensorfile``): a rank's resident
memory grows by its own modules, never by the file. float8 Linear weights stay 8-bit (``fp8``), with their per-tensor scale where the file has one (ComfyUI's
scaled-fp8 and mixed-precision files: ``scale_weight`` / ``weight_scale``); a scaled weight that cannot stay
8-bit is dequantised (stored x scale) on load.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import fp8, keys_chroma, keys_flux, keys_flux2, keys_pixart, keys_qwen_image, keys_sd3, keys_zimage
from .detect import SUPPORTED, DetectError, identify, strip_prefix
from . import detect, detect_diffusers
from .keymap import KeyMap, for_module, sources
from .tensorfile import MAX_HEADER, Entry, Reader, TensorFileError, read_header

INDEX_SUFFIX = ".safetensors.index.json"
_SHARD = re.compile(r"^(.*)-(\d+)-of-(\d+)\.safetensors$")
_SHARD_NAME = re.compile(r"(?!\.)[^/\\\x00-\x1f]{1,200}\.safetensors")  # a bare file name, not hidden
ORIGINAL_MAPS = {"flux": keys_flux.original_map, "sd3": keys_sd3.original_map, "pixart": keys_pixart.original_map,
                 "chroma": keys_chroma.original_map, "qwen_image": keys_qwen_image.original_map,
                 "zimage": keys_zimage.original_map, "flux2": keys_flux2.original_map}


class CheckpointError(ValueError):
    """The file is not a checkpoint we can load; the message says what was found and what is supported."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds, read from its header(s)."""

    family: str
    """'flux' | 'sd3' | 'pixart': which diffusers class (and engine family) it fills."""
    config: dict = field(hash=False)
    """Keyword arguments of that class (FluxTransformer2DModel, SD3Transformer2DModel, PixArtTransformer2DModel)."""
    layout: str
    """'original' (the authors' single file), 'diffusers' (one file) or 'diffusers-sharded' (an index)."""
    dtype: torch.dtype
    """The dtype most of its weights are stored in (bf16, fp16, fp32 or float8_e4m3fn)."""
    files: tuple[str, ...]
    """The .safetensors files that hold its tensors (one unless sharded)."""
    prefix: str = ""
    """Prefix of the model's keys inside the file: '' or 'model.diffusion_model.' (full checkpoints)."""
    variant: str = ""
    """A human name: 'Flux.1-dev', 'SD3.5 medium', 'PixArt-Σ 2K', ..."""
    entries: dict | None = field(default=None, compare=False, hash=False, repr=False)
    """{key without prefix: Entry}: the header read by ``open_checkpoint``, so that a load does not read it again."""


def _error(name: str, what: str) -> CheckpointError:
    return CheckpointError(f"{name}: {what}. Supported: {SUPPORTED}")


def _index_files(index: Path) -> tuple[str, ...]:
    try:
        if index.stat().st_size > MAX_HEADER:  # real indexes are ~100 KB
            raise ValueError(f"{index.stat().st_size} bytes, more than an index needs ({MAX_HEADER})")
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _error(index.name, f"not a readable safetensors index ({exc})") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise _error(index.name, "its weight_map is not a non-empty object of tensor name -> shard file")
    # A downloaded index must not make the loader open (and describe) files elsewhere: a shard is a bare
    # .safetensors file name beside the index. The refusal names only the index's own text.
    bad = [f for f in weight_map.values() if not isinstance(f, str) or not _SHARD_NAME.fullmatch(f)]
    if bad:
        raise _error(index.name, f"its weight_map names {bad[0]!r} as a shard; a shard must be a bare "
                                 "*.safetensors file name in the index's own folder (no path, no '..')")
    files = tuple(dict.fromkeys(str(index.parent / f) for f in weight_map.values()))
    missing = [Path(f).name for f in files if not Path(f).is_file()]
    if missing:
        raise _error(index.name, f"{len(missing)} of its {len(files)} shards are missing: {', '.join(missing[:4])}")
    return files


def resolve_files(path: str | Path) -> tuple[tuple[str, ...], bool]:
    """(files, sharded) for a file, an index, one shard (its index is found next to it) or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        for base in (path, path / "transformer"):
            if (base / f"diffusion_pytorch_model{INDEX_SUFFIX}").is_file():
                return _index_files(base / f"diffusion_pytorch_model{INDEX_SUFFIX}"), True
            if (base / "diffusion_pytorch_model.safetensors").is_file():
                return (str(base / "diffusion_pytorch_model.safetensors"),), False
        raise _error(path.name, "a folder without diffusion_pytorch_model.safetensors or its index")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.name.endswith(INDEX_SUFFIX):
        return _index_files(path), True
    if path.suffix != ".safetensors":
        raise _error(path.name, f"a {path.suffix or 'suffix-less'} file; only .safetensors files are read "
                                "(convert .pth/.ckpt/.bin with safetensors, GGUF is not supported)")
    shard = _SHARD.match(path.name)
    if shard:
        index = path.parent / f"{shard.group(1)}{INDEX_SUFFIX}"
        if not index.is_file():
            raise _error(path.name, f"shard {int(shard.group(2))} of {int(shard.group(3))} and no {index.name} "
                                    "next to it")
        return _index_files(index), True
    return (str(path),), False


def read_entries(files: tuple[str, ...], prefix: str) -> tuple[dict[str, Entry], dict[str, str]]:
    """({key without prefix: Entry}, metadata) over all files; keys outside the prefix are dropped."""
    entries, metadata = {}, {}
    for name in files:
        try:
            found, meta = read_header(name)
        except (TensorFileError, OSError) as exc:
            raise _error(Path(name).name, f"not a readable safetensors file ({exc})") from exc
        dup = entries.keys() & found.keys()
        if dup:
            raise _error(Path(name).name, f"tensor {sorted(dup)[0]} is also in another shard")
        entries.update(found)
        metadata.update(meta)
    if not entries:
        raise _error(Path(files[0]).name, "the file holds no tensors")
    return {k[len(prefix):]: e for k, e in entries.items() if k.startswith(prefix)}, metadata


def key_map(info: CheckpointInfo, entries: dict[str, Entry]) -> KeyMap:
    """diffusers key -> pieces of stored tensors, for the whole model."""
    if info.layout == "original":
        return ORIGINAL_MAPS[info.family](info.config)
    return {k: ((k, 0, None),) for k in entries}


def _check_map(name: str, kmap: KeyMap, entries: dict[str, Entry], expected: set[str]) -> None:
    """Every stored tensor the map reads exists, its row ranges tile it exactly, and no diffusers key is unfilled."""
    missing = sorted(sources(kmap) - entries.keys()) + sorted(expected - kmap.keys())
    if missing:
        raise _error(name, f"{len(missing)} tensors of the model are missing, e.g. {', '.join(missing[:4])}; "
                           "the file is incomplete")
    ranges: dict[str, list[tuple[int, int]]] = {}
    for pieces in kmap.values():
        for key, start, stop in pieces:
            rows = entries[key].shape[0] if entries[key].shape else 1
            ranges.setdefault(key, []).append((start, rows if stop is None else stop))
    for key, spans in ranges.items():
        rows, pos = (entries[key].shape[0] if entries[key].shape else 1), 0
        for start, stop in sorted(spans):
            if start != pos:
                break
            pos = stop
        if pos != rows:
            raise _error(name, f"tensor {key} has shape {list(entries[key].shape)}, which does not split into "
                               f"the row ranges {sorted(spans)} this model's width needs")


def _check_scales(name: str, entries: dict[str, Entry]) -> None:
    """A scaled-fp8 file's scales are one float per float8 weight; anything else is not a file we read."""
    for key, e in entries.items():
        if not key.endswith(detect.SCALE_SUFFIXES):
            continue
        if math.prod(e.shape) != 1 or e.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise _error(name, f"{key} has shape {list(e.shape)} and dtype {e.dtype}: only per-tensor scales (one "
                               "float per weight) of ComfyUI's scaled-fp8 files are read")
        weight = key.rsplit(".", 1)[0] + ".weight"
        if key.endswith(("weight", "scale_weight")) and weight not in entries:
            raise _error(name, f"{key} scales {weight}, which the file does not hold")


def _scaled_fp8_dtype(entries: dict[str, Entry]) -> torch.dtype | None:
    """The float8 dtype of a classic scaled-fp8 file (its ``scaled_fp8`` marker's; float32 means e4m3fn, as
    ComfyUI reads it), or None. ComfyUI builds every Linear of such a model in that dtype, so a bias stored
    wider is rounded to it on load; the loader does the same so the results agree."""
    marker = entries.get(detect.SCALED_MARKER)
    if marker is None:
        return None
    return marker.dtype if marker.dtype in fp8.FP8 else torch.float8_e4m3fn


def _scale_of(reader: Reader, pieces, entries: dict[str, Entry], device) -> torch.Tensor | None:
    """The per-tensor scale of the stored weight ``pieces`` come from (scaled-fp8 files), or None."""
    base, _, leaf = pieces[0][0].rpartition(".")
    if leaf != "weight":
        return None
    for suffix in (".scale_weight", ".weight_scale"):
        if base + suffix in entries:
            e = entries[base + suffix]
            out = torch.empty(e.shape, dtype=torch.float32)
            reader.fill(out, [(e, 0, e.shape[0] if e.shape else 1)])
            return out.reshape(()).to(device)
    return None


def _dominant_dtype(entries: dict[str, Entry]) -> torch.dtype:
    count: dict[torch.dtype, int] = {}
    for e in entries.values():
        count[e.dtype] = count.get(e.dtype, 0) + math.prod(e.shape)
    return max(count, key=count.get)


def open_checkpoint(path: str | Path) -> CheckpointInfo:
    """What ``path`` holds (headers only); raises CheckpointError naming what was found otherwise."""
    files, sharded = resolve_files(path)
    name = Path(path).name
    raw, metadata = read_entries(files, prefix="")
    prefix = strip_prefix(raw)
    entries = {k[len(prefix):]: e for k, e in raw.items() if k.startswith(prefix)}
    tensors = detect.model_keys(entries)  # once: a header may name tens of thousands of tensors
    shapes = {k: list(e.shape) for k, e in entries.items() if k in tensors}
    try:
        family, layout = identify(set(shapes))
        if family == "flux":
            config = (detect.flux_original_config if layout == "original" else detect.flux_diffusers_config)(
                shapes, metadata)
            variant = "Flux.1-dev" if config["guidance_embeds"] else "Flux.1-schnell"
        elif family == "chroma":
            config, variant = detect.chroma_config(shapes, metadata, layout), "Chroma"
        elif family == "qwen_image":
            config = keys_qwen_image.config_from_shapes(shapes, metadata)
            variant = keys_qwen_image.variant(config)
        elif family == "flux2":
            config = keys_flux2.config_from_shapes(shapes, metadata)
            variant = keys_flux2.variant(config)
        elif family == "zimage":
            config = keys_zimage.config_from_shapes(shapes, metadata)
            variant = keys_zimage.variant(config)
        elif family == "sd3":
            config = (detect.sd3_original_config(shapes, metadata) if layout == "original"
                      else detect_diffusers.sd3_config(shapes, metadata))
            variant = detect.sd3_variant(config)
        else:
            config = (detect.pixart_original_config(shapes, metadata, Path(files[0]).name) if layout == "original"
                      else detect_diffusers.pixart_config(shapes, metadata, Path(files[0]).name))
            variant = detect.pixart_variant(shapes, config)
        detect.check_bounds(config)
    except DetectError as exc:
        raise _error(name, str(exc)) from exc
    except (KeyError, IndexError, ValueError, ArithmeticError) as exc:  # a key is absent, a shape is odd
        raise _error(name, f"looks like {family} but {exc!r} does not fit; the file is incomplete or not "
                           "a supported variant") from exc
    if layout == "diffusers" and sharded:
        layout = "diffusers-sharded"
    _check_scales(name, entries)
    info = CheckpointInfo(family, config, layout, _dominant_dtype(entries), files, prefix, variant, entries)
    kmap = key_map(info, entries)
    expected = set(ORIGINAL_MAPS[family](config)) if layout != "original" else set()
    _check_map(name, kmap, entries, expected)
    return info


def sources_for(info: CheckpointInfo, name: str) -> KeyMap:
    """The adapter of one module (``transformer_blocks.3``, ``norm_out``, ...): diffusers key -> stored pieces."""
    entries, _ = read_entries(info.files, info.prefix)
    return for_module(key_map(info, entries), name)


def _tensors_of(model: nn.Module, name: str):
    """(key, owning module, attribute, kind) for what ``name`` holds: a submodule's parameters and buffers, or
    one tensor of the root (e.g. PixArt's ``scale_shift_table``). kind: 'param', 'buffer', 'derived'."""
    try:
        sub = model.get_submodule(name)
    except AttributeError:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if attr not in owner._parameters and attr not in owner._buffers:
            raise CheckpointError(f"the model has no module or tensor {name!r}") from None
        return [(name, owner, attr, "param" if attr in owner._parameters else "buffer")]
    out = []
    for mname, mod in sub.named_modules(prefix=name):
        for attr, p in mod._parameters.items():
            if p is not None:
                out.append((f"{mname}.{attr}", mod, attr, "param"))
        for attr, b in mod._buffers.items():
            if b is not None:
                kind = "derived" if attr in mod._non_persistent_buffers_set else "buffer"
                out.append((f"{mname}.{attr}", mod, attr, kind))
    return out


def _derived_buffer(mod: nn.Module, attr: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A buffer the file does not hold, recomputed as its module's constructor does."""
    from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed

    if isinstance(mod, PatchEmbed) and attr == "pos_embed":  # PixArt: fixed sin-cos table
        grid = math.isqrt(mod.pos_embed.shape[1])
        table = get_2d_sincos_pos_embed(mod.proj.out_channels, grid, base_size=mod.base_size,
                                        interpolation_scale=mod.interpolation_scale, output_type="pt")
        return table.float().unsqueeze(0).to(device=device, dtype=dtype)
    raise CheckpointError(f"internal: no rule to compute buffer {attr} of {type(mod).__name__}")


def _fill(reader: Reader, key: str, shape: torch.Size, pieces, entries: dict[str, Entry], device, dtype,
          keep_fp8) -> torch.Tensor:
    resolved = []
    for src, start, stop in pieces:
        e = entries[src]
        resolved.append((e, start, (e.shape[0] if e.shape else 1) if stop is None else stop))
    first = resolved[0][0]
    rows = sum(stop - start for _, start, stop in resolved)
    got = tuple(first.shape) if len(pieces) == 1 and pieces[0][2] is None else (rows, *first.shape[1:])
    if got != tuple(shape):
        raise CheckpointError(f"{Path(first.file).name}: {key} needs shape {list(shape)} but the file gives "
                              f"{list(got)} (from {', '.join(p[0] for p in pieces)})")
    out = torch.empty(shape, dtype=first.dtype if keep_fp8(first.dtype) else dtype, device=device)
    reader.fill(out, resolved)
    return out


def load_modules(model: nn.Module, info: CheckpointInfo | str | Path, names: list[str], device: torch.device,
                 dtype: torch.dtype, progress=None) -> None:
    """Fill the submodules (or root tensors) ``names`` of a meta-device model from the checkpoint; the rest
    stays on the meta device. Tensors are read one at a time into their final place, in ``dtype``, except
    float8 Linear weights, which stay 8-bit (``fp8.StoredFp8Linear``). ``progress(i, n)`` is called before
    tensor i of n is read; an exception it raises (a cancel) abandons the load, and the model with it."""
    if not isinstance(info, CheckpointInfo):
        info = open_checkpoint(info)
    entries = info.entries if info.entries is not None else read_entries(info.files, info.prefix)[0]
    kmap = key_map(info, entries)
    work = [t for name in names for t in _tensors_of(model, name)]
    rounding = _scaled_fp8_dtype(entries)
    with Reader() as reader, torch.no_grad():
        for i, (key, mod, attr, kind) in enumerate(work):
            if progress is not None:
                progress(i, len(work))
            if kind == "derived":
                mod._buffers[attr] = _derived_buffer(mod, attr, device, dtype)
                continue
            if key not in kmap:
                raise CheckpointError(f"{Path(info.files[0]).name} has nothing for {key}: the file is "
                                      "incomplete or of another model")
            current = getattr(mod, attr)
            keep = lambda stored: kind == "param" and fp8.can_keep(mod, attr, stored)  # noqa: E731
            t = _fill(reader, key, current.shape, kmap[key], entries, device, dtype, keep)
            scale = _scale_of(reader, kmap[key], entries, device) if kind == "param" and attr == "weight" else None
            if scale is not None and t.dtype not in fp8.FP8:  # dequantised as ComfyUI computes it
                t = (t.float() * scale).to(dtype)
            elif rounding is not None and isinstance(mod, nn.Linear) and t.dtype not in fp8.FP8:
                t = t.to(rounding).to(dtype)  # ComfyUI's scaled-fp8 Linear holds its bias (and any unscaled weight) in fp8
            if kind == "param":
                mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
                if t.dtype in fp8.FP8:
                    fp8.keep_stored(mod, scale)
            else:
                mod._buffers[attr] = t


def update_modules(model: nn.Module, info: CheckpointInfo, path: str | Path, names: list[str]) -> int:
    """Overwrite, in place, the loaded tensors of ``names`` whose stored sources are all in the safetensors file
    ``path`` (some keys of ``info``'s checkpoint in its layout, e.g. the weights a LoRA change touched).
    Returns how many tensors were replaced."""
    entries, _ = read_entries((str(path),), info.prefix)
    kmap = key_map(info, info.entries if info.entries is not None else read_entries(info.files, info.prefix)[0])
    unknown = set(entries) - sources(kmap)
    if unknown:
        raise CheckpointError(f"{Path(path).name}: {sorted(unknown)[0]} is not a tensor of "
                              f"{info.variant or info.family}")
    done = 0
    with Reader() as reader, torch.no_grad():
        for name in names:
            for key, mod, attr, kind in _tensors_of(model, name):
                pieces = kmap.get(key)
                if kind == "derived" or not pieces or not all(src in entries for src, _, _ in pieces):
                    continue
                current = getattr(mod, attr)
                if current.dtype in fp8.FP8:
                    raise CheckpointError(f"{key} is stored in 8 bits; its weights cannot be updated in place")
                t = _fill(reader, key, current.shape, pieces, entries, current.device, current.dtype, lambda _: False)
                current.copy_(t)
                done += 1
    return done


def inspect_checkpoint(path: str | Path) -> dict:
    """Flux config of ``path`` (headers only), as the engine reads it today; raises CheckpointError."""
    info = open_checkpoint(path)
    if info.family != "flux":
        raise CheckpointError(f"{Path(path).name} is {info.variant}; this engine build samples Flux.1 only "
                              "(open_checkpoint describes every family)")
    return info.config


def save_checkpoint(model: nn.Module, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write a whole Flux model in diffusers' layout, as one file (tests and examples)."""
    from safetensors.torch import save_file

    axes = ",".join(str(a) for a in model.config.axes_dims_rope)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"pipefusion.axes_dims_rope": axes})
