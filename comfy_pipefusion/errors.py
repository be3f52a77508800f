"""How a worker group or its job ends, one name per meaning: raised by the ranks and the one-shot groups
(core) and by the launcher that runs the warm groups for ComfyUI."""
from __future__ import annotations


class GroupError(RuntimeError):
    """The worker group failed (it is gone or unusable); the message leads with the root cause (a hang report
    or a failed self-test, ``failure.py``), then the tail of its output or the failing rank's traceback."""


class JobCancelled(RuntimeError):
    """The job was cancelled; every rank stopped at the same step boundary and the group stays usable."""
