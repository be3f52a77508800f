"""A bench report's predictions made again with this code, without timing anything again.

    python -m comfy_pipefusion.bench.repredict BENCH.json ... [--probe] [--out DIR]

Each row is predicted by the simulator (parallel/simulate.py) from what the run probed: its ``probes``
(the block costs per kind, the seconds per image token outside the blocks, and the link), so a change of
the simulator or of its workload shows on past measurements at once. A report written before the rows
carried their block costs (only ``probed_link``) cannot be predicted from its own numbers: ``--probe``
measures the block costs again here (a few seconds of timed compute: on a quiet machine, with the report's
threads per rank; once per model and image size) and keeps each row's probed link. Prints measured against
predicted (the report's and now); ``--out DIR`` writes each report there with the new ``predicted_s`` (and
``predicted_s_before``).
Built-in presets only (a checkpoint's report does not name its text tokens).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ..config import STRATEGIES, ParallelConfig, SampleSpec
from ..job import preset_problem
from ..models import family
from ..parallel.planner import predict, workload_of
from ..parallel.probe import grids_for, machine_costs, pace_of, probe_blocks
from ..parallel.simulate import BlockCost, Costs, Link

ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}


def preset_of(report: dict) -> str:
    name, fam = report["model"]["name"], report["model"]["family"]
    preset = name.removeprefix(f"{fam}-")
    try:
        family.find_preset(preset)
    except (KeyError, ValueError):
        raise ValueError(f"{name!r} is not a built-in preset's report: repredict takes the reports of --preset "
                         "runs (a checkpoint's report does not name its text tokens)") from None
    return preset


def problem_of(report: dict, dtype: str = "float32"):
    """(family, config, meta model, job problem) of the report's job."""
    preset = preset_of(report)
    fam, p = family.find_preset(preset)
    spec = SampleSpec(height=report["height"], width=report["width"], steps=report["steps"], seed=report["seed"],
                      dtype=dtype, sampler=report["sampler"], scheduler=report["scheduler"],
                      cfg=report.get("cfg", 1.0))
    return fam, p["config"], fam.build_meta(p["config"]), preset_problem(preset, spec)


def plan_of(row: dict) -> ParallelConfig:
    """The plan a row ran (auto's: the one it chose)."""
    strategy, world = row["strategy"], row["world_size"]
    if strategy not in STRATEGIES:
        strategy = "ulysses"  # a peer's row (diffusers-ulysses) is Ulysses on the same group
    patches = row["patches"] if strategy.endswith("pipefusion") else 0
    split = row.get("stage_split") if strategy == "pipefusion" else None
    return ParallelConfig(strategy, world, patches=patches, warmup_steps=row["warmup_steps"],
                          text_stream=row.get("text_stream", "last_patch"),
                          ulysses=row.get("ulysses_degree", 0) if "ulysses" in strategy else 0,
                          stage_split=tuple(split) if split else None)


def round_of(row: dict, rnd: dict) -> dict:
    """The row as one of its rounds ran: that round's probes, link and plan (where the round names it)."""
    out = {**row, "probes": rnd["probes"], "probed_link": rnd["link"]}
    if rnd.get("strategy") and row["strategy"] in STRATEGIES:  # a peer's row keeps its own name
        out.update(strategy=rnd["strategy"], patches=rnd["patches"], warmup_steps=rnd["warmup_steps"],
                   ulysses_degree=rnd.get("ulysses") or 0, stage_split=rnd.get("stage_split"))
    return out


def costs_of(row: dict, probed: dict | None, work, problem, rate: float | None = None) -> tuple[Costs, bool]:
    """The costs of ``work`` (``problem``'s) from the row's own probes (whether it had them), else from
    ``probed`` (block costs measured again), with the row's probed link (at most ``rate`` bytes/s where
    given) and its ranks' paces (where their devices differ)."""
    own = (row.get("probes") or {}).get("costs")
    raw = own or probed
    if raw is None:
        raise ValueError(f"row {row['name']!r} carries no block costs (a report older than its probes): "
                         "run with --probe to measure them again here")
    blocks = {k: BlockCost(**v) for k, v in raw["blocks"].items()}
    link = row.get("probed_link") or {"bandwidth": 1e12, "latency": 0.0}
    cap = (lambda v: min(v, rate)) if rate else (lambda v: v)
    # 0 (a report from before the field): duplex falls back to the bandwidth, exchange to duplex
    rates = {k: cap(link.get(k, 0.0)) for k in ("bandwidth", "duplex", "exchange")}
    link = Link(**rates, latency=link["latency"], cpu_per_byte=link.get("cpu_per_byte", 0.0),
                straggle=link.get("straggle", 0.0))
    pace = pace_of(raw, work.kinds, problem.n_txt + problem.n_img)
    return machine_costs(blocks, raw["outside"], link, problem.n_img, pace), own is not None


def probe_here(report: dict, dtype: str = "float32") -> dict:
    """The block costs of the report's model and job size, measured on this machine now."""
    import torch

    threads = max(r.get("threads_per_rank", 1) for r in report["results"])
    torch.set_num_threads(threads)
    fam, config, _, problem = problem_of(report, dtype)
    blocks, outside = probe_blocks(fam, config, torch.device("cpu"), getattr(torch, dtype), problem.n_txt,
                                   grids_for(problem.rows, problem.cols))
    return {"blocks": {k: vars(v) for k, v in blocks.items()}, "outside": outside, "threads": threads}


def repredict(report: dict, probed: dict | None = None, dtype: str = "float32", at_rate: bool = False) -> list[dict]:
    """Per row: name, plan, measured and predicted seconds (before: the report's; now: this code's) and
    whether the row's own probes were used. ``at_rate``: the probed bandwidth at most the rate of the
    report's shaped link (``--link``), as the link probe now reads it (older probes read a tbf burst)."""
    fam, _, meta, problem = problem_of(report, dtype)
    rate = report["link"]["bits_per_s"] / 8 if at_rate and report.get("link") else None
    out = []
    for row in report["results"]:
        now, owns = [], []
        # a report of --rounds > 1: each round's plan (auto's may differ between rounds; a report from before
        # the rounds named theirs: the row's) predicted from the round's own probes, the median of them
        for each in [round_of(row, r) for r in row.get("rounds") or []] or [row]:
            cfg = plan_of(each)
            work = workload_of(fam, meta, problem, cfg.warmup_steps, ELEM[dtype])
            costs, own = costs_of(each, probed, work, problem, rate if row["world_size"] > 1 else None)
            now.append(predict(cfg, work, costs).wall_s)
            owns.append(own)
        out.append({"name": row["name"], "plan": row.get("plan"), "measured_s": row["wall_s"],
                    "before_s": row.get("predicted_s"), "predicted_s": statistics.median(now), "own_probes": all(owns)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m comfy_pipefusion.bench.repredict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", type=Path, nargs="+", help="bench JSONs (--json)")
    ap.add_argument("--probe", action="store_true", help="measure the block costs again here, for rows that "
                                                         "do not carry theirs (once per model and image size)")
    ap.add_argument("--probes", type=Path, help="with --probe: a JSON file of block costs per model and size, "
                                                "read when it has the report's, else probed and added to it")
    ap.add_argument("--at-rate", action="store_true", help="a shaped link's probed bandwidth at most its rate (the "
                                                           "link probe of older reports read tbf's burst)")
    ap.add_argument("--out", type=Path, help="a folder: each report is written there, same name, with the new "
                                             "predictions (and predicted_s_before)")
    args = ap.parse_args(argv)
    probed: dict = json.loads(args.probes.read_text()) if args.probes and args.probes.is_file() else {}
    print(f"{'report':<34}{'name':<14}{'plan':<28}{'measured_s':>11}{'before_s':>10}{'now_s':>9}{'before':>8}"
          f"{'now':>8}  probes")
    for path in args.reports:
        try:
            report = json.loads(path.read_text())
            dtype = report.get("dtype", "float32")
            key = "|".join(map(str, (report["model"]["name"], report["height"], report["width"], dtype,
                                      max(r.get("threads_per_rank", 1) for r in report["results"]))))
            if args.probe and key not in probed:
                probed[key] = probe_here(report, dtype)
                if args.probes:
                    args.probes.write_text(json.dumps(probed, indent=1))
            rows = repredict(report, probed.get(key), dtype, args.at_rate)
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        for r in rows:
            before = r["before_s"] or float("nan")
            print(f"{path.stem[:33]:<34}{r['name'][:13]:<14}{str(r['plan'])[:27]:<28}{r['measured_s']:>11.2f}"
                  f"{before:>10.2f}{r['predicted_s']:>9.2f}{before / r['measured_s'] - 1:>+8.1%}"
                  f"{r['predicted_s'] / r['measured_s'] - 1:>+8.1%}  {'own' if r['own_probes'] else 'probed here'}")
        if args.out:
            for row, r in zip(report["results"], rows):
                row["predicted_s_before"], row["predicted_s"] = row.get("predicted_s"), r["predicted_s"]
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / path.name).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
