"""The bench (and the one-shot groups of comfy_pipefusion/oneshot.py) end with their owner (issue 15).

A real bench run (a serial process and a two-rank torchrun group) is signalled once all its workers run:
with SIGTERM or SIGINT it ends every process it started and removes its temporary directories itself;
with SIGKILL the kernel ends its processes (PR_SET_PDEATHSIG) and the next one-shot run removes the
directories it could not.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from comfy_pipefusion.oneshot import sweep_tempdirs

from comfy_helpers import left_in, running, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _workers(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if "comfy_pipefusion.worker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["TERM", "INT", "KILL"])
def test_hostile_bench_killed_leaves_no_process_and_no_files(tmp_path, monkeypatch, sig):
    bench = subprocess.Popen([sys.executable, "-m", "comfy_pipefusion.bench", "--preset", "tiny", "--steps", "2000",
                              "--strategies", "serial,pipefusion", "--world-size", "2", "--repeats", "1"],
                             cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        # the serial process, torchrun's agent and its two ranks
        assert wait_until(lambda: len(_workers(bench.pid)) >= 4 or bench.poll() is not None, 180), "no group"
        assert bench.poll() is None, bench.stderr.read()[-2000:]
        started = [p.pid for p in psutil.Process(bench.pid).children(recursive=True)]
        assert list(tmp_path.glob("pipefusion-*"))
        bench.send_signal(sig)
        bench.wait(timeout=30)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert wait_until(lambda: not running(started), 10), running(started)
    left = list(tmp_path.glob("pipefusion-*"))
    if sig == signal.SIGKILL:  # nobody could remove them: the next one-shot run does
        assert left and all(p.name.startswith((f"pipefusion-{bench.pid}-", f"pipefusion-bench-{bench.pid}-"))
                            for p in left)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        assert sorted(sweep_tempdirs()) == sorted(left)
        left = list(tmp_path.glob("pipefusion-*"))
    assert left == []
    assert left_in(tmp_path) == []  # nor torchrun's own folder (by default a new torchelastic_* at every start)
