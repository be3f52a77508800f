"""One torchrun worker group: start, handshake, stop (its health: health.py; its jobs: jobrun.py).

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
import secrets
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from multiprocessing import AuthenticationError

from comfy_pipefusion import transport
from comfy_pipefusion.errors import GroupError, JobCancelled
from comfy_pipefusion.oneshot import worker_command, worker_env

from .health import GroupHealth
from .jobrun import GroupJobs
from .sweep import kill_tree, process_identity, read_json, remove_group, sweep

log = logging.getLogger("comfy_pipefusion.launcher")
DEBUG_LOAD_DELAY = "PIPEFUSION_DEBUG_LOAD_DELAY_S"  # tests only: see debug_worker_args


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


class WorkerGroup(GroupHealth, GroupJobs):
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
