"""The bench's timeline picture (issue 16): the ranks' own timings, drawn one lane per rank, read back.

``pytest -k timeline``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from comfy_pipefusion import timeline
from comfy_pipefusion.models import family
from comfy_pipefusion.parallel.schedule import make_schedule
from comfy_pipefusion.parallel.trace import Trace
from comfy_pipefusion.patches import Span

ROOT = Path(__file__).resolve().parent.parent


def colour_at(img, g: timeline.Geometry, section: int, rank: int, t: float) -> tuple:
    top, bottom = g.lane(section, rank)
    return img.getpixel((round(g.x(t)), (top + bottom) // 2))


def check_picture(png: Path, sections, g: timeline.Geometry, min_px: float = 4.0) -> int:
    """Every segment at least ``min_px`` wide has its kind's colour in its rank's lane (sampled at its
    middle); returns how many were checked."""
    img = Image.open(png).convert("RGB")
    assert img.size == (g.width, g.height)
    checked = 0
    for s, (_, ranks) in enumerate(sections):
        zero = min(r["begin"] for r in ranks)
        for r, trace in enumerate(ranks):
            for seg in timeline.segments(trace, zero):
                if g.x(seg.end) - g.x(seg.start) < min_px:
                    continue
                got = colour_at(img, g, s, r, (seg.start + seg.end) / 2)
                assert got == timeline.COLORS[seg.kind], (s, r, seg, got)
                checked += 1
    return checked


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_timeline_from_recorded_items_and_waits(tmp_path):
    """Two ranks' traces recorded on a fake clock through the real Trace (items of a real schedule):
    the segments come out in order with the right phases, and the picture shows each one in its lane."""
    whole = Span(0, 2, 0, 8)
    sched = make_schedule([0, 1, 2], 1, whole, [Span(0, 2, 0, 4), Span(0, 2, 4, 8)])
    traces = []
    for rank in range(2):
        clock = Clock()
        tr = Trace(clock)
        clock.t += 0.5 + rank  # setup: rank 1 starts later
        for item in tr.track(sched):
            if rank == 1 and item.eval == 1 and item.patch == 0:  # fill: waits for stage 0's first patch
                tr.wait(clock.t, clock.t + 1.0, "recv hop 0->1")
                clock.t += 1.0
            clock.t += 2.0 if item.warmup else 1.0
        clock.t += 1.5 - rank  # drain
        tr.finish()
        traces.append(json.loads(json.dumps(tr.to_json())))  # what travels: JSON only
    assert [it["index"] for it in traces[0]["items"]] == list(range(len(sched))) == list(range(5))
    kinds = [s.kind for s in timeline.segments(traces[1], 100.0)]
    assert kinds == ["setup", "warmup", "fill", "compute", "compute", "compute", "compute", "drain"], kinds
    assert [s.kind for s in timeline.segments(traces[0], 100.0)] == \
        ["setup", "warmup", "compute", "compute", "compute", "compute", "drain"]
    segs = timeline.segments(traces[1], 100.0)
    assert all(a.end <= b.start + 1e-9 for a, b in zip(segs, segs[1:]))  # in time order, no overlap
    assert segs[2].start == pytest.approx(1.5 + 2.0) and segs[2].end == pytest.approx(4.5)

    sections = [("pipefusion, 2 ranks", traces)]
    png = tmp_path / "t.png"
    g = timeline.render(sections, png)
    assert check_picture(png, sections, g) == 15
    img = Image.open(png).convert("RGB")
    assert colour_at(img, g, 0, 1, 1.0) == timeline.COLORS["setup"] != colour_at(img, g, 0, 0, 1.0)


def test_timeline_refuses_an_empty_run(tmp_path):
    with pytest.raises(ValueError, match="at least one section"):
        timeline.render([], tmp_path / "x.png")


@pytest.mark.slow
def test_timeline_of_a_bench_run(tmp_path):
    """``bench --timeline``: the picture of a real 2-rank run, read back against the timings the ranks
    gathered (in the JSON): a section per job with a lane per rank, every item of the schedule on every
    rank, in order, and each segment's colour where its time puts it."""
    png, out = tmp_path / "timeline.png", tmp_path / "bench.json"
    steps, m, warm = 4, 3, 1
    proc = subprocess.run([sys.executable, "-m", "comfy_pipefusion.bench", "--preset", "tiny", "--steps", str(steps),
                           "--strategies", "pipefusion,distrifusion,ulysses", "--patches", str(m),
                           "--warmup-steps", str(warm),
                           "--repeats", "1", "--json", str(out), "--timeline", str(png)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"timeline: {png.resolve()}" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["name"], len(r["timeline"])) for r in rows] == [("serial", 1), ("pipefusion", 2), ("distrifusion", 2),
                                                               ("ulysses", 2)]
    expected = {"serial": steps, "pipefusion": warm + (steps - warm) * m, "distrifusion": steps, "ulysses": steps}
    for r in rows:  # each job's last run: its ranks' records lie within that run's wall time
        run = max(t["end"] for t in r["timeline"]) - min(t["begin"] for t in r["timeline"])
        assert 0 < run <= r["wall_s_runs"][-1] + 0.05, (r["name"], run, r["wall_s_runs"])
        for rank, trace in enumerate(r["timeline"]):
            items = trace["items"]
            assert [it["index"] for it in items] == list(range(expected[r["name"]])), (r["name"], rank)
            assert all(a["end"] <= b["start"] for a, b in zip(items, items[1:]))  # one after another
            assert trace["begin"] <= items[0]["start"] and items[-1]["end"] <= trace["end"]
            assert [it["warmup"] for it in items].count(True) == (warm if r["name"] in ("pipefusion", "distrifusion")
                                                                  else 0)
    # PipeFusion's stages wait on each other: rank 1 waits for rank 0's first patch; waits lie inside the run
    # each stage sends (forward hop, ring): its own transfer time, counted apart from its waits
    assert all(t > 0 for t in rows[1]["transfer_s_per_rank"]) and rows[0]["transfer_s_per_rank"] == [0.0]
    pf = rows[1]["timeline"]
    assert pf[1]["waits"] and all(pf[1]["begin"] <= w["start"] <= w["end"] <= pf[1]["end"] for w in pf[1]["waits"])
    sections = [(r["name"], r["timeline"]) for r in rows]
    g = timeline.geometry(sections)
    assert Image.open(png).size == (g.width, g.height)
    assert check_picture(png, sections, g) >= 10
    # tools/meetings.py on the same report: Ulysses' two all-to-alls per attention layer and evaluation, the
    # only synchronous meetings of the three (PipeFusion's and DistriFusion's waits are on sends and gathers)
    table = subprocess.run([sys.executable, "tools/meetings.py", str(out)], capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
    assert table.returncode == 0, table.stderr
    lines = [line for line in table.stdout.splitlines() if line.startswith("| bench |")]
    fam, preset = family.find_preset("tiny")
    meta = fam.build_meta(preset["config"])
    layers = sum(len(fam.kv_buffers(meta, b, lambda kind: kind)) for b in fam.blocks_of(meta))
    meetings = 2 * layers * report["evaluations"]
    assert len(lines) == 1 and lines[0].startswith(f"| bench | ulysses | data | {meetings} | "), table.stdout
    straggle = rows[3]["probed_link"]["straggle"]
    assert lines[0].endswith(f"| {straggle:.1%} |")


def test_timeline_meetings_of_a_collective():
    """``timeline.meetings``: two ranks' all-to-alls (and a third rank's receive, not one of them) as meetings,
    with the arrival spread, the exchange after the last arrival and the loss to the slowest rank."""
    def rank(waits):
        return {"begin": 0.0, "end": 9.0, "items": [], "waits": [dict(zip(("start", "end", "what"), w)) for w in waits]}

    a2a, other = "all_to_all data", "all_to_all ulysses stage 1 data"
    ranks = [rank([(1.0, 1.3, a2a), (3.0, 3.2, a2a), (5.2, 5.3, a2a), (6.0, 6.5, "recv data"), (7.0, 7.1, other)]),
             rank([(1.2, 1.35, a2a), (3.1, 3.25, a2a), (5.0, 5.3, a2a)]),
             rank([(2.0, 2.5, "recv hop 0->1"), (7.1, 7.2, other), (8.0, 8.1, other)])]  # 1 against 2: left out
    got = timeline.meetings(ranks)
    assert list(got) == [a2a]
    m = got[a2a]
    assert m.count == 3 and m.spread == pytest.approx((0.2 + 0.1 + 0.2) / 3)
    assert m.transfer == pytest.approx((0.1 + 0.1 + 0.1) / 3)
    between = [((3.0 - 1.3) + (3.1 - 1.35)) / 2, ((5.2 - 3.2) + (5.0 - 3.25)) / 2]
    assert m.between == pytest.approx(sum(between) / 2)
    assert m.straggle == pytest.approx((0.05 + 0.1) / sum(between))
    assert timeline.meetings(ranks[:1]) == {} and timeline.meetings(ranks, kind="recv") == {}


def test_timeline_follows_a_branch_and_its_lanes():
    """A CFG branch (and a lane of ulysses+pipefusion, which runs under the branch's control) records its items
    in the job's trace: the bench's timeline of the hybrids is not empty."""
    from comfy_pipefusion.parallel.cfg import BranchControl
    from comfy_pipefusion.parallel.runtime import Control

    tr = Trace(Clock())
    branch = BranchControl(Control(trace=tr), comm=None, leaders=None)
    sched = make_schedule([0, 1], 1, Span(0, 2, 0, 8), [Span(0, 2, 0, 8)])
    assert [it.index for it in branch.track(sched)] == [0, 1]
    assert [it[0] for it in tr.items] == [0, 1]
