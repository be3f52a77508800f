"""Drift of stale activations per sampler: PipeFusion and DistriFusion with few warm-up steps against serial.

    python tools/measure_drift.py [--preset small] [--steps 8] [--warmup-steps 1] [--ranks 2]
                                  [--samplers euler,heun,...] [--scheduler simple] [--json drift.json]

For every sampler, one real torchrun group (``--ranks`` CPU ranks) runs the serial reference (rank 0 alone),
PipeFusion, DistriFusion and the naive patch baseline (bands that never see each other: the error that
staleness is meant to avoid) on the built-in preset, and the relative L2 difference of each returned LATENT
to serial is printed; ``vs euler`` is the sampler's PipeFusion drift over euler's, to see which samplers
suffer more from stale K/V. All jobs of a run share one group, so the model loads once.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comfy_pipefusion.oneshot import run_jobs  # noqa: E402

SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "uni_pc",
            "lcm")
STRATEGIES = ("pipefusion", "distrifusion", "naive_patch")


def jobs_for(samplers, scheduler: str, steps: int, warmup: int, seed: int) -> list[dict]:
    jobs = []
    for s in samplers:
        sample = {"sampler": s, "scheduler": scheduler, "steps": steps, "seed": seed}
        jobs.append({"name": f"{s}--serial", "sample": sample, "parallel": {"strategy": "serial"}})
        for strategy in STRATEGIES:
            jobs.append({"name": f"{s}--{strategy}", "sample": sample,
                         "parallel": {"strategy": strategy, "warmup_steps": warmup}})
    return jobs


def rel_l2(x, ref) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--scheduler", default="simple")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        print(f"error: unknown sampler(s) {', '.join(unknown)}: choose from {', '.join(SAMPLERS)}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    out = run_jobs(args.preset, 0, jobs_for(samplers, args.scheduler, args.steps, args.warmup_steps, args.seed),
                   world_size=args.ranks, timeout=3600)
    rows = []
    for s in samplers:
        ref = out[f"{s}--serial"][0]
        rows.append({"sampler": s, **{k: rel_l2(out[f"{s}--{k}"][0], ref) for k in STRATEGIES}})
    euler = next((r["pipefusion"] for r in rows if r["sampler"] == "euler"), None)
    print(f"preset {args.preset}, {args.ranks} ranks, {args.steps} steps ({args.scheduler}), "
          f"{args.warmup_steps} warm-up step(s), seed {args.seed}: relative L2 vs serial "
          f"({time.monotonic() - t0:.0f} s)")
    print(f"{'sampler':<17}{'pipefusion':>12}{'distrifusion':>14}{'naive_patch':>13}{'pf vs euler':>13}")
    for r in rows:
        ratio = f"{r['pipefusion'] / euler:.2f}x" if euler else "-"
        print(f"{r['sampler']:<17}{r['pipefusion']:>12.2e}{r['distrifusion']:>14.2e}{r['naive_patch']:>13.2e}"
              f"{ratio:>13}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
