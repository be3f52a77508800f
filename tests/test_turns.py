"""The benchmark's turn-taking (turns.py): runs alternate, nobody runs while another process is busy, and
a process that dies ends the comparison with an error instead of leaving the others waiting."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from comfy_pipefusion.bench.turns import TurnAborted, Turns, conduct


def _process(root: Path, tag: str, ranks: int, runs: int, log: list, busy_s: float = 0.0, die_after: int = -1,
             first: int = 0):
    """A process of ``ranks`` rank threads (numbered from ``first``) taking ``runs`` timed runs; before each
    it is busy for ``busy_s`` (like loading a model) outside any turn. Logs (tag, event, time)."""
    errors: list = []

    def rank(r: int) -> None:
        turns = Turns(root, tag, first + r)
        try:
            for n in range(runs):
                if n == die_after:
                    return
                if r == 0:
                    log.append((tag, "busy", time.monotonic()))
                time.sleep(busy_s)
                turns.wait()
                if r == 0:
                    log.append((tag, "start", time.monotonic()))
                time.sleep(0.05)
                if r == 0:
                    log.append((tag, "end", time.monotonic()))
                turns.done()
        except TurnAborted as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    return threads, errors


def test_turns_alternate_and_wait_for_the_other_process_to_be_idle(tmp_path: Path):
    log: list = []
    a, _ = _process(tmp_path, "serial", 1, 2, log)
    b, _ = _process(tmp_path, "group", 2, 2, log, busy_s=0.3)  # the group "loads" before each of its runs
    procs = {"serial": a, "group": b}
    spans = conduct(tmp_path, ["serial", "group"] * 2, {"serial": 1, "group": 2},
                    alive=lambda tag: any(t.is_alive() for t in procs[tag]), timeout_s=30)
    assert [s["process"] for s in spans] == ["serial", "group", "serial", "group"]
    runs = [(tag, ev, t) for tag, ev, t in log if ev != "busy"]
    assert [(tag, ev) for tag, ev, _ in sorted(runs, key=lambda e: e[2])] == \
        [("serial", "start"), ("serial", "end"), ("group", "start"), ("group", "end")] * 2
    # serial's second run started only after the group had finished its busy spell before its second run
    group_busy = [t for tag, ev, t in log if tag == "group" and ev == "busy"]
    serial_starts = [t for tag, ev, t in log if tag == "serial" and ev == "start"]
    assert serial_starts[1] >= group_busy[1] + 0.3


def test_turns_count_this_machines_ranks_whatever_their_numbers(tmp_path: Path):
    """A group across machines: only this machine's ranks see the folder, and c10d may have numbered them
    2 and 3 (the other machine holds 0 and 1). The conductor counts them: the group's run waits for both,
    and serial's second run for both to be done."""
    log: list = []
    a, _ = _process(tmp_path, "serial", 1, 2, log)
    b, _ = _process(tmp_path, "group", 2, 1, log, busy_s=0.3, first=2)
    procs = {"serial": a, "group": b}
    spans = conduct(tmp_path, ["serial", "group", "serial"], {"serial": 1, "group": 2},
                    alive=lambda tag: any(t.is_alive() for t in procs[tag]), timeout_s=30)
    assert [s["process"] for s in spans] == ["serial", "group", "serial"]
    assert sorted(p.name for p in tmp_path.glob("done-group-0-*")) == ["done-group-0-2", "done-group-0-3"]
    runs = sorted(((t, tag, ev) for tag, ev, t in log if ev != "busy"))
    assert [(tag, ev) for _, tag, ev in runs] == [("serial", "start"), ("serial", "end"), ("group", "start"),
                                                   ("group", "end"), ("serial", "start"), ("serial", "end")]


def test_a_process_that_dies_aborts_the_turns_and_nobody_is_left_waiting(tmp_path: Path):
    log: list = []
    a, a_errors = _process(tmp_path, "serial", 1, 2, log)
    b, _ = _process(tmp_path, "group", 2, 2, log, die_after=1)  # ends after one run of its two
    procs = {"serial": a, "group": b}
    with pytest.raises(TurnAborted, match="'group' ended"):
        conduct(tmp_path, ["serial", "group"] * 2, {"serial": 1, "group": 2},
                alive=lambda tag: any(t.is_alive() for t in procs[tag]), timeout_s=30)
    for t in a + b:
        t.join(5)
        assert not t.is_alive()
    # serial's second run never started: it was waiting for its turn and was released with an error
    assert [tag for tag, ev, _ in log if ev == "start"] == ["serial", "group"]
    assert len(a_errors) == 1 and "another process of the comparison failed" in str(a_errors[0])


def test_a_process_that_stalls_outside_its_turn_aborts_the_turns(tmp_path: Path):
    log: list = []
    a, a_errors = _process(tmp_path, "serial", 1, 2, log)
    b, _ = _process(tmp_path, "group", 1, 1, log, busy_s=3.0)  # "loading" longer than the conductor waits
    procs = {"serial": a, "group": b}
    with pytest.raises(TurnAborted, match="within 1 s"):
        conduct(tmp_path, ["serial", "group", "serial"], {"serial": 1, "group": 1},
                alive=lambda tag: any(t.is_alive() for t in procs[tag]), timeout_s=1)
    for t in a + b:
        t.join(10)
        assert not t.is_alive()
    assert [tag for tag, ev, _ in log if ev == "start"] == []  # the group never got idle: nobody ran
    assert len(a_errors) == 1
