"""Speedup over serial at each link speed, measured and predicted: a Markdown table and a PNG; and the
simulator against measured wall times over a grid of bench cells.

    python tools/link_table.py OUT.png shm.json 10gbit.json 1gbit.json 100mbit.json
    python tools/link_table.py --grid OUT_DIR [--preset tiny] [--steps 4,8] [--cfg 1,4.5] [--link SPEED] \
        [--strategies serial,pipefusion,distrifusion,ulysses,cfg] [--repeats 1]
    python tools/link_table.py --auto BENCH.json ...     (e.g. tools/speed_targets.sh OUT's auto-*.json)

Each JSON is a bench run (`./dev.sh bench --strategies serial,pipefusion,... [--link SPEED] --json ...`);
the measured speedup is the bench's (against the serial runs around the strategy's), the predicted one the
simulator's serial time over the strategy's (`predicted_s`, same probes). The plot is drawn with Pillow
(ComfyUI's requirements bring it; matplotlib is not installed here).

``--grid`` runs the bench once per cell (steps x cfg; the cfg strategies only where cfg != 1), keeps each
cell's JSON in OUT_DIR, and prints every row's measured wall time (median of the repeats), the simulator's
prediction from the probes of the same run, and the error (predicted / measured - 1). One run of each cell:
on a shared machine the figures are as noisy as its load.

``--auto`` compares each report's ``auto`` row with the best fixed plan of the same run: the auto row's own
median, and its plan's (where auto ran one plan in every round and a fixed row ran the same plan, both rows'
runs together: the same computation timed twice as often, which halves what the machine's noise can make of
the comparison); each fixed plan's time is likewise every run of that plan in the report. Its last column is
the report's row whose prediction missed its measurement the most (predicted / measured - 1).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"pipefusion": (31, 119, 180), "distrifusion": (214, 39, 40), "naive_patch": (127, 127, 127),
           "auto": (44, 160, 44)}


def rows_of(paths: list[str]) -> list[dict]:
    out = []
    for p in paths:
        rep = json.loads(Path(p).read_text())
        link = (rep.get("link") or {}).get("speed", "shared memory")
        res = {r["name"]: r for r in rep["results"]}
        serial_pred = res["serial"].get("predicted_s")
        for name, r in res.items():
            if name == "serial":
                continue
            pred = serial_pred / r["predicted_s"] if serial_pred and r.get("predicted_s") else None
            out.append({"link": link, "strategy": name, "plan": r.get("plan"), "measured": r["speedup_vs_serial"],
                        "predicted": pred, "wall_s": r["wall_s"], "predicted_s": r.get("predicted_s")})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| link | strategy (plan) | measured speedup | predicted speedup | wall s | predicted s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        pred = f"{r['predicted']:.2f}x" if r["predicted"] else "-"
        ps = f"{r['predicted_s']:.2f}" if r["predicted_s"] else "-"
        lines.append(f"| {r['link']} | {r['strategy']} ({r['plan']}) | {r['measured']:.2f}x | {pred} | "
                     f"{r['wall_s']:.2f} | {ps} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    links = list(dict.fromkeys(r["link"] for r in rows))
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    w, h, left, bottom, top = 900, 480, 70, 60, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    top_val = max(2.2, max(max(r["measured"], r["predicted"] or 0) for r in rows) * 1.1)
    y = lambda v: h - bottom - (h - bottom - top) * v / top_val  # noqa: E731
    for v in [i * 0.5 for i in range(int(top_val / 0.5) + 1)]:
        d.line([(left, y(v)), (w - 20, y(v))], fill=(225, 225, 225))
        d.text((10, y(v) - 6), f"{v:.1f}x", fill="black")
    d.line([(left, y(1)), (w - 20, y(1))], fill=(120, 120, 120))
    group_w = (w - left - 20) / len(links)
    bar = group_w / (2 * len(strategies) + 1)
    for i, link in enumerate(links):
        x0 = left + i * group_w
        d.text((x0 + group_w / 2 - 30, h - bottom + 10), link, fill="black")
        for j, s in enumerate(strategies):
            r = next((r for r in rows if r["link"] == link and r["strategy"] == s), None)
            if r is None:
                continue
            x = x0 + bar * (2 * j + 0.5)
            d.rectangle([x, y(r["measured"]), x + bar * 1.2, y(0)], fill=COLOURS.get(s, (0, 0, 0)))
            if r["predicted"]:  # the prediction: a black tick across the bar
                d.line([(x - 3, y(r["predicted"])), (x + bar * 1.2 + 3, y(r["predicted"]))], fill="black", width=3)
    for j, s in enumerate(strategies):
        d.rectangle([left + j * 170, 12, left + j * 170 + 14, 26], fill=COLOURS.get(s, (0, 0, 0)))
        d.text((left + j * 170 + 20, 13), s, fill="black")
    d.text((left + len(strategies) * 170, 13), "bar: measured speedup over serial; tick: predicted", fill="black")
    img.save(out)


def error_rows(paths: list[Path]) -> list[dict]:
    """Every row of the bench JSONs at ``paths``: measured and predicted wall time, and the error."""
    return [row for p in paths for row in report_errors(json.loads(Path(p).read_text()))]


def report_errors(rep: dict) -> list[dict]:
    """Every row of one bench report: measured and predicted wall time, and the error."""
    cell = f"{rep['steps']} steps, cfg {rep['cfg']:g}" + (f", {rep['link']['speed']}" if rep.get("link") else "")
    out = []
    for r in rep["results"]:
        pred = r.get("predicted_s")
        out.append({"cell": cell, "name": r["name"], "plan": r.get("plan"), "measured_s": r["wall_s"],
                    "predicted_s": pred, "error": pred / r["wall_s"] - 1 if pred else None})
    return out


def error_table(rows: list[dict]) -> str:
    lines = ["| cell | strategy (plan) | measured s | predicted s | error |", "|---|---|---|---|---|"]
    for r in rows:
        pred = f"{r['predicted_s']:.3f}" if r["predicted_s"] else "-"
        err = f"{100 * r['error']:+.1f}%" if r["error"] is not None else "-"
        lines.append(f"| {r['cell']} | {r['name']} ({r['plan']}) | {r['measured_s']:.3f} | {pred} | {err} |")
    errs = [abs(r["error"]) for r in rows if r["error"] is not None]
    if errs:
        within = sum(e <= 0.10 for e in errs)
        lines.append(f"\n{within} of {len(errs)} predictions within 10% of the measured time "
                     f"(largest error {100 * max(errs):.1f}%)")
    return "\n".join(lines)


def auto_rows(paths: list[Path]) -> list[dict]:
    """Per report: the best fixed plan, auto's plan(s), the auto row's median and its plan's, and the row the
    simulator missed most (``--auto``)."""
    out = []
    for p in paths:
        rep = json.loads(Path(p).read_text())
        errors = [(abs(e["error"]), e["error"], e["name"]) for e in report_errors(rep) if e["error"] is not None]
        res = {r["name"]: r for r in rep["results"]}
        if "auto" not in res:
            raise ValueError(f"{p}: no auto row (run the bench with auto in --strategies)")
        auto = res.pop("auto")
        runs: dict[str, list[float]] = {}
        for r in res.values():
            runs.setdefault(r["plan"], []).extend(r["wall_s_runs"])
        plans = sorted({rd["plan"] for rd in auto.get("rounds") or [{"plan": auto["plan"]}]})
        if len(plans) == 1 and plans[0] in runs:
            runs[plans[0]] = runs[plans[0]] + auto["wall_s_runs"]
        best = min(runs, key=lambda k: statistics.median(runs[k]))
        own = statistics.median(runs[plans[0]]) if len(plans) == 1 and plans[0] in runs else auto["wall_s"]
        best_s = statistics.median(runs[best])
        cell = f"{rep['height']}^2, {rep['steps']} steps, cfg {rep['cfg']:g}, " + \
            (rep["link"]["speed"] if rep.get("link") else "shared memory")
        out.append({"cell": cell, "best": best, "best_s": best_s, "auto_plans": plans, "auto_s": auto["wall_s"],
                    "auto_plan_s": own, "auto_vs_best": auto["wall_s"] / best_s - 1,
                    "plan_vs_best": own / best_s - 1, "worst": max(errors)[1:] if errors else None})
    return out


def auto_table(rows: list[dict]) -> str:
    lines = ["| cell | best fixed plan | auto ran | auto row vs best | auto's plan vs best "
             "| largest prediction error |", "|---|---|---|---|---|---|"]
    for r in rows:
        worst = f"{100 * r['worst'][0]:+.1f}% ({r['worst'][1]})" if r["worst"] else "-"
        lines.append(f"| {r['cell']} | {r['best']} {r['best_s']:.2f} s | {', '.join(r['auto_plans'])} "
                     f"{r['auto_s']:.2f} s | {100 * r['auto_vs_best']:+.1f}% | {100 * r['plan_vs_best']:+.1f}% | "
                     f"{worst} |")
    return "\n".join(lines)


def run_grid(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="tools/link_table.py --grid")
    ap.add_argument("out", type=Path, help="folder for each cell's bench JSON")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", default="4,8", help="comma-separated")
    ap.add_argument("--cfg", default="1", help="comma-separated guidance scales (!= 1: true CFG)")
    ap.add_argument("--strategies", default="serial,pipefusion,distrifusion,ulysses,cfg")
    ap.add_argument("--warmup-steps", default="1")
    ap.add_argument("--repeats", default="1")
    ap.add_argument("--link", default=None, help="a bench --link speed (root only)")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for steps, cfg in itertools.product(a.steps.split(","), a.cfg.split(",")):
        strategies = [s for s in a.strategies.split(",") if float(cfg) != 1 or not s.startswith("cfg")]
        path = a.out / f"cell-{a.preset}-s{steps}-cfg{cfg}{'-' + a.link if a.link else ''}.json"
        cmd = [sys.executable, "-m", "comfy_pipefusion.bench", "--preset", a.preset, "--steps", steps, "--cfg", cfg,
               "--strategies", ",".join(strategies), "--warmup-steps", a.warmup_steps, "--repeats", a.repeats,
               "--json", str(path), *(["--link", a.link] if a.link else [])]
        print("$", " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent)
        if done.returncode != 0:
            print(f"the bench failed for {path.name} (exit {done.returncode})", file=sys.stderr)
            return done.returncode
        paths.append(path)
    print(error_table(error_rows(paths)))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--grid"]:
        return run_grid(argv[1:])
    if argv[:1] == ["--auto"]:
        print(auto_table(auto_rows([Path(a) for a in argv[1:]])))
        return 0
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows = rows_of(argv[1:])
    print(table(rows))
    plot(rows, Path(argv[0]))
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
