"""Running one job on a started worker group: its tensors into shared memory, the job message, and the
relay of its phases and progress under the watchdog (a silent rank, a stalled step) until it ends. A part
of ``WorkerGroup`` (group.py)."""
from __future__ import annotations

import secrets
import time

import torch

from comfy_pipefusion import preview, transport
from comfy_pipefusion.errors import GroupError, JobCancelled

from . import logfile


class JobError(RuntimeError):
    """The job was refused or failed while the group stayed usable."""


class GroupJobs:
    """``WorkerGroup.run`` and what it needs; uses the group's connection, its health (health.py) and
    ``kill``."""

    def run(self, job: dict, tensors: dict[str, torch.Tensor], out_shape: tuple[int, ...], on_progress=None,
            cancelled=None, stall_timeout: float = 600.0, on_phase=None,
            on_preview=None) -> tuple[torch.Tensor, dict]:
        """Run one job; tensors travel in shared memory. Returns (LATENT samples, the done message, whose
        ``copy_s`` adds the time this process spent copying the tensors in and the samples out).
        ``on_preview(step, x0_tokens, steps)``: each step's x0 (comfy_pipefusion/preview.py); None: no preview."""
        if not self.alive():
            raise GroupError("the worker group is not running")
        logfile.rotate(self.log_path)
        segs = {}
        copy_in = time.perf_counter()
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
        copy_in = time.perf_counter() - copy_in
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
            copy_out = time.perf_counter()
            samples = segs["out"].tensor.clone()
            reply["copy_s"] = float(reply.get("copy_s") or 0.0) + copy_in + time.perf_counter() - copy_out
            return samples, reply
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
                    w.on_phase(w.phase, msg)
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
        for step, x0 in w.preview.poll(w.steps if isinstance(w.steps, int) else None):
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


class _Watch:
    """What ``WorkerGroup._wait`` tracks for one job."""

    def __init__(self, on_progress, cancelled, stall_timeout: float, on_phase) -> None:
        self.on_progress, self.cancelled, self.stall_timeout, self.on_phase = on_progress, cancelled, stall_timeout, on_phase
        self.cancel_sent, self.raised = False, None
        self.phase, self.step, self.steps = "loading", 0, "?"
        self.last = time.monotonic()
        self.next_check = 0.0
        self.preview, self.on_preview = None, None  # a PreviewReader and its callback, when previews are on
