"""Tells the web extension about the worker group's state (starting, ready, busy, failed, stopped)."""
from __future__ import annotations

EVENT = "pipefusion.status"


def report_state(state: str, detail: str = "") -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(EVENT, {"state": state, "detail": detail})
    except Exception:
        pass  # no server (tests, scripts): nothing to tell
