"""The NCCL-rules emulation (PIPEFUSION_COMM_RULES=nccl) and the control plane's object channel, on real
two-rank torchrun/gloo groups running tests/comm_schedule.py."""
from __future__ import annotations

import logging
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_pipefusion import transport
from comfy_pipefusion.multinode import torchrun_dir
from comfy_pipefusion.oneshot import worker_command, worker_env
from comfy_pipefusion.parallel.comm import ObjectRefused, decode_object, encode_object
from comfy_pipefusion.parallel.rules import HANG_ENV, MODE_ENV, Rules
from comfy_pipefusion.parallel.selftest import EXIT_SELFTEST, MARKER

SCRIPT = Path(__file__).with_name("comm_schedule.py")
HANG_S = 3


def run_schedule(tmp_path: Path, order: str, mode: str, *extra: str, ranks: int = 2) -> tuple[int, str, float]:
    env = worker_env(1, cpu_only=True)
    env.update({MODE_ENV: mode, HANG_ENV: str(HANG_S)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint={tmp_path / 'rdzv.store'}", "--rdzv-conf=store_type=file",
           f"--rdzv-id={os.getpid()}{order}{mode}", "--local-addr=127.0.0.1", "--max_restarts=0",
           "--monitor_interval=0.5", torchrun_dir(tmp_path), str(SCRIPT), order, "--store", str(tmp_path / "pg.store"),
           *extra]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_nccl_rules_report_ring_receive_posted_before_send(tmp_path):
    """The first PipeFusion ordering (stage 0 posts the ring receive, then sends item 0, on one group)
    deadlocks under NCCL's in-order streams: the mode ends it within seconds and names what is stuck."""
    rc, out, wall = run_schedule(tmp_path, "old", "nccl")
    assert rc != 0, out
    assert "HANG rank" in out, out[-3000:]
    assert "waits for recv peer" in out and "shape [4] float32" in out
    assert "'data' (ranks 0, 1)" in out and "issue #0" in out
    assert wall < HANG_S + 40, wall


def test_gloo_hides_the_same_ordering(tmp_path):
    """Plain gloo runs the same schedule to the end: why the CPU suite never saw the hang."""
    rc, out, _ = run_schedule(tmp_path, "old", "gloo")
    assert rc == 0 and "OK rank 0" in out and "OK rank 1" in out, out[-3000:]


def test_hop_and_ring_groups_pass_under_nccl_rules(tmp_path):
    rc, out, _ = run_schedule(tmp_path, "new", "nccl")
    assert rc == 0 and "OK rank 0" in out and "OK rank 1" in out, out[-3000:]


def test_a_long_compute_is_not_a_hang(tmp_path):
    """Rank 0 waits twice the hang timeout while rank 1 computes: not every rank is blocked, no report."""
    rc, out, wall = run_schedule(tmp_path, "slow", "nccl", "--compute-s", str(2 * HANG_S))
    assert rc == 0 and "OK rank 0" in out and "HANG" not in out, out[-3000:]
    assert wall >= 2 * HANG_S


@pytest.mark.parametrize("ranks", (3, pytest.param(4, marks=pytest.mark.slow)))
def test_cancel_leaves_nothing_in_flight_under_nccl_rules(tmp_path, ranks):
    """PipeFusion and DistriFusion cancelled at a step boundary on 3 and 4 ranks under NCCL's rules (on 4 also
    ulysses, cfg+pipefusion, cfg+ulysses, ulysses+pipefusion and ulysses+distrifusion: the branches' and
    the lanes' leaders share rank 0's decision): every rank stops, and the next job on the same group is
    exact (nothing left in flight)."""
    rc, out, _ = run_schedule(tmp_path, "cancel", "nccl", ranks=ranks)
    assert rc == 0, out[-3000:]
    # The ranks print to one pipe: a line of one may run into another's, so the reports are matched, not split.
    exact_methods = ("ulysses", "cfg+pipefusion", "cfg+ulysses", "ulysses+pipefusion", "ulysses+distrifusion") \
        if ranks == 4 else ()
    for strategy in ("pipefusion", "distrifusion") + exact_methods:
        for stop_at in (1, 3):
            stopped = re.findall(rf"CANCELLED {re.escape(strategy)} {stop_at} rank (\d+) after (\d+)", out)
            assert sorted(stopped) == [(str(r), str(stop_at)) for r in range(ranks)], out[-3000:]
        exact = re.findall(rf"EXACT {re.escape(strategy)} (\d[\d.]*(?:e[+-]\d+)?)", out)
        assert exact and float(exact[0]) <= 1e-5, exact
    assert "FINISHED" not in out


def test_rules_settings_are_validated():
    assert Rules.from_env({}).mode == "gloo"
    assert Rules.from_env({MODE_ENV: "nccl", HANG_ENV: "2.5"}) == Rules("nccl", 2.5)
    with pytest.raises(ValueError, match="PIPEFUSION_COMM_RULES='mpi'"):
        Rules.from_env({MODE_ENV: "mpi"})
    with pytest.raises(ValueError, match="PIPEFUSION_COMM_HANG_S='soon'"):
        Rules.from_env({HANG_ENV: "soon"})
    with pytest.raises(ValueError, match="positive"):
        Rules.from_env({HANG_ENV: "0"})


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_hostile_pickle_on_the_control_plane_is_refused(tmp_path):
    """A peer (or a local user on the gloo sockets) that sends a pickle where a JSON object is expected is
    refused with a clear error; the pickle is never loaded (its payload would create a file)."""
    marker = tmp_path / "pwned"
    raw = pickle.dumps(_Payload(str(marker)))
    with pytest.raises(ObjectRefused, match="from rank 1 that are a pickle"):
        decode_object(raw, 1)
    assert decode_object(encode_object({"a": [1, "x"]}).numpy().tobytes(), 0) == {"a": [1, "x"]}
    with pytest.raises(TypeError, match="JSON values only"):
        encode_object(_Payload("x"))
    rc, out, _ = run_schedule(tmp_path, "hostile", "gloo", "--marker", str(marker))
    assert rc == 0, out[-3000:]
    assert "REFUSED rank 0: the control plane received" in out and "a pickle" in out, out[-3000:]
    assert not marker.exists()


def test_selftest_failure_marks_the_group_dir(tmp_path):
    """A data-plane link that delivers wrong bytes ends the group at start-up, names the link and the
    checksums, and leaves the marker the launcher reads (``--selftest-broken-p2p``: the tests' only way in)."""
    cmd = worker_command(2, ["--serve", str(tmp_path), "--selftest-broken-p2p"], tmp_path)
    proc = subprocess.run(cmd, env=worker_env(1, cpu_only=True), capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    marker = tmp_path / MARKER
    assert marker.exists(), out[-3000:]
    assert "link hop 0->1: rank 1 received checksum" in marker.read_text()
    assert f"exitcode  : {EXIT_SELFTEST}" in out, out[-3000:]


def test_selftest_failure_restarts_the_group_once_without_p2p(caplog):
    """The launcher restarts a group whose self-test failed once, with NCCL_P2P_DISABLE=1, and says why."""
    import shutil
    import tempfile

    from launcher.group import GroupPlan, WorkerGroup

    root = transport.private_dir(Path(tempfile.gettempdir()), "pfc-")  # short: the socket path has a limit
    with caplog.at_level(logging.WARNING, logger="comfy_pipefusion.launcher"):
        group = WorkerGroup(GroupPlan(2), root, startup_timeout=120, worker_args=("--selftest-broken-p2p",))
    try:
        assert group.alive() and len(group.worker_pids) == 2
        assert group.p2p_disabled and "link hop 0->1: rank 1 received checksum" in group.p2p_disabled
        assert "restarting the group once with NCCL_P2P_DISABLE=1" in caplog.text
    finally:
        group.stop()
        leftovers = [p.name for p in root.iterdir() if p.name.startswith("group-")]
        shutil.rmtree(root, ignore_errors=True)
    assert not leftovers


def test_every_collective_goes_through_comm():
    """Only parallel/comm.py calls torch.distributed's operations (worker.py starts and ends the group):
    nothing bypasses the counters, the control plane's JSON channel or the NCCL-rules executors."""
    import re

    root = Path(__file__).resolve().parent.parent
    call = re.compile(r"\b(?:dist|torch\.distributed)\.(?:i?send|i?recv|all_\w+|broadcast\w*|barrier|gather\w*|"
                      r"scatter\w*|reduce\w*|batch_isend_irecv|new_group)\b")
    allowed = {root / "comfy_pipefusion" / "parallel" / "comm.py"}
    found = [f"{p.relative_to(root)}: {m.group(0)}"
             for d in ("comfy_pipefusion", "launcher", "nodes") for p in (root / d).rglob("*.py")
             if p not in allowed for m in call.finditer(p.read_text())]
    assert found == [], found
    assert call.search((root / "comfy_pipefusion" / "parallel" / "comm.py").read_text())  # the check can match
