"""One torchrun worker group: start, handshake, run jobs, watch, stop.

The group runs ``python -m torch.distributed.run ... -m comfy_pipefusion.worker --serve GROUP_DIR`` in a
session of its own, with a clean environment, and dies with its owner (PR_SET_PDEATHSIG). Everything it
uses lives in GROUP_DIR (mode 0700): the control socket, the authkey (0600), the pid files and the log.
"""
from __future__ import annotations

import ctypes
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from comfy_pipefusion import transport
from comfy_pipefusion.group import worker_command, worker_env

from .sweep import process_identity, remove_group, sweep

class GroupError(RuntimeError):
    """The worker group failed; the message says how, with the failing rank's traceback tail."""


class JobError(RuntimeError):
    """The job was refused or failed while the group stayed usable."""


class JobCancelled(RuntimeError):
    """The job was cancelled; the group stayed usable."""


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


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class WorkerGroup:
    """A started group. ``run`` one job at a time; ``stop`` always leaves nothing behind."""

    def __init__(self, plan: GroupPlan, root: Path, startup_timeout: float = 300.0) -> None:
        self.plan, self.root = plan, root
        self.proc = self.conn = self.listener = None
        self.worker_pids: list[int] = []
        self.busy = False
        sweep(root)
        self.dir = transport.private_dir(root, "group-")
        try:
            self._start(startup_timeout)
        except BaseException:
            self.stop()
            raise

    # ------------------------------------------------------------------------------------- start

    def _start(self, timeout: float) -> None:
        (self.dir / "owner").write_text(json.dumps(process_identity()))
        authkey = secrets.token_bytes(32)
        transport.write_secret(self.dir / "authkey", authkey)
        self.listener = transport.listen(self.dir / "control.sock", authkey)
        self.log_path = self.dir / "worker.log"
        with open(self.log_path, "ab") as log:
            cmd = worker_command(self.plan.world_size, ["--serve", str(self.dir), "--threads", str(self.plan.threads)])
            env = worker_env(self.plan.threads, self.plan.devices, cpu_only=self.plan.devices is None)
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
        try:
            return self.listener.accept()
        except BaseException as exc:  # closed by stop(), or a client without the authkey
            return exc

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
        return self.proc is not None and self.proc.poll() is None and self.conn is not None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no worker log)"

    def failure_report(self) -> str:
        """The failing ranks' traceback tails, then the tail of the group's log (torchrun's summary)."""
        parts = []
        for f in sorted(self.dir.glob("error-rank*.txt")):
            tb = f.read_text(errors="replace").strip().splitlines()
            parts.append(f"{f.stem.replace('error-', '')} traceback:\n" + "\n".join(tb[-8:]))
        return "\n".join(parts + ["worker log:", self.log_tail(15)])

    # ------------------------------------------------------------------------------------- jobs

    def run(self, job: dict, tensors: dict[str, torch.Tensor], out_shape: tuple[int, ...], on_progress=None,
            cancelled=None, stall_timeout: float = 600.0) -> tuple[torch.Tensor, dict]:
        """Run one job; tensors travel in shared memory. Returns (LATENT samples, the done message)."""
        if not self.alive():
            raise GroupError("the worker group is not running")
        segs = {}
        try:
            for name, t in tensors.items():
                segs[name] = transport.ShmTensor.from_tensor(t.detach().float().contiguous().cpu())
            segs["out"] = transport.ShmTensor.create(out_shape)
            jid = secrets.token_hex(8)
            self.busy = True  # until the group's last word on this job
            transport.send(self.conn, "job", id=jid, tensors={k: s.describe() for k, s in segs.items()}, **job)
            reply = self._wait(jid, on_progress, cancelled, stall_timeout)
            return segs["out"].tensor.clone(), reply
        finally:
            for s in segs.values():
                s.close()

    def _wait(self, jid: str, on_progress, cancelled, stall_timeout: float) -> dict:
        """Relay the job's messages. A progress callback that raises (ComfyUI's interrupt is raised from
        its progress hook) cancels the job; once every rank has stopped, that exception is re-raised."""
        cancel_sent, last, raised = False, time.monotonic(), None
        while True:
            if not cancel_sent and (raised is not None or (cancelled is not None and cancelled())):
                transport.send(self.conn, "cancel", id=jid)
                cancel_sent = True
            if self.proc.poll() is not None:
                self._drop_connection()
                raise GroupError(f"the worker group died (exit code {self.proc.returncode}):\n{self.failure_report()}")
            if time.monotonic() - last > stall_timeout:
                raise GroupError(f"no word from the worker group for {stall_timeout:.0f} s; it was stopped")
            try:
                ready = self.conn.poll(0.05)
                msg = transport.recv(self.conn) if ready else None
            except (EOFError, OSError):
                time.sleep(0.5)  # the group is going down: let torchrun finish so its exit is reported
                continue
            if msg is None or msg.get("id") != jid:
                continue
            last = time.monotonic()
            if msg["type"] in ("done", "cancelled", "error"):
                self.busy = False
            if msg["type"] == "progress" and on_progress is not None and raised is None:
                try:
                    on_progress(msg["step"], msg["steps"])
                except BaseException as exc:
                    raised = exc
            elif msg["type"] in ("done", "cancelled") and raised is not None:
                raise raised
            elif msg["type"] == "done":
                return msg
            elif msg["type"] == "cancelled":
                raise JobCancelled(msg.get("message", "cancelled"))
            elif msg["type"] == "error":
                raise JobError(msg["message"])

    # ------------------------------------------------------------------------------------- stop

    def _drop_connection(self) -> None:
        for c in (self.conn, self.listener):
            try:
                if c is not None:
                    c.close()
            except OSError:
                pass
        self.conn = self.listener = None

    def stop(self, grace_s: float = 10.0) -> None:
        """Ask the group to exit, then end whatever is left; remove the group directory. Idempotent."""
        if self.conn is not None and self.proc is not None and self.proc.poll() is None:
            try:
                transport.send(self.conn, "shutdown")
                self.proc.wait(timeout=grace_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._drop_connection()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        remove_group(self.dir)  # kills anything still listed in the pid file
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
