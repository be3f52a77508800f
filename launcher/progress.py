"""Loading progress: how many bytes each rank has read since the weights began loading, from the
operating system's per-process I/O counters (no message from the workers needed)."""
from __future__ import annotations

import threading

import psutil


def _read_bytes(pid: int) -> int | None:
    try:
        return psutil.Process(pid).io_counters().read_chars
    except (psutil.Error, AttributeError):  # gone, or a platform without per-process I/O counters
        return None


def _sizes(counts: list[int]) -> str:
    """'1.2, 1.1 GiB' (or MiB when every rank read less than a GiB)."""
    if max(counts) >= 2 ** 30:
        return ", ".join(f"{n / 2 ** 30:.1f}" for n in counts) + " GiB"
    return ", ".join(f"{n / 2 ** 20:.0f}" for n in counts) + " MiB"


class LoadProgress:
    """While started, calls ``report(detail)`` every ``every`` seconds with the bytes each rank read since
    the start, in rank order: "read per rank: 1.2, 1.1 GiB". No report follows ``stop()``."""

    def __init__(self, pids: list[int], report, every: float = 1.0) -> None:
        self.pids, self.report, self.every = list(pids), report, every
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start: list[int | None] = []

    def detail(self) -> str:
        counts = []
        for pid, start in zip(self.pids, self._start):
            now = _read_bytes(pid)
            if now is None or start is None:
                return "reading the weights"
            counts.append(max(0, now - start))
        return f"read per rank: {_sizes(counts)}" if counts else "reading the weights"

    def start(self) -> None:
        if self._thread is not None:
            return
        self._start = [_read_bytes(p) for p in self.pids]
        self._thread = threading.Thread(target=self._loop, name="pipefusion-load-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopped.wait(self.every):
            detail = self.detail()
            with self._lock:
                if self._stopped.is_set():
                    return
                self.report(detail)

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
