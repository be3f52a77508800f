"""One torchrun worker group: start, handshake, run jobs, watch, stop.

The group runs ``python -m torch.distributed.run ... -m comfy_pipefusion.worker --serve GROUP_DIR`` in a
session of its own, with a clean environment, and dies with its owner (PR_SET_PDEATHSIG). Everything it
uses lives in GROUP_DIR (mode 0700): the control socket, the authkey (0600), the pid files and the log
(bounded and read from its end: ``logfile``).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from multiprocessing import AuthenticationError

import psutil
import torch

from comfy_pipefusion import failure, preview, transport
from comfy_pipefusion.errors import GroupError, JobCancelled
from comfy_pipefusion.oneshot import worker_command, worker_env

from . import logfile
from .sweep import kill_tree, process_identity, read_json, remove_group, sweep

log = logging.getLogger("comfy_pipefusion.launcher")
DEBUG_LOAD_DELAY = "PIPEFUSION_DEBUG_LOAD_DELAY_S"  # tests only: see debug_worker_args
_ROOT_CAUSE = re.compile(r"rank\s*:\s*(\d+).*?\n\s*exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)(?:\s*\((\w+)\))?")


class JobError(RuntimeError):
    """The job was refused or failed while the group stayed usable."""


@dataclass(frozen=True)
class GroupPlan:
    """What a group is started with; a different plan means a different group."""

    world_size: int
    devices: tuple[int, ...] | None = None  # CUDA device indices; None: CPU ranks
    threads: int = 1  # torch threads per CPU rank
    key: str = ""  # what else the group is bound to (checkpoint, parallel plan, dtype)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if self.devices is not None and len(self.devices) != self.world_size:
            raise ValueError(f"{len(self.devices)} devices given for {self.world_size} ranks")


def debug_worker_args() -> list[str]:
    """Tests only: ``PIPEFUSION_DEBUG_LOAD_DELAY_S`` in this (ComfyUI) process's environment makes every weight
    load of the groups it starts that many seconds slower (the worker's ``--debug-load-delay-s``), a window
    to cancel a load in. Read when a group starts; the workers never read it."""
    raw = os.environ.get(DEBUG_LOAD_DELAY, "").strip()
    if not raw:
        return []
    try:
        delay = float(raw)
    except ValueError:
        delay = -1.0
    if not delay >= 0:
        raise ValueError(f"{DEBUG_LOAD_DELAY}={raw!r}: give a number of seconds, at least 0 (a test setting)")
    return ["--debug-load-delay-s", repr(delay)]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class WorkerGroup:
    """A started group. ``run`` one job at a time; ``stop`` always leaves nothing behind."""

    def __init__(self, plan: GroupPlan, root: Path, startup_timeout: float = 300.0, cancelled=None,
                 watchdog_s: float = 60.0, worker_args: tuple[str, ...] = ()) -> None:
        self.plan, self.root, self.watchdog_s = plan, root, watchdog_s
        self.worker_args = tuple(worker_args)  # tests only (e.g. a self-test that fails)
        self.proc = self.conn = self.listener = None
        self.worker_pids: list[int] = []
        self.busy = False
        self.p2p_disabled: str | None = None  # why the group runs with NCCL_P2P_DISABLE=1, if it does
        sweep(root)
        self.dir = transport.private_dir(root, "group-")
        env: dict[str, str] = {}
        while True:
            try:
                self._start(startup_timeout, cancelled, env)
                return
            except BaseException as exc:
                reason = self._selftest_failure() if isinstance(exc, GroupError) and not env else None
                self.kill()
                self.stop()
                if reason is None or os.environ.get("NCCL_P2P_DISABLE") == "1":
                    raise
            # The data plane's self-test failed (selftest.py): once, without peer-to-peer transfers.
            log.warning("the data-plane self-test failed (%s); restarting the group once with NCCL_P2P_DISABLE=1 "
                        "(GPUs without peer-to-peer access, IOMMU/ACS boards)", reason)
            self.p2p_disabled, env = reason, {"NCCL_P2P_DISABLE": "1"}
            self.proc = self.conn = self.listener = None
            self.dir = transport.private_dir(root, "group-")

    def _selftest_failure(self) -> str | None:
        from comfy_pipefusion.parallel.selftest import MARKER

        try:
            return (self.dir / MARKER).read_text().strip() or "no reason given"
        except OSError:
            return None

    # ------------------------------------------------------------------------------------- start

    def _start(self, timeout: float, cancelled=None, extra_env: dict[str, str] | None = None) -> None:
        (self.dir / "owner").write_text(json.dumps(process_identity()))
        authkey = secrets.token_bytes(32)
        transport.write_secret(self.dir / "authkey", authkey)
        self.listener = transport.listen(self.dir / "control.sock", authkey)
        self.log_path = self.dir / "worker.log"
        with open(self.log_path, "ab") as log:
            cmd = worker_command(self.plan.world_size, ["--serve", str(self.dir), "--threads", str(self.plan.threads),
                                                        *debug_worker_args(), *self.worker_args], self.dir)
            env = {**worker_env(self.plan.threads, self.plan.devices, cpu_only=self.plan.devices is None),
                   **(extra_env or {})}
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=str(self.dir),
                                         start_new_session=True, preexec_fn=_die_with_parent)
        self._write_pids()
        accepted: list = []
        t = threading.Thread(target=lambda: accepted.append(self._accept()), daemon=True)
        t.start()
        deadline = time.monotonic() + timeout
        while t.is_alive():
            t.join(0.1)
            if self.proc.poll() is not None:
                raise GroupError(f"the worker group exited during start-up (code {self.proc.returncode}):\n"
                                 f"{self.failure_report()}")
            if time.monotonic() > deadline:
                raise GroupError(f"the worker group did not answer within {timeout:.0f} s:\n{self.log_tail()}")
            if cancelled is not None and cancelled():
                raise JobCancelled("cancelled while the worker group was starting; it was stopped")
        if not accepted or isinstance(accepted[0], BaseException):
            raise GroupError(f"the worker group could not connect: {accepted[0] if accepted else '?'}")
        self.conn = accepted[0]
        self.listener.close()  # one client, ever: the socket file goes away
        self.listener = None
        if not self.conn.poll(30):
            raise GroupError(f"the worker group connected but never said ready:\n{self.log_tail()}")
        ready = transport.recv(self.conn)
        self.worker_pids = list(ready["pids"])
        self.device = ready.get("device", "?")
        self._write_pids()

    def _accept(self):
        """The first client that proves it holds the authkey (rank 0). One without it is refused before
        any of its bytes is read as a message, and the wait goes on; so does it when a stranger hangs up
        half-way through the handshake. It ends when stop() drops the listener."""
        listener = self.listener
        while True:
            try:
                return listener.accept()
            except AuthenticationError:
                continue
            except BaseException as exc:
                if self.listener is not listener:  # dropped by stop()
                    return exc
                time.sleep(0.01)  # a stranger's broken handshake (EOF, broken pipe, oversized answer)

    def _write_pids(self) -> None:
        idents = [process_identity(self.proc.pid)] if self.proc and self.proc.poll() is None else []
        for pid in self.worker_pids:
            try:
                idents.append(process_identity(pid))
            except Exception:
                pass
        (self.dir / "pids").write_text(json.dumps(idents))

    # ------------------------------------------------------------------------------------- state

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

    # ------------------------------------------------------------------------------------- jobs

    def run(self, job: dict, tensors: dict[str, torch.Tensor], out_shape: tuple[int, ...], on_progress=None,
            cancelled=None, stall_timeout: float = 600.0, on_phase=None,
            on_preview=None) -> tuple[torch.Tensor, dict]:
        """Run one job; tensors travel in shared memory. Returns (LATENT samples, the done message).
        ``on_preview(step, x0_tokens, steps)``: each step's x0 (comfy_pipefusion/preview.py); None: no preview."""
        if not self.alive():
            raise GroupError("the worker group is not running")
        logfile.rotate(self.log_path)
        segs = {}
        try:
            for name, t in tensors.items():
                segs[name] = transport.ShmTensor.from_tensor(t.detach().float().contiguous().cpu())
            segs["out"] = transport.ShmTensor.create(out_shape)
            if on_preview is not None:
                n_img, dim = preview.token_shape(out_shape)
                for name, (shape, dtype) in preview.shapes(n_img, dim, self.plan.world_size,
                                                             job.get("sample", {}).get("steps")).items():
                    segs[name] = transport.ShmTensor.create(shape, dtype)
        except transport.ShmFull as exc:
            for s in segs.values():
                s.close()
            raise JobError(str(exc)) from None
        try:
            jid = secrets.token_hex(8)
            self.busy = True  # until the group's last word on this job
            try:
                transport.send(self.conn, "job", id=jid, tensors={k: s.describe() for k, s in segs.items()}, **job)
            except OSError as exc:  # rank 0 went away since alive() was asked
                self.kill()
                raise GroupError(f"the worker group went away before the job started ({exc}):\n"
                                 f"{self.failure_report()}") from None
            watch = _Watch(on_progress, cancelled, stall_timeout, on_phase)
            if on_preview is not None:
                watch.preview = preview.PreviewReader(segs[preview.DATA].tensor, segs[preview.STAMP].tensor)
                watch.on_preview = on_preview
            reply = self._wait(jid, watch)
            return segs["out"].tensor.clone(), reply
        finally:
            for s in segs.values():
                s.close()

    def _wait(self, jid: str, w: "_Watch") -> dict:
        """Relay the job's messages. A progress callback that raises (ComfyUI's interrupt is raised from
        its progress hook) cancels the job; once every rank has stopped, that exception is re-raised."""
        while True:
            if not w.cancel_sent and (w.raised is not None or (w.cancelled is not None and w.cancelled())):
                transport.send(self.conn, "cancel", id=jid)
                w.cancel_sent = True
            if self.proc.poll() is not None:
                self._drop_connection()
                raise GroupError(f"the worker group died (exit code {self.proc.returncode}){self.root_cause()}:\n"
                                 f"{self.failure_report()}")
            self._watchdog(w)
            conn = self.conn  # None once kill() ran in another thread (ComfyUI is being terminated)
            if conn is None:
                raise GroupError("the worker group was stopped while it ran the job")
            try:
                ready = conn.poll(0.05)
                msg = transport.recv(conn) if ready else None
            except (EOFError, OSError):
                time.sleep(0.5)  # the group is going down: let torchrun finish so its exit is reported
                continue
            if w.preview is not None and w.phase == "sampling" and (msg is None or msg["type"] in ("progress", "done")):
                self._previews(w)  # when nothing came, and before the progress or result that may follow it
            if msg is None or msg.get("id") != jid:
                continue
            w.last = time.monotonic()
            kind = msg["type"]
            if kind in ("done", "cancelled", "error"):
                self.busy = False
            if kind == "phase":
                w.phase, w.steps = msg["phase"], msg.get("steps", w.steps)
                if w.on_phase is not None:
                    w.on_phase(w.phase)
            elif kind == "progress":
                w.step = msg["step"]
                if w.on_progress is not None and w.raised is None:
                    try:
                        w.on_progress(msg["step"], msg["steps"])
                    except BaseException as exc:
                        w.raised = exc
            elif kind in ("done", "cancelled") and w.raised is not None:
                raise w.raised
            elif kind == "done":
                return msg
            elif kind == "cancelled":
                raise JobCancelled(msg.get("message", "cancelled"))
            elif kind == "error":
                raise JobError(msg["message"])

    @staticmethod
    def _previews(w: "_Watch") -> None:
        """Hand each newly finished step's x0 to ``on_preview`` (an exception there cancels, like progress)."""
        for step, x0 in w.preview.poll():
            if w.raised is None:
                try:
                    w.on_preview(step, x0, w.steps)
                except BaseException as exc:
                    w.raised = exc

    def _watchdog(self, w: "_Watch") -> None:
        """Stop the group and raise when a rank went silent (every phase) or sampling stalled."""
        now = time.monotonic()
        if now < w.next_check:
            return
        w.next_check = now + 0.25
        logfile.rotate(self.log_path)
        silent = self.silent_ranks()
        where = f"at step {w.step}/{w.steps}" if w.phase == "sampling" else f"while {w.phase}"
        if silent:
            rank, age = silent[0]
            who = self.describe_rank(rank)
            self.kill()
            raise GroupError(f"{who} stopped responding {where}: no heartbeat for {age:.1f} s (watchdog "
                             f"{self.watchdog_s:g} s, env PIPEFUSION_WATCHDOG_S). The worker group was stopped; "
                             "the next prompt starts a fresh one")
        if w.phase == "sampling" and now - w.last > w.stall_timeout:
            steps = ", ".join(f"rank {r}: {s}" for r, s in self.rank_steps().items())
            self.kill()
            raise GroupError(f"no progress {where} for {w.stall_timeout:g} s although every rank is alive "
                             f"(last finished step per rank: {steps}; env PIPEFUSION_STALL_S). The worker "
                             "group was stopped; the next prompt starts a fresh one")

    # ------------------------------------------------------------------------------------- stop

    def _drop_connection(self) -> None:
        dropped = (self.conn, self.listener)
        self.conn = self.listener = None  # first, so the accepting thread knows the failure is ours
        for c in dropped:
            try:
                if c is not None:
                    c.close()
            except OSError:
                pass

    def kill(self) -> None:
        """End every process of the group now (SIGKILL): for a group that cannot be asked to stop."""
        self._drop_connection()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_tree(read_json(self.dir / "pids", []), grace_s=0)
        if self.proc is not None:
            self.proc.wait()

    def ranks_gone(self) -> bool:
        """No rank runs any more (torchrun may still be tearing down)."""
        for pid in self.worker_pids:
            try:
                if psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    return False
            except psutil.Error:
                pass
        return True

    def stop(self, grace_s: float = 10.0) -> None:
        """Ask the group to exit, then end whatever is left; remove the group directory. Idempotent.
        Once every rank has exited, torchrun gets a moment for its own teardown and is then killed: it
        holds nothing but the rendezvous files in the group directory (this saves ~2 s per group)."""
        if self.conn is not None and self.proc is not None and self.proc.poll() is None:
            try:
                transport.send(self.conn, "shutdown")
                deadline = time.monotonic() + grace_s
                while self.proc.poll() is None and time.monotonic() < deadline and not self.ranks_gone():
                    time.sleep(0.05)
                self.proc.wait(timeout=0.3)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._drop_connection()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL if self.ranks_gone() else signal.SIGTERM)
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        remove_group(self.dir)  # kills anything still listed in the pid file (stopped ones too)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()


class _Watch:
    """What ``WorkerGroup._wait`` tracks for one job."""

    def __init__(self, on_progress, cancelled, stall_timeout: float, on_phase) -> None:
        self.on_progress, self.cancelled, self.stall_timeout, self.on_phase = on_progress, cancelled, stall_timeout, on_phase
        self.cancel_sent, self.raised = False, None
        self.phase, self.step, self.steps = "loading", 0, "?"
        self.last = time.monotonic()
        self.next_check = 0.0
        self.preview, self.on_preview = None, None  # a PreviewReader and its callback, when previews are on
