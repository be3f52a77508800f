"""Tells the web extension about the worker group's state (starting, ready, busy, failed, stopped)."""
from __future__ import annotations

EVENT = "pipefusion.status"


def report_state(state: str, detail: str = "", group: str | None = None) -> None:
    """``group``: which group (its key in GET /pipefusion/groups) the state is about."""
    try:
        from server import PromptServer

        data = {"state": state, "detail": detail}
        if group is not None:
            data["group"] = group
        PromptServer.instance.send_sync(EVENT, data)
    except Exception:
        pass  # no server (tests, scripts): nothing to tell
