"""A warm worker group serving the launcher's jobs.

Rank 0 connects to the launcher's control socket (``GROUP_DIR/control.sock``, authkey in
``GROUP_DIR/authkey``), says ``ready`` with every rank's pid, then relays: each job is broadcast to all
ranks, which attach its shared-memory tensors, load the model (rank 0 says ``phase: loading``), agree on
errors and on a cancel that came while loading, sample (``phase: sampling``, one ``progress`` per step),
and rank 0 writes the LATENT into the output segment. A reader thread on rank 0 takes ``cancel`` while a
job runs. Errors while preparing a job are the same on every rank (validation, a bad file) and are
answered without losing the group; an error while sampling ends this process, torchrun takes the group
down, and the launcher reports the traceback it finds in ``GROUP_DIR/error-rank<r>.txt``.

Every rank beats: a thread rewrites ``GROUP_DIR/beat-rank<r>`` (job id and last finished step) every
``BEAT_S``, so the launcher's watchdog can name a rank that stopped (SIGSTOP, a frozen process).
Every rank dies with its torchrun agent (PR_SET_PDEATHSIG), so no rank outlives the group.
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import threading
import time
import traceback
from pathlib import Path

import torch

from . import preview, transport
from .errors import JobCancelled
from .jobspec import OUTPUT_KEYS, Job, TensorKey
from .parallel.comm import Comm
from .parallel.planner import label
from .parallel.runtime import Control
from .engine import ModelCache, execute, plan_report, prepare, rank_stats

log = logging.getLogger("comfy_pipefusion.serve")
PING_S = 600.0  # idle ranks wait in a control-plane broadcast; keep it well inside the collective timeout
BEAT_S = 0.5  # heartbeat period; the launcher's watchdog allows many missed beats
CANCEL_FILE = "cancel"  # the id of the job rank 0 was told to cancel
CANCEL_POLL_S = 0.05  # how often a loading rank looks at CANCEL_FILE
ENVELOPE = ("type", "id", "tensors")  # a job message's own fields; the rest is the Job's wire form


class _LoadCancelled(Exception):
    """The job was cancelled while this rank read its weights; the half-filled model is dropped."""


def _write_quietly(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError:
        pass  # the group directory is being removed: the launcher is stopping this group


def _load_watch(group_dir: Path, jid: str, delay: float = 0.0):
    """``progress(i, n)`` for the weight load of job ``jid``: raises _LoadCancelled within CANCEL_POLL_S of a
    cancel, on every rank (each reads CANCEL_FILE). ``delay`` (seconds, tests only: the worker's
    ``--debug-load-delay-s``) is spread over the tensors read, so that a test can cancel a load in progress."""
    path, seen = group_dir / CANCEL_FILE, [0.0]

    def cancelled() -> bool:
        try:
            return path.read_text() == jid
        except OSError:
            return False

    def progress(i: int, n: int) -> None:
        end = time.monotonic() + delay / max(n, 1)
        while True:
            now = time.monotonic()
            if now - seen[0] >= CANCEL_POLL_S:
                seen[0] = now
                if cancelled():
                    raise _LoadCancelled(f"cancelled while reading tensor {i + 1} of {n}")
            if now >= end:
                return
            time.sleep(min(CANCEL_POLL_S, end - now))
    return progress


class _Inbox:
    """Rank 0's reader of the control socket: jobs go to a queue, cancel sets a flag and, for the ranks that
    are loading weights (no collective runs then), writes the job id to ``GROUP_DIR/cancel``."""

    def __init__(self, conn, group_dir: Path) -> None:
        self.conn, self.jobs, self.cancel_id = conn, queue.Queue(), None
        self.cancel_file = group_dir / CANCEL_FILE
        self.current = None
        threading.Thread(target=self._read, name="pipefusion-control", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                msg = transport.recv(self.conn)
                if msg["type"] == "cancel":
                    self.cancel_id = msg.get("id")
                    _write_quietly(self.cancel_file, str(self.cancel_id))
                elif msg["type"] in ("job", "shutdown"):
                    self.jobs.put(msg)
        except (EOFError, OSError, ValueError):
            self.cancel_id = self.current  # the launcher is gone: stop what runs, then exit
            self.jobs.put({"type": "shutdown"})

    def cancelled(self) -> bool:
        return self.current is not None and self.cancel_id == self.current


class _Heartbeat:
    """This rank's sign of life: ``GROUP_DIR/beat-rank<r>`` rewritten every BEAT_S by a daemon thread."""

    def __init__(self, group_dir: Path, rank: int) -> None:
        self.path, self.job, self.step = group_dir / f"beat-rank{rank}", "", 0
        self._beat_once()
        threading.Thread(target=self._beat, name="pipefusion-heartbeat", daemon=True).start()

    def _beat_once(self) -> None:
        try:
            self.path.write_text(f"{self.job} {self.step}")
        except OSError:
            pass  # the group directory is being removed: the launcher is stopping this group

    def _beat(self) -> None:
        while True:
            time.sleep(BEAT_S)
            self._beat_once()


def _die_with_agent() -> None:
    """SIGKILL this rank when its parent (the torchrun agent, or the launcher for one rank) dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _write_error(group_dir: Path, rank: int) -> None:
    try:
        (group_dir / f"error-rank{rank}.txt").write_text(traceback.format_exc())
    except OSError:
        pass


def serve(group_dir: Path, comm: Comm, device: torch.device, load_delay_s: float = 0.0) -> None:
    _die_with_agent()
    beat = _Heartbeat(group_dir, comm.rank)
    conn = inbox = None
    if comm.rank == 0:
        conn = transport.connect(group_dir / "control.sock", (group_dir / "authkey").read_bytes())
        inbox = _Inbox(conn, group_dir)
    pids = comm.gather_object(os.getpid())
    if conn is not None:
        transport.send(conn, "ready", pids=pids, world_size=comm.world_size, device=str(device))
    models, stamp = ModelCache(device), None
    try:
        while True:
            msg = None
            if comm.rank == 0:
                try:
                    msg = inbox.jobs.get(timeout=PING_S)
                except queue.Empty:
                    msg = {"type": "ping"}
            msg = comm.broadcast_object(msg)  # idle ranks wait here, on the CPU control plane
            if msg["type"] == "shutdown":
                return
            if msg["type"] == "job":
                if msg.get("model_stamp") != stamp:  # the checkpoint file changed on disk: read it again
                    models, stamp = ModelCache(device), msg.get("model_stamp")
                models.progress = _load_watch(group_dir, msg["id"], load_delay_s)
                _serve_job(msg, comm, device, models, conn, inbox, beat)
    except BaseException:
        _write_error(group_dir, comm.rank)
        raise


def _prepare(msg: dict, comm: Comm, models: ModelCache, segs: dict):
    """(Prepared, None, False), (None, the error, False) or (None, None, True) when a cancel stopped this
    rank's weight load: read the job (``Job.to_wire`` beside the message's type, id and tensors), attach
    the tensors, load the model."""
    try:
        job = Job.from_wire({k: v for k, v in msg.items() if k not in ENVELOPE}, comm.world_size)
        for k, d in msg.get("tensors", {}).items():
            segs[k] = transport.ShmTensor.attach(d)
        tensors = {k: s.tensor for k, s in segs.items() if k not in OUTPUT_KEYS}
        return prepare(job, comm, models, tensors), None, False
    except _LoadCancelled as exc:
        log.info("job %s: %s", msg["id"], exc)
        return None, None, True
    except Exception as exc:  # the same on every rank: answer it, keep the group
        return None, f"{type(exc).__name__}: {exc}", False


def _serve_job(job: dict, comm: Comm, device: torch.device, models: ModelCache, conn, inbox, beat) -> None:
    jid = job["id"]
    beat.job, beat.step = jid, 0
    segs: dict = {}
    try:
        if conn is not None:
            transport.send(conn, "phase", id=jid, phase="loading")
            # the weights are read (a plan that auto chose may hold other modules than the last job's)
            models.on_read = lambda cfg: transport.send(conn, "phase", id=jid, phase="loading", reading=True,
                                                        plan=label(cfg))
        try:
            prep, err, stopped = _prepare(job, comm, models, segs)
        finally:
            models.on_read = None
        votes = comm.gather_object([err, bool(stopped or (inbox is not None and inbox.cancel_id == jid))])
        first_err = next((e for e, _ in votes if e), None)
        if first_err:
            if conn is not None:
                rank = [e for e, _ in votes].index(first_err)
                transport.send(conn, "error", id=jid, phase="prepare", message=first_err, rank=rank)
            return
        if any(c for _, c in votes):  # a cancel came while the ranks were loading: no rank samples
            if conn is not None:
                transport.send(conn, "cancelled", id=jid, message="cancelled while loading the model")
            return
        steps = prep.spec.steps
        if conn is not None:
            transport.send(conn, "phase", id=jid, phase="sampling", steps=steps)
            inbox.current = jid

        def on_step(t: int) -> None:
            beat.step = t + 1
            if conn is not None:
                transport.send(conn, "progress", id=jid, step=t + 1, steps=steps)

        writer = preview.PreviewWriter(segs[preview.DATA].tensor, segs[preview.STAMP].tensor, comm.rank) \
            if preview.DATA in segs else None  # the job wants previews
        control = Control(on_step=on_step, cancelled=inbox.cancelled if inbox else None, preview=writer)
        comm.reset_counters()
        start = time.perf_counter()
        try:
            samples = execute(prep, comm, device, control)
        except JobCancelled as exc:
            if conn is not None:
                transport.send(conn, "cancelled", id=jid, message=str(exc))
            return
        finally:
            if inbox is not None:
                inbox.current = None
        wall = time.perf_counter() - start
        stats = rank_stats(prep, comm)
        if conn is not None:
            out = segs[TensorKey.OUT].tensor
            copied = time.perf_counter()
            out.copy_(samples.reshape(out.shape))
            transport.send(conn, "done", id=jid, wall_s=wall, pids=[s["pid"] for s in stats],
                           param_bytes_per_rank=[s["param_bytes"] for s in stats],
                           wait_s_per_rank=[s["wait_s"] for s in stats],
                           transfer_s_per_rank=[s["transfer_s"] for s in stats],
                           copy_s=time.perf_counter() - copied, plan=plan_report(prep, wall))
    finally:
        for s in segs.values():
            s.close()
