"""Drift of stale activations per sampler: PipeFusion and DistriFusion with few warm-up steps against serial.

    python tools/measure_drift.py [--preset small] [--steps 8] [--warmup-steps 1] [--ranks 2]
                                  [--samplers euler,heun,...] [--scheduler simple] [--json drift.json]
                                  [--text-streams last_patch,first_patch,every_patch]
                                  [--height 1024 --width 1024]

For every sampler, this process runs the serial reference and one real torchrun group (``--ranks`` CPU ranks)
runs PipeFusion, DistriFusion and the naive patch baseline (bands that never see each other: the error that
staleness is meant to avoid) on the built-in preset, and the relative L2 difference of each returned LATENT
to serial is printed; ``vs euler`` is the sampler's PipeFusion drift over euler's, to see which samplers
suffer more from stale K/V. All jobs of a run share one group, so the model loads once. ``--text-streams``
adds a PipeFusion column per text-stream scheme (which patch computes the text, and the reference tokens of a
Kontext preset, that ride with it), e.g. ``--preset kontext-tiny --text-streams last_patch,first_patch,every_patch``.
``--height``/``--width`` sample the preset's model at another image size (the share of the sequence its text
takes: Flux.2 pads the text to 512 tokens whatever the image).
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


def jobs_for(samplers, scheduler: str, steps: int, warmup: int, seed: int, streams=(), size=None) -> list[dict]:
    jobs = []
    for s in samplers:
        sample = {"sampler": s, "scheduler": scheduler, "steps": steps, "seed": seed,
                  **({"height": size[0], "width": size[1]} if size else {})}
        for strategy in STRATEGIES:
            jobs.append({"name": f"{s}--{strategy}", "sample": sample,
                         "parallel": {"strategy": strategy, "warmup_steps": warmup}})
        for stream in streams:
            jobs.append({"name": f"{s}--pf-{stream}", "sample": sample,
                         "parallel": {"strategy": "pipefusion", "warmup_steps": warmup, "text_stream": stream}})
    return jobs


def serial(preset: str, sampler: str, scheduler: str, steps: int, seed: int, size=None):
    """The serial reference in this process (a serial job needs a group of one rank)."""
    import torch

    from comfy_pipefusion.config import ParallelConfig, SampleSpec
    from comfy_pipefusion.job import preset_problem
    from comfy_pipefusion.models import family
    from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
    from comfy_pipefusion.parallel.serial import run_serial

    p = family.find_preset(preset)[1]
    model = load_rank_model(ModelSource(preset=preset), ParallelConfig("serial", 1), 0, torch.device("cpu"),
                            torch.float32)[0]
    height, width = size or (p["height"], p["width"])
    problem = preset_problem(preset, SampleSpec(height=height, width=width, steps=steps, sampler=sampler,
                                                scheduler=scheduler, seed=seed))
    with torch.inference_mode():
        return problem.finish(run_serial(model, problem, torch.float32, torch.device("cpu")))


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
    ap.add_argument("--height", type=int, default=0, help="image height (default: the preset's)")
    ap.add_argument("--width", type=int, default=0, help="image width (default: the preset's)")
    ap.add_argument("--text-streams", default="", help="also PipeFusion with each of these text-stream schemes")
    args = ap.parse_args(argv)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        print(f"error: unknown sampler(s) {', '.join(unknown)}: choose from {', '.join(SAMPLERS)}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    streams = [s.strip() for s in args.text_streams.split(",") if s.strip()]
    size = (args.height, args.width) if args.height or args.width else None
    if size and not (args.height and args.width):
        print("error: give both --height and --width (or neither: the preset's size)", file=sys.stderr)
        return 2
    out = run_jobs(args.preset, 0, jobs_for(samplers, args.scheduler, args.steps, args.warmup_steps, args.seed,
                                            streams, size), world_size=args.ranks, timeout=3600)
    rows = []
    for s in samplers:
        ref = serial(args.preset, s, args.scheduler, args.steps, args.seed, size)
        rows.append({"sampler": s, **{k: rel_l2(out[f"{s}--{k}"][0], ref) for k in STRATEGIES},
                     **{f"pf-{t}": rel_l2(out[f"{s}--pf-{t}"][0], ref) for t in streams}})
    euler = next((r["pipefusion"] for r in rows if r["sampler"] == "euler"), None)
    print(f"preset {args.preset}{' at %dx%d' % size[::-1] if size else ''}, {args.ranks} ranks, {args.steps} steps ({args.scheduler}), "
          f"{args.warmup_steps} warm-up step(s), seed {args.seed}: relative L2 vs serial "
          f"({time.monotonic() - t0:.0f} s)")
    print(f"{'sampler':<17}{'pipefusion':>12}{'distrifusion':>14}{'naive_patch':>13}{'pf vs euler':>13}"
          + "".join(f"{'pf-' + t:>16}" for t in streams))
    for r in rows:
        ratio = f"{r['pipefusion'] / euler:.2f}x" if euler else "-"
        print(f"{r['sampler']:<17}{r['pipefusion']:>12.2e}{r['distrifusion']:>14.2e}{r['naive_patch']:>13.2e}"
              f"{ratio:>13}" + "".join(f"{r['pf-' + t]:>16.2e}" for t in streams))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
