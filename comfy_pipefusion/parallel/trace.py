"""One rank's own timings of one run, for the bench's timeline picture (comfy_pipefusion/timeline.py).

A ``Trace`` records, on the rank's monotonic clock (CLOCK_MONOTONIC: one clock for every process of a
machine, so the ranks' records line up without any exchange):

- each schedule item's start and end (``Control.track`` wraps the strategy's loop over its schedule: an
  item lasts from the moment the loop takes it to the moment it asks for the next one);
- each wait for a data-plane request (``Pending.wait`` in comm.py): a receive, a send's completion or a
  gather, with what it waited for;
- the run's begin and end (set by whoever times the run).

``to_json`` gives plain lists and numbers: the ranks' records travel to rank 0 through Comm's object
collectives, which carry JSON only.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

ITEM_FIELDS = ("index", "eval", "step", "patch", "patches", "warmup", "start", "end")
WAIT_FIELDS = ("start", "end", "what")


class Trace:
    """Item and wait intervals of one run on one rank (host time, seconds)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.begin = clock()
        self.end: float | None = None
        self.items: list[list] = []
        self.waits: list[list] = []

    def track(self, schedule: Iterable) -> Iterator:
        """The items of ``schedule``, each timed from when it is taken to when the next one is asked for."""
        for item in schedule:
            start = self.clock()
            yield item
            self.items.append([item.index, item.eval, item.step, item.patch, item.patches, bool(item.warmup),
                               start, self.clock()])

    def wait(self, start: float, end: float, what: str) -> None:
        self.waits.append([start, end, what])

    def finish(self) -> None:
        self.end = self.clock()

    def to_json(self) -> dict:
        return {"clock": "monotonic", "begin": self.begin, "end": self.end if self.end is not None else self.clock(),
                "items": [dict(zip(ITEM_FIELDS, it)) for it in self.items],
                "waits": [dict(zip(WAIT_FIELDS, w)) for w in self.waits]}
