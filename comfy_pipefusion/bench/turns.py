"""Timed work taken in turns by separate processes, so that none is ever timed beside another's work.

The benchmark times serial in one process and the parallel strategies in a process group. On a shared or
noisy machine the speed drifts over minutes, so it interleaves them (serial, a strategy's runs, serial, the
next strategy's runs, ..., serial) and compares each strategy with the serial runs around it. A
*conductor* (in the benchmark's process) says whose turn it is through files in one folder:

- before its n-th turn, every rank of process TAG touches ``waiting-TAG-n-RANK`` and sleeps (a polling
  sleep: no core taken, no collective pending) until ``go-TAG-n`` exists;
- after its timed runs (which end with a barrier of all its ranks), every rank touches ``done-TAG-n-RANK``;
- the conductor gives a process its turn only when every other process is idle: all its ranks wait for
  their next turn, or it has run all its turns and ended; ``abort`` ends every wait with an error.

The conductor counts a process's files rather than naming its ranks: in a group across machines only the
ranks on the conductor's machine see the folder (c10d numbers the ranks by address, so they need not be
ranks 0..n-1); the other machines' ranks take no turns of their own and wait at the group's first barrier
of the timed runs, which the local ranks reach only on their go.
"""
from __future__ import annotations

import time
from pathlib import Path

POLL_S = 0.02


class TurnAborted(RuntimeError):
    pass


class Turns:
    """One rank's side: ``wait()`` before a turn's timed runs, ``done()`` after them. Without a folder,
    both are no-ops (nothing is interleaved)."""

    def __init__(self, root: Path | None, tag: str, rank: int) -> None:
        self.root, self.tag, self.rank, self.n = root, tag, rank, 0

    def wait(self) -> None:
        if self.root is None:
            return
        (self.root / f"waiting-{self.tag}-{self.n}-{self.rank}").touch()
        go = self.root / f"go-{self.tag}-{self.n}"
        while not go.exists():
            if (self.root / "abort").exists():
                raise TurnAborted(f"the benchmark stopped before turn {self.n} of {self.tag!r} "
                                  "(another process of the comparison failed)")
            time.sleep(POLL_S)

    def done(self) -> None:
        if self.root is not None:
            (self.root / f"done-{self.tag}-{self.n}-{self.rank}").touch()
        self.n += 1


def conduct(root: Path, order: list[str], ranks: dict[str, int], alive, timeout_s: float = 3600.0) -> list[dict]:
    """Give the turns in ``order`` (a list of process tags, one entry per turn). ``ranks``: each tag's
    number of ranks on this machine; ``alive(tag)``: whether that process is still running. Returns when every turn is done,
    with the span of each ([{"process", "start", "end"}], ``time.time()`` seconds). A process that ends
    or stalls before its turns are done aborts them all (``TurnAborted``)."""
    total = {tag: order.count(tag) for tag in ranks}
    taken = {tag: 0 for tag in ranks}
    deadline = time.monotonic() + timeout_s

    def count(what: str, tag: str) -> int:
        return sum(1 for _ in root.glob(f"{what}-{tag}-{taken[tag]}-*"))

    def waiting(tag: str) -> bool:
        return count("waiting", tag) >= ranks[tag]

    def idle(tag: str) -> bool:
        return not alive(tag) if taken[tag] == total[tag] else waiting(tag)

    def until(cond, what: str, tag: str) -> None:
        while not cond():
            if not alive(tag) and not cond():
                raise TurnAborted(f"{tag!r} ended before {what}")
            if time.monotonic() > deadline:
                raise TurnAborted(f"{tag!r} did not get to {what} within {timeout_s:.0f} s")
            time.sleep(POLL_S)

    spans = []
    try:
        for tag in order:
            n = taken[tag]
            until(lambda: waiting(tag), f"its run {n}", tag)
            for other in ranks:
                if other != tag:
                    until(lambda: idle(other), f"idle before run {n} of {tag!r}", other)
            start = time.time()
            (root / f"go-{tag}-{n}").touch()
            until(lambda: count("done", tag) >= ranks[tag], f"the end of its run {n}", tag)
            spans.append({"process": tag, "start": start, "end": time.time()})
            taken[tag] += 1
    except BaseException:
        (root / "abort").touch()
        raise
    return spans
