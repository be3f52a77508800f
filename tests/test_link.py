"""Two machines over a real link (issue 13): torchrun's multi-node rendezvous (c10d) between two network
namespaces joined by a veth pair shaped with tc. `pytest -k link`. Skips, saying why, where namespaces
cannot be made (not root); CI runs as root and runs them."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from comfy_pipefusion import linkns
from comfy_pipefusion.oneshot import run_jobs

from comfy_helpers import left_in
from test_planner import assert_auto_rule

REASON = linkns.why_not()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no network namespaces here: {REASON}")
SAMPLE = {"height": 128, "width": 128, "steps": 3, "seed": 3}
ROOT = Path(__file__).resolve().parent.parent
BENCH_S = 240
GRACE_S = 60


def _ns_exists(name: str) -> bool:
    return name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _tx_bytes(link, side: int) -> int:
    out = subprocess.run([*link.exec_prefix(side), "cat", f"/sys/class/net/{link.devs[side]}/statistics/tx_bytes"],
                         capture_output=True, text=True, timeout=10)
    return int(out.stdout.strip())


@pytest.fixture(scope="module")
def shaped():
    linkns.sweep()
    link = linkns.make("100mbit")
    yield link
    link.close()
    assert not any(_ns_exists(n) for n in link.names), "a namespace outlived the test"


def test_link_group_across_namespaces_equals_serial_and_picks_a_plan(shaped):
    """A 2-rank group, one rank per namespace, joined by c10d over the 100 Mbit/s link: PipeFusion with
    warm-up = steps equals serial (the transfers crossed the veth: its byte counters grew by at least what
    the ranks sent); an `auto` job runs, reports its plan with predicted and measured time, and the probed
    link is the shaped one (a tenth of what loopback gives, at most the shaped rate)."""
    serial = run_jobs("tiny", 0, [{"name": "serial", "parallel": {"strategy": "serial"}, "sample": SAMPLE}],
                      world_size=1, timeout=120)["serial"][0]
    before = [_tx_bytes(shaped, s) for s in (0, 1)]
    jobs = [{"name": "pf", "parallel": {"strategy": "pipefusion", "warmup_steps": 3}, "sample": SAMPLE},
            {"name": "auto", "parallel": {"strategy": "auto", "warmup_steps": 1}, "sample": SAMPLE}]
    out = run_jobs("tiny", 0, jobs, world_size=2, timeout=150, link=shaped, cpu_only=True)
    after = [_tx_bytes(shaped, s) for s in (0, 1)]
    x, m = out["pf"]
    assert float((x - serial).abs().max()) <= 1e-5
    crossed = sum(a - b for a, b in zip(after, before))
    assert crossed >= sum(m["bytes_sent_per_rank"]) > 0
    _, auto = out["auto"]
    plan = auto["plan"]
    assert plan["auto"]["candidates"] and plan["predicted_s"] > 0 and plan["measured_s"] > 0
    assert_auto_rule(plan)
    bandwidth = plan["link"]["bandwidth"]
    assert bandwidth <= 1.25 * shaped.bits_per_s / 8, f"probed {bandwidth / 1e6:.1f} MB/s over a 100 Mbit/s link"
    for both in ("duplex", "exchange"):  # both ways at once (the collectives): measured, at most the one-way rate
        rate = plan["link"][both]
        assert 0.2 * bandwidth <= rate <= bandwidth, f"{both} {rate / 1e6:.1f} MB/s, {bandwidth / 1e6:.1f} one way"
    assert torch.isfinite(out["auto"][0]).all()


def _benches(link, tmp_path: Path, extra: dict[int, list[str]] | None = None):
    """The bench on two "machines": node rank 0 in the namespace whose address sorts last (so that c10d gives
    global rank 0 to the other one), node rank 1 in the other; ``extra``: more arguments per node rank.
    Returns (endpoint, {node rank: process}, {node rank: output}) once both ended (killed past BENCH_S, or
    GRACE_S after the other one failed)."""
    endpoint = f"{link.addrs[1]}:{20000 + secrets.randbelow(30000)}"
    common = [sys.executable, "-m", "comfy_pipefusion.bench", "--preset", "tiny", "--steps", "2", "--warmup-steps",
              "2", "--strategies", "serial,pipefusion", "--repeats", "1", "--no-predict", "--nnodes", "2",
              "--rdzv-endpoint", endpoint, "--rdzv-id", "pf-test", "--rdzv-timeout", "120"]
    commands = {0: [*link.exec_prefix(1), *common, "--node-rank", "0", "--json", str(tmp_path / "bench.json")],
                1: [*link.exec_prefix(0), *common, "--node-rank", "1"]}
    for r in commands:  # each "machine" its own temporary folder, which nothing may outlive the bench in
        (tmp_path / f"tmp-node{r}").mkdir()
    procs = {r: subprocess.Popen([*c, *(extra or {}).get(r, [])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, cwd=ROOT, start_new_session=True,
                                 env={**os.environ, "TMPDIR": str(tmp_path / f"tmp-node{r}")})
             for r, c in commands.items()}
    deadline = time.monotonic() + BENCH_S
    try:
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs.values()):  # one side failed: the other should
                deadline = min(deadline, time.monotonic() + GRACE_S)   # see its peer gone and end too
            time.sleep(0.5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 9)
    outputs = {r: p.communicate()[0] for r, p in procs.items()}
    return endpoint, procs, outputs


def _nothing_left(endpoint: str, procs: dict, tmp_path: Path) -> None:
    """No process of the two benches (their agents and ranks name the endpoint or their temporary folders)
    and nothing in their temporary folders (theirs, torchrun's) outlived them."""
    pids = [p.pid for p in procs.values()]
    marks = [endpoint, *(f"pipefusion-{pid}-" for pid in pids), *(f"pipefusion-bench-{pid}-" for pid in pids)]
    left = [q.info for q in psutil.process_iter(["pid", "cmdline"])
            if any(m in " ".join(q.info["cmdline"] or ()) for m in marks)]
    assert not left, f"processes of the bench outlived it: {left}"
    left = [p for r in procs for p in left_in(tmp_path / f"tmp-node{r}")]
    assert not left, f"temporary folders outlived the bench: {left}"


def test_link_bench_one_command_per_machine_rank0_elsewhere(shaped, tmp_path):
    """The bench across two "machines" (the namespaces), one command per machine, joined by torchrun's c10d
    rendezvous, global rank 0 on the machine that is not node rank 0: node rank 0 still runs serial, takes
    the turns and writes the report, with the results sent to it by the group. Serial and pipefusion at
    warm-up = steps agree within 1e-5; both commands end within the bound and leave nothing behind."""
    endpoint, procs, outputs = _benches(shaped, tmp_path)
    for r, p in procs.items():
        assert p.returncode == 0, f"node rank {r} ended with {p.returncode} (bound {BENCH_S} s):\n{outputs[r][-3000:]}"
    rep = json.loads((tmp_path / "bench.json").read_text())
    assert rep["nodes"]["nnodes"] == 2 and rep["nodes"]["address"] == shaped.addrs[1]
    assert rep["nodes"]["group_ranks_here"] == [1], "c10d was expected to give rank 0 to the lower address"
    assert "group ranks [0]" in outputs[1]
    rows = {r["name"]: r for r in rep["results"]}
    assert set(rows) == {"serial", "pipefusion"}
    pf = rows["pipefusion"]
    assert pf["world_size"] == 2 and pf["warmup_steps"] == 2 == rep["steps"]
    assert pf["max_abs_err_vs_serial"] <= 1e-5 and rows["serial"]["max_abs_err_vs_serial"] == 0.0
    assert [t["process"] for t in rep["turns"]] == ["serial", "group", "serial"]
    assert all(a["end"] <= b["start"] for a, b in zip(rep["turns"], rep["turns"][1:])), "turns overlapped"
    _nothing_left(endpoint, procs, tmp_path)


@pytest.mark.slow
def test_link_bench_machines_given_different_jobs_are_refused(shaped, tmp_path):
    """The two commands differ (another seed on node rank 1): the group refuses at its start, on both
    machines, saying what to fix, and nothing is left behind."""
    endpoint, procs, outputs = _benches(shaped, tmp_path, {1: ["--seed", "1"]})
    assert all(p.returncode > 0 for p in procs.values()), (outputs, [p.returncode for p in procs.values()])
    for r in (0, 1):
        assert "the machines were given different jobs" in outputs[r], outputs[r][-3000:]
        assert "run the same command on every machine, only the node rank may differ" in outputs[r]
    assert not (tmp_path / "bench.json").exists()
    _nothing_left(endpoint, procs, tmp_path)


def test_link_bench_probes_in_their_turns_and_repredicts(tmp_path):
    """The bench over a shaped link with predictions: the planner's probes (the link's, and the block costs
    every prediction scales with) run inside their process's turn, with the machine to itself, as the timed
    runs do; probed beside the other process's start-up they read compute up to 2x slow, and the
    predictions over a link were 28-96% high, serial's too; the probed bandwidth is at most the shaped rate.
    The serial process probes the blocks alone, the group with every rank at once (as they run), once for
    all its rows (the later ones read the cache). The report carries what each prediction was made from,
    and bench/repredict.py makes every prediction again from it, equal; a report without its block costs is
    refused with the way out."""
    from comfy_pipefusion.bench import repredict

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "comfy_pipefusion.bench", "--preset", "tiny", "--steps", "2",
                           "--link", "10gbit", "--strategies", "serial,pipefusion,ulysses", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=BENCH_S, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    turns = {p: [(t["start"], t["end"]) for t in rep["turns"] if t["process"] == p] for p in ("serial", "group")}
    rows = {r["name"]: r for r in rep["results"]}
    costs = {name: r["probes"]["costs"] for name, r in rows.items()}
    assert all(c and c["blocks"] for c in costs.values()), costs
    assert costs["pipefusion"] == costs["ulysses"], "the group's rows were predicted from other probes"
    assert len(costs["ulysses"]["ranks"]) == 2 and len(costs["serial"]["ranks"]) == 1, costs
    probed = {"serial": [], "group": []}
    for name, r in rows.items():
        process = "serial" if name == "serial" else "group"
        for span in r["probes"]["spans"]:
            probed[process].append(span["probe"])
            assert any(a <= span["start"] and span["end"] <= b for a, b in turns[process]), \
                f"{name}'s {span['probe']} probe ran outside its turns: {span}, turns {turns}"
    assert probed["serial"].count("blocks") == 1 and "link" in probed["group"], probed
    spans = [[s for s in rows[name]["probes"]["spans"] if s["probe"] == "blocks"] for name in ("pipefusion", "ulysses")]
    assert spans[0] == spans[1] and len(spans[0]) == 1, spans  # the group's probe, once for its rows
    shaped = rep["link"]["bits_per_s"] / 8  # the link probe's messages outgrow tbf's burst: at most the rate
    assert rows["pipefusion"]["probed_link"]["bandwidth"] <= 1.25 * shaped, rows["pipefusion"]["probed_link"]
    again = repredict.repredict(rep)
    assert [r["name"] for r in again] == list(rows)
    for r in again:
        assert r["own_probes"] and r["predicted_s"] == pytest.approx(rows[r["name"]]["predicted_s"], rel=1e-9), r
    for r in rep["results"]:
        r.pop("probes")  # as the reports written before the rows carried their probes
    with pytest.raises(ValueError, match="run with --probe"):
        repredict.repredict(rep)
    assert repredict.repredict(rep, costs["serial"])[0]["predicted_s"] == pytest.approx(again[0]["predicted_s"])


def test_link_table_auto_against_the_best_fixed_plan_pools_the_same_plan(tmp_path):
    """tools/link_table.py --auto: the best fixed plan by the median of all its runs in the report, auto's own
    median beside it, and auto's plan timed with the fixed row of the same plan pooled (the same computation);
    a plan auto changed between rounds is not pooled."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import link_table
    finally:
        sys.path.remove(str(ROOT / "tools"))

    def row(name, plan, runs, rounds=None, predicted=None):
        return {"name": name, "plan": plan, "wall_s_runs": runs, "wall_s": sorted(runs)[len(runs) // 2],
                "rounds": rounds, "predicted_s": predicted}

    pf2, pf4, df = "pipefusion x2 M2 W1", "pipefusion x2 M4 W1", "distrifusion x2 W1"
    rep = {"height": 512, "steps": 28, "cfg": 1.0, "link": None, "results": [
        row("serial", "serial x1 W1", [10.0, 10.0, 10.0]), row("pipefusion-M2", pf2, [6.0, 6.6, 7.0]),
        row("pipefusion-M4", pf4, [6.2, 6.3, 6.4], predicted=5.67),
        row("distrifusion", df, [7.0, 7.0, 7.0], predicted=7.6),
        row("auto", pf2, [6.1, 6.2, 6.5], [{"plan": pf2}] * 3)]}
    one = tmp_path / "one.json"
    one.write_text(json.dumps(rep))
    rep["results"][-1] = row("auto", pf2, [6.1, 6.2, 9.0], [{"plan": pf2}, {"plan": df}, {"plan": pf2}])
    two = tmp_path / "two.json"
    two.write_text(json.dumps(rep))
    pooled, mixed = link_table.auto_rows([one, two])
    assert pooled["best"] == pf4 and pooled["best_s"] == 6.3 and pooled["auto_s"] == 6.2
    assert pooled["auto_plan_s"] == pytest.approx((6.2 + 6.5) / 2)  # median of 6.0 6.1 6.2 6.5 6.6 7.0
    assert pooled["plan_vs_best"] == pytest.approx(6.35 / 6.3 - 1) and pooled["auto_plans"] == [pf2]
    assert mixed["auto_plans"] == [df, pf2] and mixed["auto_plan_s"] == 6.2 == mixed["auto_s"]
    assert pooled["worst"] == (pytest.approx(-0.1), "pipefusion-M4")  # not distrifusion +8.6%
    assert "| 512^2, 28 steps, cfg 1, shared memory | pipefusion x2 M4 W1 6.30 s |" in link_table.auto_table([pooled])
    assert link_table.auto_table([pooled]).endswith("| -10.0% (pipefusion-M4) |")
