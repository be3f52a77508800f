"""The worker group's log: bounded on disk, and read from its end only.

The workers write to ``worker.log`` through a file descriptor opened for appending, which the launcher
cannot swap. So the launcher rotates by copy and truncate: past ``limit`` bytes, the newest ``limit`` bytes
go to ``worker.log.1`` and ``worker.log`` is cut to zero; the workers' next writes append at its new end.
The two files together stay under ``2 * limit`` however much the workers write. Lines written between the
copy and the cut are lost; that is the price of never blocking a worker on its log.
"""
from __future__ import annotations

import os
from pathlib import Path

LOG_LIMIT = 8 * 2**20  # bytes per file: thousands of tracebacks, a few seconds of a runaway loop
TAIL_BYTES = 256 * 2**10  # what error reports read: torchrun's failure summary and the tracebacks before it


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".1")


def rotate(path: Path, limit: int = LOG_LIMIT) -> bool:
    """Keep ``path`` under ``limit`` bytes (its newest bytes move to ``path.1``); True if it rotated."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size <= limit:
        return False
    with open(path, "rb") as src:
        src.seek(size - limit)
        data = src.read(limit)
    tmp = path.with_name(path.name + ".1.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, _previous(path))
    os.truncate(path, 0)
    return True


def read_tail(path: Path, nbytes: int = TAIL_BYTES) -> str:
    """The last ``nbytes`` of the log (reaching into ``path.1`` right after a rotation), as text."""
    chunks: list[bytes] = []
    want = nbytes
    for p in (path, _previous(path)):
        try:
            with open(p, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - want))
                data = f.read(want)
        except OSError:
            continue
        chunks.insert(0, data)
        want -= len(data)
        if want <= 0:
            break
    if not chunks:
        raise FileNotFoundError(path)
    return b"".join(chunks).decode(errors="replace")
