"""Fidelity on real pictures: the built-in trained model's captions drawn serially and by every strategy,
judged by the judge trained with it (its agreement with the caption) and against serial (PSNR of the picture,
relative L2 of the LATENT).

    python tools/fidelity.py --out fidelity.json                        # the full table (long on 2 cores)
    python tools/fidelity.py --steps 8 --samplers euler --warmups 1 --prompts 16   # a subset

One job is a batch of --prompts captions (random scenes from --seed; each batch item gets its own noise from
the job's seed, as ComfyUI's batches do); serial runs in one process, every parallel configuration in one
2-rank torchrun group. Rows: serial, pipefusion M = 2, 4, 8, distrifusion, naive patches, for every
(sampler, steps, warm-up). The engine needs at least one warm-up step (it fills the K/V buffers), so warm-up
is 1, 2, 4 rather than 0, 1, 2. Results are written after each (sampler, steps) block, so a run cut short keeps
what it finished.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comfy_pipefusion.builtin import judge as judges, latent, model as builtin, scenes, text  # noqa: E402
from comfy_pipefusion.oneshot import run_jobs  # noqa: E402

CONFIGS = [("pipefusion", 2), ("pipefusion", 4), ("pipefusion", 8), ("distrifusion", 0), ("naive_patch", 0)]


def per_image_psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default="8,28")
    ap.add_argument("--samplers", default="euler,dpmpp_2m")
    ap.add_argument("--warmups", default="1,2,4")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--checkpoint", default=str(builtin.WEIGHTS))
    ap.add_argument("--out", default="fidelity.json")
    args = ap.parse_args(argv)
    judge = judges.load_beside(args.checkpoint)
    if judge is None:
        print(f"error: no judge beside {args.checkpoint}: train it with ./dev.sh train --judge-only", file=sys.stderr)
        return 2
    scs = scenes.random_scenes(args.prompts, torch.Generator().manual_seed(args.seed + 1000))
    captions = [s.caption for s in scs]
    table, vocab = builtin.load_text(args.checkpoint)
    txt, pooled = text.encode(table, captions, vocab)
    model = {"checkpoint": str(Path(args.checkpoint).resolve()), "seed": args.seed}
    rows, began = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pipefusion-fidelity-") as tmp:
        cond = Path(tmp) / "cond.safetensors"
        save_file({"txt": txt.contiguous(), "pooled": pooled.contiguous()}, str(cond))
        for sampler in args.samplers.split(","):
            for steps in [int(s) for s in args.steps.split(",")]:
                sample = {"height": latent.ENGINE_SIZE, "width": latent.ENGINE_SIZE, "steps": steps,
                          "seed": args.seed, "sampler": sampler, "scheduler": "simple", "batch": args.prompts}
                serial = [{"name": "serial", "parallel": {"strategy": "serial"}, "sample": sample,
                           "tensors_file": str(cond)}]
                par = [{"name": f"{s}-M{m}-W{w}", "sample": sample, "tensors_file": str(cond),
                        "parallel": {"strategy": s, "warmup_steps": w, **({"patches": m} if m else {})}}
                       for w in [int(x) for x in args.warmups.split(",")] for s, m in CONFIGS]
                out = run_jobs(None, args.seed, serial, world_size=1, model=model)
                out.update(run_jobs(None, args.seed, par, world_size=args.world_size, model=model))
                ref = out["serial"][0]
                ref_pic = latent.decode(ref)
                for name, (x, _) in out.items():
                    pic = latent.decode(x)
                    read = judge.read(pic)
                    want = torch.tensor([s.labels() for s in scs])
                    strategy, m, w = (name.split("-") + ["M0", "W0"])[:3]
                    rows.append({
                        "sampler": sampler, "steps": steps, "strategy": strategy, "patches": int(m[1:]),
                        "warmup_steps": int(w[1:]), "prompts": args.prompts,
                        "judge_agreement": float((read == want).float().mean()),
                        "judge_all_five": float((read == want).all(1).float().mean()),
                        "psnr_vs_serial_db": float(per_image_psnr(pic, ref_pic).clamp_max(99).mean()),
                        "rel_l2_vs_serial": float(((x - ref).flatten(1).norm(dim=1) /
                                                   ref.flatten(1).norm(dim=1)).mean())})
                report = {"checkpoint": args.checkpoint, "seed": args.seed, "world_size": args.world_size,
                          "elapsed_s": time.perf_counter() - began, "rows": rows}
                Path(args.out).write_text(json.dumps(report, indent=1))
                print(f"{sampler} {steps} steps done ({report['elapsed_s']:.0f} s)", flush=True)
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    print("| sampler | steps | strategy | M | warm-up | judge agrees | all five | PSNR vs serial (dB) | rel L2 vs serial |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        psnr = "∞" if r["strategy"] == "serial" else f"{r['psnr_vs_serial_db']:.1f}"
        print(f"| {r['sampler']} | {r['steps']} | {r['strategy']} | {r['patches'] or '-'} | "
              f"{r['warmup_steps'] or '-'} | {r['judge_agreement']:.3f} | {r['judge_all_five']:.3f} | {psnr} | "
              f"{r['rel_l2_vs_serial']:.2e} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
