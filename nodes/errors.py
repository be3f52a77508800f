"""Error messages a person can read in ComfyUI's error dialog: the first line says what happened and what
to do; the failing ranks' last error lines follow; the tracebacks and the torchrun log tail go to ComfyUI's
log (its console, and the report the dialog's "Show Report" builds), not into the dialog."""
from __future__ import annotations

import logging

log = logging.getLogger("comfy_pipefusion")

# What to do, by what happened (matched in the launcher's first line); the first match wins.
ADVICE = (
    ("did not answer within", "If the model is large and the disk slow, raise PIPEFUSION_STARTUP_S (seconds); "
                              "otherwise the cause is in the log."),
    ("exited during start-up", "Queue the prompt again to start a fresh group; if it fails again, the rank "
                               "errors below and the log say why."),
    ("died", "Queue the prompt again: the next prompt starts a fresh worker group."),
    ("went away", "Queue the prompt again: the next prompt starts a fresh worker group."),
    ("never said ready", "Queue the prompt again to start a fresh group; the log says what the workers did."),
    ("could not connect", "Queue the prompt again; if it fails again, check that PIPEFUSION_RUN_DIR is a local "
                          "folder only this user can write."),
)
MAX_LINE = 240
DETAILS_NOTE = "(the workers' tracebacks and log tail are in ComfyUI's log)"


def rank_errors(details: str) -> list[str]:
    """The last line of each 'rankN traceback:' block of a launcher failure report, as 'rankN: line'."""
    out, rank, last = [], None, ""
    for line in details.splitlines() + ["worker log:"]:
        if line.endswith(" traceback:") or line == "worker log:":
            if rank is not None and last:
                out.append(f"{rank}: {last if len(last) <= MAX_LINE else last[:MAX_LINE - 1] + '…'}")
            rank, last = (line.split()[0] if line.endswith(" traceback:") else None), ""
        elif rank is not None and line.strip():
            last = line.strip()
    return out


def readable(exc: BaseException, prefix: str = "PipeFusion") -> str:
    """The message for ComfyUI's dialog from a launcher error; its details are logged, not returned."""
    text = str(exc).strip() or type(exc).__name__
    head, _, details = text.partition("\n")
    head = head.rstrip(": ")
    if details.strip():
        log.error("%s: %s; details:\n%s", prefix, head, details)
    advice = next((a for key, a in ADVICE if key in head), "")
    if "next prompt" in head:  # the launcher already said what happens next
        advice = ""
    lines = [f"{prefix}: {head}." + (f" {advice}" if advice else "")]
    lines += rank_errors(details)
    if details.strip():
        lines.append(DETAILS_NOTE)
    return "\n".join(lines)
