"""A failed group's root cause reaches the user (issue 10): the first NCCL-rules hang report or data-plane
self-test failure leads the error of one-shot groups and the launcher's failure report, however much the
other ranks wrote after it."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from comfy_pipefusion import failure
from comfy_pipefusion.errors import GroupError
from comfy_pipefusion.multinode import torchrun_dir
from comfy_pipefusion.oneshot import run_jobs, worker_env
from comfy_pipefusion.parallel.rules import HANG_ENV, MODE_ENV

SCRIPT = Path(__file__).with_name("comm_schedule.py")
# What a peer writes once the hung rank is gone: gloo's error, many times over (ranks, frames, torchrun)
PEER_NOISE = ("Traceback (most recent call last):\n  File \"comfy_pipefusion/parallel/comm.py\", line 120, in wait\n"
              "    work.wait()\nRuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed "
              "by peer [127.0.0.1]:29500\n") * 40


@pytest.fixture(scope="module")
def hang_log(tmp_path_factory) -> Path:
    """The real output of a two-rank group that hangs under the NCCL rules (comm_schedule.py ``old``), then
    the peers' noise that pushes it out of a 4,000-character tail."""
    tmp = tmp_path_factory.mktemp("hang")
    env = {**worker_env(1, cpu_only=True), MODE_ENV: "nccl", HANG_ENV: "3"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={tmp / 'rdzv.store'}", "--rdzv-conf=store_type=file", f"--rdzv-id=hang{os.getpid()}",
           "--local-addr=127.0.0.1", "--max_restarts=0", "--monitor_interval=0.5", torchrun_dir(tmp), str(SCRIPT),
           "old", "--store", str(tmp / "pg.store")]
    log = tmp / "worker.log"
    with open(log, "wb") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300,
                            start_new_session=True).returncode
    assert rc != 0, log.read_text()[-3000:]
    with open(log, "a") as fh:
        fh.write(PEER_NOISE)
    return log


def test_comm_hang_report_leads_the_error_of_a_one_shot_group(hang_log):
    text = hang_log.read_text()
    assert "NCCL-rules hang" not in text[-4000:]  # what the error showed before: the tail alone
    msg = failure.log_error("worker group of 2 exited with code 1:", hang_log)
    lines = msg.splitlines()
    assert lines[0] == "worker group of 2 exited with code 1:" and lines[1] == failure.CAUSE
    assert "NCCL-rules hang (PIPEFUSION_COMM_RULES=nccl): every rank has been blocked for 3 s" in lines[2]
    report = msg.split("--- end of the output:")[0]
    assert "waits for recv peer" in report and "'data' (ranks 0, 1)" in report  # the report's own lines
    assert "Under NCCL one communicator runs its operations in issue order" in report
    assert "Connection closed" not in report and msg.endswith(text[-4000:])


def test_comm_hang_report_leads_the_launchers_failure_report(hang_log, tmp_path):
    """The launcher's report (WorkerGroup.failure_report on a group directory holding the same log)."""
    from launcher.group import WorkerGroup

    group = types.SimpleNamespace(dir=tmp_path, log_path=hang_log)
    group.log_tail = lambda lines=30: WorkerGroup.log_tail(group, lines)
    (tmp_path / "error-rank1.txt").write_text(PEER_NOISE[:600])
    report = WorkerGroup.failure_report(group)
    lines = report.splitlines()
    assert lines[0] == failure.CAUSE and "NCCL-rules hang" in lines[1], report[:500]
    assert report.index("rank1 traceback:") > report.index("waits for recv peer")


def test_selftest_failure_leads_the_error_of_a_one_shot_group():
    """A real two-rank group whose data-plane link delivers wrong bytes: the self-test's report comes first."""
    with pytest.raises(GroupError) as info:
        run_jobs("tiny", 0, [{"name": "j", "parallel": {"strategy": "pipefusion"}}], world_size=2, timeout=300,
                 worker_args=["--selftest-broken-p2p"], cpu_only=True)
    lines = str(info.value).splitlines()
    assert lines[1] == failure.CAUSE, str(info.value)[:1000]
    assert "[rank 1/2] data plane self-test failed: link hop 0->1: rank 1 received checksum" in lines[2]


def test_no_report_no_root_cause_line():
    assert failure.first_report("Traceback (most recent call last):\nValueError: x\n") is None
    assert failure.with_cause("h:", "ValueError: x", "tail") == "h:\ntail"
    assert failure.cause_block(lambda: (_ for _ in ()).throw(FileNotFoundError("gone"))) == []


def test_comm_hang_report_through_torchruns_rank_tags(hang_log):
    """torchrun writes a rank's traceback with '[rank0]: ' before each line: the report keeps all its lines."""
    report = failure.first_report(hang_log.read_text())
    tagged = "".join(f"[rank0]: {line}\n" for line in
                     ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
                      *f"comfy_pipefusion.parallel.rules.CommHang: {report}".splitlines()]) + \
        "[rank1]: RuntimeError: closed\n"
    assert failure.first_report(tagged) == report and len(report.splitlines()) >= 4
