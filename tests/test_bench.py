"""The benchmark command end to end, as README tells a newcomer to run it."""
from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

KEYS = {"strategy": str, "world_size": int, "patches": int, "warmup_steps": int, "threads_per_rank": int,
        "wall_s": float, "speedup_vs_serial": float, "max_abs_err_vs_serial": float,
        "rel_l2_err_vs_serial": float, "param_bytes_per_rank": list, "bytes_sent_per_step_per_rank": list}


@pytest.mark.slow
def test_bench_writes_the_documented_json(tmp_path: Path):
    """Two rounds of one run each (--rounds 2 --repeats 1): every job's turn taken twice, in order, each round
    predicted from probes of its own."""
    from comfy_pipefusion.bench import repredict

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "comfy_pipefusion.bench", "--preset", "tiny", "--steps", "3",
                           "--warmup-steps", "3", "--repeats", "1", "--rounds", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pipefusion" in proc.stdout and "speedup" in proc.stdout
    report = json.loads(out.read_text())
    assert report["model"]["name"] == "flux-tiny" and report["model"]["params"] > 500_000
    assert (report["steps"], report["height"], report["width"], report["rounds"]) == (3, 128, 128, 2)
    rows = {r["strategy"]: r for r in report["results"]}
    assert set(rows) == {"serial", "pipefusion", "distrifusion", "naive_patch"}
    for r in rows.values():
        for key, typ in KEYS.items():
            assert isinstance(r[key], typ), (r["strategy"], key)
        assert len(r["param_bytes_per_rank"]) == len(r["bytes_sent_per_step_per_rank"]) == r["world_size"]
        assert r["bytes_sent_per_step_per_rank"] == r["expected_bytes_per_step_per_rank"]
    assert rows["serial"]["speedup_vs_serial"] == 1.0 and rows["serial"]["max_abs_err_vs_serial"] == 0.0
    # warm-up >= steps: both stale strategies are synchronous and exact; the naive bands are not
    assert rows["pipefusion"]["max_abs_err_vs_serial"] <= 1e-5
    assert rows["distrifusion"]["max_abs_err_vs_serial"] <= 1e-5
    assert rows["naive_patch"]["rel_l2_err_vs_serial"] > 1e-3
    # time blocked on other ranks: none for serial; in synchronous pipefusion each stage waits for the other
    assert rows["serial"]["wait_s_per_rank"] == [0.0]
    assert len(rows["pipefusion"]["wait_s_per_rank"]) == 2 and min(rows["pipefusion"]["wait_s_per_rank"]) > 0
    # timing honesty: serial and the group took turns (serial, a strategy's runs, serial, ..., twice over), and
    # no two timed runs overlapped
    names = ("pipefusion", "distrifusion", "naive_patch")
    assert [t["process"] for t in report["turns"]] == ["serial", "group"] * 6 + ["serial"]
    runs = sorted([tuple(s) + ("serial",) for s in rows["serial"]["run_spans"]] +
                  [tuple(s) + (name,) for name in names for s in rows[name]["run_spans"]])
    assert [r[2] for r in runs] == ["serial", "pipefusion", "serial", "distrifusion", "serial", "naive_patch"] * 2 \
        + ["serial"]
    assert all(a[1] <= b[0] for a, b in zip(runs, runs[1:])), runs
    # each plan's first turn began with an untimed run (--warmup-runs 1, the default), inside the turn, before
    # its timed run; its later turns did not
    turns = [(t["start"], t["end"]) for t in report["turns"]]
    for name, r in rows.items():
        assert len(r["warmup_spans"]) == 1, name
        (w0, w1), (r0, r1) = r["warmup_spans"][0], r["run_spans"][0]
        assert w1 <= r0 and any(a <= w0 and r1 <= b for a, b in turns), (name, (w0, w1), (r0, r1))
    serial_runs = rows["serial"]["wall_s_runs"]
    assert len(serial_runs) == 7 and rows["serial"]["wall_s"] == statistics.median(serial_runs)
    for k, name in enumerate(names):  # against the serial runs around its turns, its runs' median
        beside = serial_runs[k:k + 2] + serial_runs[k + 3:k + 5]
        assert rows[name]["serial_wall_s_beside"] == beside
        walls = rows[name]["wall_s_runs"]
        assert len(walls) == 2 and rows[name]["wall_s"] == statistics.median(walls)
        assert rows[name]["speedup_vs_serial"] == statistics.median(beside) / rows[name]["wall_s"]
        # each round predicted from its own probes (the second round's blocks probed by the group itself),
        # the row's prediction their median, which repredict makes again from the rounds' probes
        rounds = rows[name]["rounds"]
        assert [r["measured_s"] for r in rounds] == rows[name]["wall_s_runs"]
        assert rows[name]["predicted_s"] == statistics.median(r["predicted_s"] for r in rounds)
        assert any(s["probe"] == "blocks" for s in rounds[1]["probes"]["spans"])
        assert rounds[0]["probes"]["spans"][0]["start"] < rounds[1]["probes"]["spans"][0]["start"]
    # serial probed again in the group's second round, before its first turn of it: its first three runs
    # (the first round's, before each of its turns) and its last four (the second's, and the closing one)
    rounds = rows["serial"]["rounds"]
    assert [r["measured_s"] for r in rounds] == [statistics.median(serial_runs[:3]), statistics.median(serial_runs[3:])]
    assert rows["serial"]["predicted_s"] == statistics.median(r["predicted_s"] for r in rounds)
    blocks = [s for s in rounds[1]["probes"]["spans"] if s["probe"] == "blocks"]
    spans = rows["serial"]["run_spans"]
    assert len(blocks) == 1 and spans[2][1] <= blocks[0]["start"] < spans[3][0]
    again = {r["name"]: r for r in repredict.repredict(report)}
    for name in ("serial", *names):
        assert again[name]["own_probes"] and again[name]["predicted_s"] == pytest.approx(rows[name]["predicted_s"])
    for name in names:
        assert [(r["strategy"], r["patches"]) for r in rows[name]["rounds"]] == [(name, rows[name]["patches"])] * 2
    # each round is predicted with the plan it ran (auto may choose another plan in another round): the
    # pipefusion row's rounds as if they had run distrifusion are predicted as the row run as distrifusion
    # with the same probes, in the format of a report whose rounds did not name their plans
    moved = copy.deepcopy(report)
    row = next(r for r in moved["results"] if r["strategy"] == "pipefusion")
    for r in row["rounds"]:
        r.update(strategy="distrifusion", patches=1)
    plain = copy.deepcopy(moved)
    row = next(r for r in plain["results"] if r["strategy"] == "pipefusion")
    row.update(strategy="distrifusion", patches=1)
    for r in row["rounds"]:
        del r["strategy"], r["patches"], r["warmup_steps"], r["ulysses"]
    got, want = ({r["name"]: r for r in repredict.repredict(rep)}["pipefusion"]["predicted_s"] for rep in (moved, plain))
    assert got == pytest.approx(want) and got != pytest.approx(again["pipefusion"]["predicted_s"])


@pytest.mark.slow
def test_bench_runs_a_checkpoint_with_a_two_evaluation_sampler(tmp_path: Path):
    """--checkpoint takes any supported file (here an SD3.5-medium-like original single file); heun evaluates
    the model twice per step, and the bytes sent still match the formulas counted in evaluations, for
    each of the patch counts --patches lists."""
    import torch

    from comfy_pipefusion.models import family
    from comfy_pipefusion.models.checkpoint_write import write_checkpoint

    fam, preset = family.find_preset("sd3.5m-tiny")
    model = fam.build_meta(preset["config"])
    fam.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
    ckpt = write_checkpoint(tmp_path / "sd35m.safetensors", model.state_dict(), "sd3", dict(model.config),
                            prefix="model.diffusion_model.")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "comfy_pipefusion.bench", "--checkpoint", str(ckpt), "--steps", "3",
                           "--height", "128", "--width", "128", "--text-tokens", "8", "--sampler", "heun",
                           "--strategies", "serial,pipefusion,distrifusion", "--patches", "1,4", "--warmup-steps", "3",
                           "--repeats", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"]["family"] == "sd3" and report["sampler"] == "heun" and report["evaluations"] == 5
    # a list of patch counts: one pipefusion job per M
    assert [(r["name"], r["patches"]) for r in report["results"]] == \
        [("serial", 1), ("pipefusion-M1", 1), ("pipefusion-M4", 4), ("distrifusion", 2)]
    for r in report["results"]:
        assert r["max_abs_err_vs_serial"] <= 1e-5, r["strategy"]
        assert r["bytes_sent_per_step_per_rank"] == r["expected_bytes_per_step_per_rank"], r["strategy"]


@pytest.mark.slow
def test_bench_hybrid_cfg_ulysses_and_the_diffusers_peer(tmp_path: Path):
    """--cfg makes a true-CFG job; --strategies takes cfg and ulysses; --peers adds diffusers' own Ulysses,
    run by the same group in the same turns. All three reproduce serial; bytes match the formulas."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "comfy_pipefusion.bench", "--preset", "tiny", "--steps", "2",
                           "--repeats", "1", "--cfg", "2", "--strategies", "serial,cfg,ulysses",
                           "--peers", "diffusers-ulysses", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["cfg"] == 2.0
    rows = {r["strategy"]: r for r in report["results"]}
    assert set(rows) == {"serial", "cfg", "ulysses", "diffusers-ulysses"}
    for name in ("cfg", "ulysses", "diffusers-ulysses"):  # float rounding only (see README: CFG parallelism)
        assert rows[name]["max_abs_err_vs_serial"] <= 1e-4, (name, rows[name]["max_abs_err_vs_serial"])
        assert rows[name]["rel_l2_err_vs_serial"] <= 1e-6, (name, rows[name]["rel_l2_err_vs_serial"])
    for name in ("cfg", "ulysses"):
        assert rows[name]["bytes_sent_per_step_per_rank"] == rows[name]["expected_bytes_per_step_per_rank"]
    assert rows["diffusers-ulysses"]["expected_bytes_per_step_per_rank"] is None  # its traffic is its own
    assert [t["process"] for t in report["turns"]] == ["serial", "group"] * 3 + ["serial"]
    # a cfg plan without a negative branch is refused before anything starts, with the way out
    proc = subprocess.run([sys.executable, "-m", "comfy_pipefusion.bench", "--preset", "tiny", "--strategies",
                           "cfg"], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 2 and "cfg 1 has no negative branch" in proc.stderr, proc.stderr
