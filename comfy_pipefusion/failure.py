"""The root cause of a failed worker group, found in its output and put first in the error.

When one rank reports a communication failure, the others then fail too ("connection closed", torchrun's
summary), and their tracebacks come after the report: a tail of the log shows them and not the cause.
The first such report in the output is the cause: a ``CommHang`` of the NCCL-rules mode
(``parallel/rules.py``) or the data plane's self-test failure (``parallel/selftest.py``). One-shot groups
(``group.run_jobs``) and the launcher's failure report both put it at the top of their message.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# How each report begins: the CommHang message's first words, the self-test's log line or exception.
_STARTS = re.compile(r"NCCL-rules hang \(|data plane self-test failed: |SelfTestFailed: ")
# A line that begins something else: a blank line, a traceback, a log record, an exception, a banner.
_OTHER = re.compile(r"\s*$|Traceback |During handling|The above exception|\s+File \"|\[|[IWEF]\d{4} |"
                    r"\d{4}-\d\d-\d\d|[\w.]+(?:Error|Exception|Exit|Interrupt|Hang|Failed)\b|=+|-+$")
_TAG = re.compile(r"\[rank\d+\]: ?")
MAX_LINES = 12  # a hang report is five or six lines
SCAN_BYTES = 2 ** 20  # how much of a log's end is searched


def first_report(text: str) -> str | None:
    """The first communication failure report in ``text`` (its lines), or None."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _STARTS.search(line)
        if m is None:
            continue
        rank = re.search(r"\[rank \d+/\d+\]", line[:m.start()])  # a log record says which rank
        out = [(rank.group(0) + " " if rank else "") + line[m.start():].strip()]
        tag = _TAG.match(line)  # torchrun's "[rank0]: " before each line of a rank's stderr
        for nxt in lines[i + 1:i + MAX_LINES]:
            if tag:
                if not nxt.startswith(tag.group(0)):
                    break
                nxt = nxt[len(tag.group(0)):]
            if _OTHER.match(nxt):
                break
            out.append(nxt.rstrip())
        return "\n".join(out)
    return None


CAUSE = "root cause (the first communication failure in the group's output):"


def cause_block(read) -> list[str]:
    """``[CAUSE + the report]`` from the text ``read()`` returns, or [] (no report, or no log: OSError)."""
    try:
        cause = first_report(read())
    except OSError:
        return []
    return [f"{CAUSE}\n{cause}"] if cause else []


def with_cause(header: str, text: str, tail: str) -> str:
    """``header``, then the first report found in ``text`` (when there is one), then ``tail``."""
    cause = first_report(text)
    if cause is None:
        return f"{header}\n{tail}"
    return f"{header}\n{CAUSE}\n{cause}\n--- end of the output:\n{tail}"


def read_end(path: Path, nbytes: int = SCAN_BYTES) -> str:
    """The last ``nbytes`` of a file, as text."""
    with open(path, "rb") as fh:
        fh.seek(max(0, fh.seek(0, os.SEEK_END) - nbytes))
        return fh.read().decode(errors="replace")


def log_error(header: str, path: Path, tail_chars: int = 4000) -> str:
    """The error text of a group that wrote ``path``: its root cause first, then the log's last characters."""
    text = read_end(path)
    return with_cause(header, text, text[-tail_chars:])
