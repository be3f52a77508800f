"""The bench's timeline picture: one run of each strategy, one lane per rank, from the ranks' own timings
(parallel/trace.py, gathered by rank 0 after the run).

Along each lane, in time order:

- ``setup``: from the run's begin to the rank's first item (embeddings, buffers);
- ``warmup`` / ``compute``: a schedule item's time not spent waiting, warm-up items (whole image,
  synchronous) in their own colour;
- waits for a data-plane request inside an item: ``fill`` during the first evaluation after the warm-up
  (the pipeline filling: a stage waits for the stage before it), ``drain`` during the last evaluation,
  ``wait`` in between (bubbles, imbalance, transfer);
- ``drain`` also from the rank's last item to the end of the run (the rank is done; the others finish).

A white hairline marks where each item begins.

``meetings`` reads the same timings another way: at each synchronous collective (Ulysses' all-to-alls), how
far apart the ranks arrived, how long the exchange took once the last had, and what the group lost waiting for
the slowest, as a share of the compute between two meetings (the simulator's ``straggle``, measured in the job).

Times are seconds from the earliest ``begin`` of the section's ranks (one monotonic clock per machine).
``geometry`` says where a time and a rank land in the picture, so a test can read the picture back.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

KINDS = ("setup", "warmup", "compute", "fill", "wait", "drain")
COLORS = {"setup": (190, 190, 190), "warmup": (46, 125, 50), "compute": (21, 101, 192), "fill": (239, 140, 0),
          "wait": (198, 40, 40), "drain": (142, 36, 170)}
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


@dataclass(frozen=True)
class Segment:
    kind: str
    start: float
    """Seconds from the section's time zero."""
    end: float


def segments(rank: dict, zero: float) -> list[Segment]:
    """One rank's trace (``Trace.to_json``) as coloured segments, in time order; waits are cut out of the
    items that contain them."""
    items = sorted(rank["items"], key=lambda it: it["start"])
    out: list[Segment] = []
    if not items:
        return [Segment("setup", rank["begin"] - zero, rank["end"] - zero)]
    async_evals = sorted({it["eval"] for it in items if not it["warmup"]})
    first_async = async_evals[0] if async_evals else None
    last_eval = max(it["eval"] for it in items)
    waits = sorted(rank["waits"], key=lambda w: w["start"])
    out.append(Segment("setup", rank["begin"] - zero, items[0]["start"] - zero))
    for it in items:
        kind = "warmup" if it["warmup"] else "compute"
        phase = "fill" if it["eval"] == first_async else "drain" if it["eval"] == last_eval else "wait"
        t = it["start"]
        for w in waits:
            a, b = max(w["start"], it["start"]), min(w["end"], it["end"])
            if b <= a:
                continue
            if a > t:
                out.append(Segment(kind, t - zero, a - zero))
            out.append(Segment(phase if not it["warmup"] else "wait", a - zero, b - zero))
            t = max(t, b)
        if it["end"] > t:
            out.append(Segment(kind, t - zero, it["end"] - zero))
    out.append(Segment("drain", items[-1]["end"] - zero, rank["end"] - zero))
    return [s for s in out if s.end > s.start]


@dataclass(frozen=True)
class Meetings:
    """The ranks' meetings at one synchronous collective channel over one run (seconds)."""

    count: int
    spread: float
    """Mean over meetings of the last rank's arrival less the first's."""
    transfer: float
    """Mean over meetings of the first return less the last arrival: the exchange itself."""
    between: float
    """Median over meetings (but the first) of the ranks' mean time from the previous meeting's return."""
    straggle: float
    """What the group lost to the slowest rank (last arrival less the ranks' mean arrival) over the compute
    between meetings (the ranks' mean), both summed over every meeting but the first."""


def meetings(ranks: list[dict], kind: str = "all_to_all") -> dict[str, Meetings]:
    """Per channel of synchronous ``kind`` waits (``"<kind> <channel>"``), over the ranks that waited on it:
    their n-th waits there are one meeting (every member of a collective waits for it in the same order).
    A channel whose members waited a different number of times is left out (not one collective)."""
    by_channel: dict[str, list[list[dict]]] = {}
    for rank in ranks:
        mine: dict[str, list[dict]] = {}
        for w in sorted(rank["waits"], key=lambda w: w["start"]):
            if w["what"].split(" ", 1)[0] == kind:
                mine.setdefault(w["what"], []).append(w)
        for what, waits in mine.items():
            by_channel.setdefault(what, []).append(waits)
    out = {}
    for what, members in by_channel.items():
        if len(members) < 2 or len({len(m) for m in members}) != 1:
            continue
        met = list(zip(*members))
        n = len(members)
        gaps = [sum(w["start"] - p["end"] for w, p in zip(now, prev)) / n for prev, now in zip(met, met[1:])]
        late = sum(max(w["start"] for w in now) - sum(w["start"] for w in now) / n for now in met[1:])
        spread = statistics.mean(max(w["start"] for w in m) - min(w["start"] for w in m) for m in met)
        transfer = statistics.mean(min(w["end"] for w in m) - max(w["start"] for w in m) for m in met)
        out[what] = Meetings(len(met), spread, transfer, statistics.median(gaps) if gaps else 0.0,
                             late / sum(gaps) if sum(gaps) > 0 else 0.0)
    return out


@dataclass(frozen=True)
class Geometry:
    """Where things land: ``x(t)`` for a time, ``lane(section, rank)`` for a lane's top and bottom."""

    width: int
    height: int
    left: int
    right: int
    seconds: float
    """The time the drawing width stands for (the longest section)."""
    lane_tops: tuple[tuple[int, ...], ...]
    """Per section, per rank: the lane's top y."""
    lane_h: int

    def x(self, t: float) -> float:
        return self.left + t / self.seconds * (self.width - self.left - self.right)

    def lane(self, section: int, rank: int) -> tuple[int, int]:
        top = self.lane_tops[section][rank]
        return top, top + self.lane_h


TITLE_H, SECTION_H, LANE_H, LANE_GAP, AXIS_H, LEGEND_H = 26, 22, 26, 6, 26, 26


def geometry(sections: list[tuple[str, list[dict]]], width: int = 1200) -> Geometry:
    """The layout of ``sections`` [(title, per-rank traces)]: a common time scale, one lane per rank."""
    if not sections or any(not ranks for _, ranks in sections):
        raise ValueError("a timeline needs at least one section with at least one rank's trace")
    seconds = max(max(r["end"] for r in ranks) - min(r["begin"] for r in ranks) for _, ranks in sections)
    tops, y = [], TITLE_H
    for _, ranks in sections:
        y += SECTION_H
        tops.append(tuple(y + i * (LANE_H + LANE_GAP) for i in range(len(ranks))))
        y += len(ranks) * (LANE_H + LANE_GAP)
    return Geometry(width, y + AXIS_H + LEGEND_H, 70, 20, max(seconds, 1e-9), tuple(tops), LANE_H)


def render(sections: list[tuple[str, list[dict]]], path: Path | str, title: str = "") -> Geometry:
    """Draw ``sections`` [(title, per-rank traces in rank order)] into the PNG ``path``; returns where
    everything landed."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise RuntimeError("the timeline picture needs Pillow: pip install pillow") from None
    g = geometry(sections)
    img = Image.new("RGB", (g.width, g.height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((6, 6), title or "timeline: per rank, each item's compute and waiting", fill=INK)
    for s, (name, ranks) in enumerate(sections):
        zero = min(r["begin"] for r in ranks)
        draw.text((6, g.lane_tops[s][0] - SECTION_H + 5), name, fill=INK)
        for r, trace in enumerate(ranks):
            top, bottom = g.lane(s, r)
            draw.text((6, top + 7), f"rank {r}", fill=INK)
            for seg in segments(trace, zero):
                x0, x1 = round(g.x(seg.start)), round(g.x(seg.end))
                draw.rectangle((x0, top, max(x0, x1 - 1), bottom - 1), fill=COLORS[seg.kind])
            for it in trace["items"][1:]:  # a hairline where each item begins
                x = round(g.x(it["start"] - zero))
                draw.line((x, top, x, bottom - 1), fill=BACKGROUND)
    axis = g.height - AXIS_H - LEGEND_H + 4
    draw.line((g.left, axis, g.width - g.right, axis), fill=INK)
    step = _tick(g.seconds)
    t = 0.0
    while t <= g.seconds + 1e-9:
        x = round(g.x(t))
        draw.line((x, axis, x, axis + 4), fill=INK)
        draw.text((x - 8, axis + 6), f"{t:g} s", fill=INK)
        t = round(t + step, 9)
    x = g.left
    for kind in KINDS:
        y = g.height - LEGEND_H + 6
        draw.rectangle((x, y, x + 14, y + 12), fill=COLORS[kind])
        draw.text((x + 18, y), kind, fill=INK)
        x += 30 + 7 * len(kind)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(str(path), format="PNG")
    return g


def _tick(seconds: float) -> float:
    """A round tick spacing giving 4 to 10 ticks."""
    for unit in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        if seconds / unit <= 10:
            return unit
    return seconds / 10
