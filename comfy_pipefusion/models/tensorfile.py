"""Safetensors files read by hand: the header (names, dtypes, shapes, byte ranges) and row ranges of a tensor
read straight into the memory that keeps them.

Why not ``safe_open``: it memory-maps the whole file, and every page a rank touches while copying its stage
out of the mapping counts in that rank's resident memory until the mapping closes, so a stage's load peaks at
twice its size. Reading with ``readinto`` into the destination tensor costs no resident memory beyond the
tensor itself (the kernel's page cache is not the process's). A row range ``[start, stop)`` of a row-major
tensor is one contiguous byte range, so every key adapter here (fused qkv split, shift/scale swap) is a list
of byte ranges read in order into one destination.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# The header is parsed in ComfyUI's process (the loader node), so its size bounds the memory and time a
# downloaded file can cost there (JSON of N bytes costs ~10 N of Python objects). Real headers are small:
# ~100 bytes per tensor, Flux.1-dev 780 tensors (~80 KB), the largest all-in-one files (SD3.5 large with
# its text encoders and VAE, ~2,700 tensors) ~300 KB; trainers' metadata adds at most a few hundred KB.
# 8 MiB is 25x the largest, instead of safetensors' own 100 MiB.
MAX_HEADER = 8 * 2**20
MAX_TENSORS = 50_000  # ~18x the largest real file's tensor count


class TensorFileError(ValueError):
    """Not a readable safetensors file; the message says why (truncated, corrupt header, ...)."""


@dataclass(frozen=True)
class Entry:
    """One stored tensor: where its bytes are."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in ``file``
    end: int

    @property
    def row_bytes(self) -> int:
        return (self.end - self.begin) // self.shape[0] if self.shape and self.shape[0] else self.end - self.begin


def read_header(path: str | Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """({key: Entry}, metadata) of one safetensors file; reads the header only and checks it against the size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TensorFileError(f"{path.name} has {size} bytes: too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER:
            raise TensorFileError(f"{path.name}: header length {n} is beyond the {MAX_HEADER} bytes a real "
                                  "checkpoint's header needs (not safetensors, or made to exhaust memory)")
        if 8 + n > size:
            raise TensorFileError(f"{path.name}: header length {n} does not fit in a file of {size} bytes "
                                  "(not safetensors, or truncated)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TensorFileError(f"{path.name}: the header is not valid JSON ({exc}); the file is corrupt") from exc
    if not isinstance(header, dict):
        raise TensorFileError(f"{path.name}: the header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise TensorFileError(f"{path.name}: __metadata__ is not a JSON object; the file is corrupt")
    if len(header) > MAX_TENSORS:
        raise TensorFileError(f"{path.name}: the header lists {len(header)} tensors; real checkpoints have a few "
                              f"thousand at most (limit {MAX_TENSORS}), so this file is refused")
    entries, data_end = {}, 0
    for key, spec in header.items():
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(s) for s in spec["shape"])
            begin, end = (int(v) for v in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TensorFileError(f"{path.name}: tensor {key!r} has an unreadable header entry {spec!r}") from exc
        numel = 1
        for s in shape:
            numel *= s
        if any(s < 0 for s in shape) or end - begin != numel * dtype.itemsize or begin < 0:
            raise TensorFileError(f"{path.name}: tensor {key!r} claims bytes {begin}..{end} for shape {shape} "
                                  f"{spec['dtype']}; the header is corrupt")
        entries[key] = Entry(str(path), dtype, shape, 8 + n + begin, 8 + n + end)
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        raise TensorFileError(f"{path.name} is truncated: its header describes {8 + n + data_end} bytes, "
                              f"the file has {size}")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _read_exact(f, offset: int, out: memoryview) -> None:
    f.seek(offset)
    done = 0
    while done < len(out):
        got = f.readinto(out[done:])
        if not got:
            raise TensorFileError(f"{f.name} ended at byte {offset + done}; the file is truncated")
        done += got


class Reader:
    """Open file handles over a set of entries; ``fill`` assembles one tensor from row ranges."""

    def __init__(self) -> None:
        self.files: dict[str, object] = {}

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    def _file(self, name: str):
        if name not in self.files:
            self.files[name] = open(name, "rb", buffering=0)
        return self.files[name]

    def read_rows(self, entry: Entry, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows ``[start, stop)`` of ``entry`` into ``out`` (contiguous CPU, same dtype, same byte count)."""
        nbytes = (stop - start) * entry.row_bytes
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if len(view) != nbytes:
            raise TensorFileError(f"internal: {len(view)} bytes of room for {nbytes} bytes of {entry}")
        _read_exact(self._file(entry.file), entry.begin + start * entry.row_bytes, view)

    def fill(self, out: torch.Tensor, pieces: list[tuple[Entry, int, int]]) -> None:
        """``out`` = the concatenation along dim 0 of the row ranges ``pieces``, converted to its dtype/device.

        Reads straight into ``out`` when it is a CPU tensor of the stored dtype; otherwise through one
        temporary the size of ``out`` in the stored dtype.
        """
        stored = pieces[0][0].dtype
        direct = out.device.type == "cpu" and out.dtype == stored and out.is_contiguous() and \
            all(e.dtype == stored for e, _, _ in pieces)
        dst = out if direct else torch.empty(out.shape, dtype=stored)
        row = 0
        flat = dst.reshape(dst.shape[0], -1) if dst.dim() else dst.reshape(1, 1)
        for entry, start, stop in pieces:
            if entry.dtype != stored:
                tmp = torch.empty((stop - start, *entry.shape[1:]), dtype=entry.dtype)
                self.read_rows(entry, start, stop, tmp)
                flat[row:row + stop - start].copy_(tmp.reshape(stop - start, -1))
            else:
                self.read_rows(entry, start, stop, flat[row:row + stop - start])
            row += stop - start
        if not direct:
            out.copy_(dst)
