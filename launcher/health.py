"""A worker group's health, read from outside: whether its processes run, which rank went silent (the
heartbeat files), and the report of a failure (tracebacks, torchrun's root cause, the log's tail). A part
of ``WorkerGroup`` (group.py), which holds the state these read."""
from __future__ import annotations

import re
import time

import psutil

from comfy_pipefusion import failure

from . import logfile

_ROOT_CAUSE = re.compile(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)(?:\s*\((\w+)\))?")


class GroupHealth:
    """``WorkerGroup``'s state queries and failure report; they read ``plan``, ``proc``, ``conn``,
    ``worker_pids``, ``dir``, ``log_path`` and ``watchdog_s``."""

    def alive(self) -> bool:
        """torchrun and every rank run (torchrun outlives a dead rank by a moment while it tears down)."""
        if self.proc is None or self.proc.poll() is not None or self.conn is None:
            return False
        for pid in self.worker_pids:
            try:
                if psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    return False
            except psutil.Error:
                return False
        return True

    def trouble(self) -> str | None:
        """What is wrong with this group, or None when it can take a job."""
        if self.proc is None or self.conn is None:
            return "is not connected"
        if self.proc.poll() is not None:
            return f"exited (exit code {self.proc.returncode})"
        for rank, pid in enumerate(self.worker_pids):
            try:
                if psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    continue
            except psutil.Error:
                pass
            return f"lost rank {rank} (pid {pid})"
        silent = self.silent_ranks()
        if silent:
            return f"has a rank that stopped responding: {self.describe_rank(silent[0][0])}"
        return None

    def silent_ranks(self) -> list[tuple[int, float]]:
        """(rank, seconds since its last heartbeat) of each rank silent for longer than the watchdog."""
        out, now = [], time.time()
        for r in range(self.plan.world_size):
            try:
                age = now - (self.dir / f"beat-rank{r}").stat().st_mtime
            except OSError:
                age = float("inf")
            if age > self.watchdog_s:
                out.append((r, age))
        return out

    def rank_steps(self) -> dict[int, str]:
        """Each rank's last finished step of the current job, from its heartbeat file."""
        out = {}
        for r in range(self.plan.world_size):
            try:
                out[r] = (self.dir / f"beat-rank{r}").read_text().split()[-1]
            except (OSError, IndexError):
                out[r] = "?"
        return out

    def describe_rank(self, rank: int) -> str:
        pid = self.worker_pids[rank] if rank < len(self.worker_pids) else None
        try:
            state = psutil.Process(pid).status() if pid else "unknown"
        except psutil.Error:
            state = "gone"
        return f"rank {rank} (pid {pid}, process state: {state})"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(logfile.read_tail(self.log_path).splitlines()[-lines:])
        except OSError:
            return "(no worker log)"

    def root_cause(self) -> str:
        """', rank R (pid P) ended with exit code C (SIGNAL)' from torchrun's summary in the log, or ''."""
        try:
            text = logfile.read_tail(self.log_path)
        except OSError:
            return ""
        found = _ROOT_CAUSE.findall(text.rsplit("Root Cause", 1)[-1]) if "Root Cause" in text else []
        if not found:
            return ""
        rank, code, pid, sig = found[0]
        return f", rank {rank} (pid {pid}) ended with exit code {code}" + (f" ({sig})" if sig else "")

    def failure_report(self) -> str:
        """The root cause (a hang or self-test report, ``failure.py``), the failing ranks' traceback tails,
        then the tail of the group's log (torchrun's summary)."""
        parts = failure.cause_block(lambda: logfile.read_tail(self.log_path))
        for f in sorted(self.dir.glob("error-rank*.txt")):
            tb = f.read_text(errors="replace").strip().splitlines()
            parts.append(f"{f.stem.replace('error-', '')} traceback:\n" + "\n".join(tb[-8:]))
        return "\n".join(parts + ["worker log:", self.log_tail(15)])

    def ranks_gone(self) -> bool:
        """No rank runs any more (torchrun may still be tearing down)."""
        for pid in self.worker_pids:
            try:
                if psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    return False
            except psutil.Error:
                pass
        return True
