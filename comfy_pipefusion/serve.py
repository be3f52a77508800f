"""A warm worker group serving the launcher's jobs.

Rank 0 connects to the launcher's control socket (``GROUP_DIR/control.sock``, authkey in
``GROUP_DIR/authkey``), says ``ready`` with every rank's pid, then relays: each job is broadcast to all
ranks, which attach its shared-memory tensors, sample, and rank 0 writes the LATENT into the output
segment. A reader thread on rank 0 takes ``cancel`` while a job runs. Errors while preparing a job are
the same on every rank (validation, a bad file) and are answered without losing the group; an error while
sampling ends this process, torchrun takes the group down, and the launcher reports the traceback it
finds in ``GROUP_DIR/error-rank<r>.txt``.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from . import transport
from .parallel.comm import Comm
from .parallel.runtime import Control, JobCancelled
from .worker import ModelCache, execute, prepare, rank_stats

log = logging.getLogger("comfy_pipefusion.serve")
PING_S = 600.0  # idle ranks wait in a broadcast; keep it well inside the collective timeout


class _Inbox:
    """Rank 0's reader of the control socket: jobs go to a queue, cancel sets a flag."""

    def __init__(self, conn) -> None:
        self.conn, self.jobs, self.cancel_id = conn, queue.Queue(), None
        self.current = None
        threading.Thread(target=self._read, name="pipefusion-control", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                msg = transport.recv(self.conn)
                if msg["type"] == "cancel":
                    self.cancel_id = msg.get("id")
                elif msg["type"] in ("job", "shutdown"):
                    self.jobs.put(msg)
        except (EOFError, OSError):
            self.cancel_id = self.current  # the launcher is gone: stop what runs, then exit
            self.jobs.put({"type": "shutdown"})

    def cancelled(self) -> bool:
        return self.current is not None and self.cancel_id == self.current


def _broadcast(obj, comm: Comm):
    if comm.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _attach(job: dict) -> tuple[dict, dict]:
    segs = {k: transport.ShmTensor.attach(d) for k, d in job.get("tensors", {}).items()}
    tensors = {k: s.tensor for k, s in segs.items() if k != "out"}
    return segs, tensors


def _write_error(group_dir: Path, rank: int) -> None:
    try:
        (group_dir / f"error-rank{rank}.txt").write_text(traceback.format_exc())
    except OSError:
        pass


def serve(group_dir: Path, comm: Comm, device: torch.device) -> None:
    conn = inbox = None
    if comm.rank == 0:
        conn = transport.connect(group_dir / "control.sock", (group_dir / "authkey").read_bytes())
        inbox = _Inbox(conn)
    pids = [os.getpid()]
    if comm.world_size > 1:
        pids = [None] * comm.world_size
        dist.all_gather_object(pids, os.getpid())
    if conn is not None:
        transport.send(conn, "ready", pids=pids, world_size=comm.world_size, device=str(device))
    models = ModelCache(device)
    try:
        while True:
            msg = None
            if comm.rank == 0:
                try:
                    msg = inbox.jobs.get(timeout=PING_S)
                except queue.Empty:
                    msg = {"type": "ping"}
            msg = _broadcast(msg, comm)
            if msg["type"] == "shutdown":
                return
            if msg["type"] == "job":
                _serve_job(msg, comm, device, models, conn, inbox)
    except BaseException:
        _write_error(group_dir, comm.rank)
        raise


def _serve_job(job: dict, comm: Comm, device: torch.device, models: ModelCache, conn, inbox) -> None:
    jid = job["id"]
    segs, tensors = _attach(job)
    try:
        try:
            prep, err = prepare(job, comm, models, tensors), None
        except Exception as exc:  # the same on every rank: answer it, keep the group
            prep, err = None, f"{type(exc).__name__}: {exc}"
        errors = [err]
        if comm.world_size > 1:
            errors = [None] * comm.world_size
            dist.all_gather_object(errors, err)
        first_err = next((e for e in errors if e), None)
        if first_err:
            if conn is not None:
                transport.send(conn, "error", id=jid, phase="prepare", message=first_err, rank=errors.index(first_err))
            return
        steps = prep.spec.steps
        if inbox is not None:
            inbox.current = jid

        def on_step(t: int) -> None:
            if conn is not None:
                transport.send(conn, "progress", id=jid, step=t + 1, steps=steps)

        control = Control(on_step=on_step, cancelled=inbox.cancelled if inbox else None)
        comm.bytes_sent = 0
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
            segs["out"].tensor.copy_(samples.reshape(segs["out"].tensor.shape))
            transport.send(conn, "done", id=jid, wall_s=wall, pids=[s["pid"] for s in stats],
                           param_bytes_per_rank=[s["param_bytes"] for s in stats])
    finally:
        for s in segs.values():
            s.close()
