"""The launcher the nodes call: at most one warm group per Launcher, restarted when the plan changes or
the group died, and stopped when the process exits. Several Launchers (one per plan) live in a
``GroupRegistry`` (registry.py).

Timeouts (seconds) come from the arguments, else from the environment:
``PIPEFUSION_WATCHDOG_S`` (default 60): a rank without a heartbeat for this long is declared hung, the
group is killed and the prompt fails naming the rank; ``PIPEFUSION_STALL_S`` (default 600): no step
finished for this long while sampling, with every rank alive (a deadlock); ``PIPEFUSION_STARTUP_S``
(default 300): start-up of the group.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import threading
import time
import weakref
from pathlib import Path

from comfy_pipefusion import transport

from .group import GroupError, GroupPlan, JobCancelled, WorkerGroup
from .jobrun import JobError
from .progress import LoadProgress
from .sweep import sweep

STATES = ("stopped", "starting", "loading", "ready", "busy", "failed")
log = logging.getLogger("comfy_pipefusion.launcher")


def env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={raw!r}: give a number of seconds greater than 0 (default {default:g})")
    return value


def _stop_at_exit(ref) -> None:
    launcher = ref()
    if launcher is not None:
        launcher.stop_or_kill()


class Launcher:
    """Owns one worker group at a time. Starting a group removes what dead owners left behind; this
    process's other groups are the registry's business. ``lock`` is held while a job runs or the group
    starts or stops: another thread that finds it taken leaves the group alone."""

    def __init__(self, root: Path | None = None, on_state=None, startup_timeout: float | None = None,
                 stall_timeout: float | None = None, watchdog_s: float | None = None) -> None:
        self.root = root or transport.run_root()
        self.on_state = on_state
        self.startup_timeout = startup_timeout or env_seconds("PIPEFUSION_STARTUP_S", 300.0)
        self.stall_timeout = stall_timeout or env_seconds("PIPEFUSION_STALL_S", 600.0)
        self.watchdog_s = watchdog_s or env_seconds("PIPEFUSION_WATCHDOG_S", 60.0)
        self.group: WorkerGroup | None = None
        self.state, self.detail = "stopped", ""
        self.lock = threading.RLock()
        self.last_used = time.monotonic()  # the end of the last job (or start-up)
        self.last_job: dict | None = None  # job_times of the last finished job (with its plan)
        self.weights: str | None = None  # which weights the group holds (weights_of), once a job loaded them
        self.exiting = False  # set by kill_now: no state but its "stopped" follows
        atexit.register(_stop_at_exit, weakref.ref(self))

    def _set(self, state: str, detail: str = "", final: bool = False) -> None:
        if self.exiting and not final:  # the process is being terminated: kill_now's "stopped" is the last word
            return
        self.state, self.detail = state, detail
        if self.on_state is not None:
            try:
                self.on_state(state, detail)
            except Exception:
                pass

    def _ended(self, why: str) -> None:
        """The group is gone after a failure: "failed" says why, "stopped" that nothing runs any more (a
        group that ends for any reason is reported "stopped" last)."""
        self._set("failed", why)
        self._set("stopped", f"failed: {why}")

    def _usable(self, plan: GroupPlan) -> bool:
        """The warm group can take a job of ``plan``; a group that died or hung while idle is reported
        (log and state) and stopped, so that a fresh one starts."""
        g = self.group
        if g is None or g.plan != plan:
            return False
        return not self.drop_if_broken()

    def drop_if_broken(self) -> bool:
        """Stop (and reap) an idle group that died or hung, reporting why; True when it did so."""
        with self.lock:
            g = self.group
            why = g.trouble() if g is not None else None
            if why is None:
                return False
            log.warning("PipeFusion: the idle worker group %s; it was stopped, the next prompt starts a fresh "
                        "one.\n%s", why, g.failure_report())
            g.kill()
            g.stop()
            self.group = None
            self._ended(f"the idle group {why}")
            return True

    def ensure(self, plan: GroupPlan, cancelled=None) -> WorkerGroup:
        """The warm group for ``plan``: reused when alive and of the same plan, else (re)started.
        ``cancelled()`` true during start-up stops the new group and raises JobCancelled."""
        with self.lock:
            return self._ensure(plan, cancelled)

    def _ensure(self, plan: GroupPlan, cancelled=None, announce: bool = True) -> WorkerGroup:
        """``announce``: say "ready" once started (a job that follows says what happens next instead)."""
        if self._usable(plan):
            return self.group
        self.stop()
        self.weights = None
        self._set("starting", f"{plan.world_size} ranks")
        sweep(self.root)  # what dead owners left; this process's other groups stay
        try:
            self.group = WorkerGroup(plan, self.root, self.startup_timeout, cancelled, self.watchdog_s)
        except JobCancelled:
            self._set("stopped", "cancelled while starting")
            raise
        except BaseException as exc:
            self._ended(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        self.last_used = time.monotonic()
        if announce:
            self._set("ready", f"{plan.world_size} ranks on {self.group.device}")
        return self.group

    def run(self, plan: GroupPlan, job: dict, tensors: dict, out_shape: tuple[int, ...], on_progress=None,
            cancelled=None, on_preview=None):
        """``on_preview(step, x0_tokens, steps)``: called with each step's x0 when given (previews cost
        nothing otherwise)."""
        with self.lock:
            try:
                return self._run(plan, job, tensors, out_shape, on_progress, cancelled, on_preview)
            finally:
                self.last_used = time.monotonic()

    def _run(self, plan, job, tensors, out_shape, on_progress, cancelled, on_preview=None):
        # States that mean something: "loading" only when the weights are read (the workers announce the
        # phase on every job, a cache hit included), "busy" from the first step, no "ready" in between.
        group = self._ensure(plan, cancelled, announce=False)
        weights, held = weights_of(job), self.weights
        self.weights = None  # until this job has the weights in place

        progress = LoadProgress(group.worker_pids, lambda detail: self._set("loading", detail))

        def on_phase(phase: str, msg: dict | None = None) -> None:
            # "loading" when this job's settings name other weights than the group holds, or when rank 0
            # says it reads weights (``reading``): strategy=auto may pick a plan whose stage split differs
            # from the last job's, which the job's settings do not show
            reading = bool(msg and msg.get("reading"))
            if phase != "loading":
                progress.stop()
                self._set("busy")
            elif weights != held or reading:
                plan = msg.get("plan") if reading else None
                if reading and weights == held:
                    log.info("PipeFusion: auto picked %s, whose stage split differs from the weights the group "
                             "holds: the ranks read them again", plan)
                self._set("loading", f"reading the weights for {plan}" if plan else "reading the weights")
                progress.start()

        try:
            result = group.run(job, tensors, out_shape, on_progress, cancelled, self.stall_timeout,
                               on_phase=on_phase, on_preview=on_preview)
        except (JobCancelled, JobError):
            progress.stop()
            self._set("ready")
            raise
        except BaseException as exc:
            progress.stop()
            if group.alive() and not group.busy and not isinstance(exc, GroupError):  # the job ended cleanly
                self._set("ready")
                raise
            group.stop()
            self.group = None
            self._ended(str(exc).splitlines()[0] if isinstance(exc, GroupError) else type(exc).__name__)
            raise
        progress.stop()
        self.last_job = job_times(result[1])
        self.weights = weights
        self._set("ready", plan_detail(self.last_job.get("plan")))
        return result

    def stop(self) -> None:
        with self.lock:
            if self.group is not None:
                self.group.stop()
                self.group = None
                self._set("stopped")

    def stop_or_kill(self) -> None:
        """Stop the group, or kill it when a job holds it (the process is exiting: no waiting for the job)."""
        if self.lock.acquire(blocking=False):
            try:
                self.stop()
            finally:
                self.lock.release()
        else:
            self.kill_now()

    def kill_now(self) -> None:
        """End the group at once without waiting for a job or the lock (ComfyUI is being terminated):
        SIGKILL, reap torchrun, remove the group directory."""
        g = self.group
        self.exiting = True  # a job's thread that sees its group die says nothing more
        if g is not None:  # said first: the failed prompt's own message follows the kill
            self._set("stopped", "ComfyUI is exiting", final=True)
            g.kill()
            shutil.rmtree(g.dir, ignore_errors=True)


def weights_of(job: dict) -> str:
    """What decides the weights a rank holds for ``job``: the checkpoint (and its file stamp), the dtype,
    and the plan's split; not the per-job settings (patches, warm-up steps, sampling)."""
    per_job = ("patches", "warmup_steps", "text_stream")
    parallel = {k: v for k, v in job.get("parallel", {}).items() if k not in per_job}
    return json.dumps([job.get("model"), job.get("model_stamp"), job.get("sample", {}).get("dtype"), parallel],
                      sort_keys=True, default=str)


def job_times(done: dict) -> dict:
    """{"wall_s", "compute_s", "wait_s", "transfer_s"} of a "done" message, in seconds, with compute + wait +
    transfer = wall: ``wall_s`` the sampling time plus the shared-memory copies of the job's tensors (the
    launcher's inputs and output, rank 0's result: ``copy_s``); ``wait_s`` the ranks' mean time waiting for
    data from each other; ``transfer_s`` the copies plus the ranks' mean time moving their own data out
    (sends); ``compute_s`` the rest. Without the ranks' counters (an older worker) only ``wall_s`` is known."""
    wall = done.get("wall_s")
    waits, sends = done.get("wait_s_per_rank"), done.get("transfer_s_per_rank")
    copies = float(done.get("copy_s") or 0.0)
    if wall is None or not waits:
        return {"wall_s": wall, "compute_s": None, "wait_s": None, "transfer_s": None, "plan": done.get("plan")}
    wait = sum(waits) / len(waits)
    send = sum(sends) / len(sends) if sends else 0.0
    return {"wall_s": wall + copies, "compute_s": wall - wait - send, "wait_s": wait,
            "transfer_s": send + copies, "plan": done.get("plan")}


def plan_detail(plan: dict | None) -> str:
    """The status line of a finished job's plan: which one ran (and that auto chose it), predicted and measured."""
    if not plan:
        return ""
    pred = f"predicted {plan['predicted_s']:.2f} s, " if plan.get("predicted_s") is not None else ""
    return f"last job: {plan['plan']}{' (auto)' if plan.get('auto') else ''}, {pred}measured {plan['measured_s']:.2f} s"
