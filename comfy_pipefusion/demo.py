"""README's main job: the built-in trained model draws a few captions, serially and with every strategy.

    python -m comfy_pipefusion.demo                    # ./dev.sh demo: writes demo/grid.png and demo/demo.json
    python -m comfy_pipefusion.demo --prompts "red circle middle center stripes" --steps 28 --patches 4

Serial runs in a process of its own, the parallel strategies in one torchrun group of --world-size CPU ranks
(both start together). Each picture is decoded with the model's own latent decode (builtin/latent.py). The
grid has one row per strategy and one column per caption, then one row per parallel strategy with its
difference to serial (|difference| x 4). The JSON table gives, per strategy and caption, the wall time, the
relative L2 error of the LATENT and the PSNR of the picture against serial, and the judge's agreement with
the caption where a judge ships beside the weights.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .builtin import latent, model as builtin, scenes, text
from .oneshot import end_children, owned_tempdir, run_jobs

PARALLEL = ("pipefusion", "distrifusion", "naive_patch")
SCALE = 2  # the grid shows each 128-pixel picture at 256 pixels


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m comfy_pipefusion.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=";".join(scenes.demo_captions()[:3]),
                    help="captions separated by ';' (five words: " + " ".join(scenes.ATTRIBUTES) + ")")
    ap.add_argument("--checkpoint", default=str(builtin.WEIGHTS))
    ap.add_argument("--strategies", default=",".join(PARALLEL))
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--patches", type=int, default=0, help="PipeFusion's M (0: world size)")
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--steps", type=int, default=builtin.STEPS)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="simple")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="demo", help="folder for grid.png and demo.json")
    return ap.parse_args(argv)


def encode_prompts(checkpoint: str, prompts: list[str], folder: Path) -> list[Path]:
    """One tensors file (txt, pooled) per prompt, encoded with the checkpoint's own text table."""
    table, vocab = builtin.load_text(checkpoint)
    paths = []
    for i, prompt in enumerate(prompts):
        txt, pooled = text.encode(table, [prompt], vocab)
        paths.append(folder / f"prompt{i}.safetensors")
        save_file({"txt": txt.contiguous(), "pooled": pooled.contiguous()}, str(paths[-1]))
    return paths


def make_jobs(args, strategies: list[str], cond: list[Path]) -> tuple[list[dict], list[dict]]:
    sample = {"height": latent.ENGINE_SIZE, "width": latent.ENGINE_SIZE, "steps": args.steps, "seed": args.seed,
              "sampler": args.sampler, "scheduler": args.scheduler}
    serial = [{"name": f"serial-{i}", "parallel": {"strategy": "serial"}, "sample": sample, "tensors_file": str(c)}
              for i, c in enumerate(cond)]
    par = [{"name": f"{s}-{i}", "sample": sample, "tensors_file": str(c),
            "parallel": {"strategy": s, "warmup_steps": args.warmup_steps,
                         **({"patches": args.patches} if s == "pipefusion" else {})}}
           for s in strategies for i, c in enumerate(cond)]
    return serial, par


def run_both(args, model: dict, serial: list[dict], par: list[dict]) -> dict:
    """Serial (one process) and the parallel jobs (one group) started together; {name: (latent, metrics)}."""
    results: dict = {}

    def body(tag, jobs, world):
        try:
            results[tag] = run_jobs(None, args.seed, jobs, world_size=world, model=model)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            results[tag] = exc

    threads = [threading.Thread(target=body, args=("serial", serial, 1))]
    if par:
        threads.append(threading.Thread(target=body, args=("group", par, args.world_size)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results.values():
        if isinstance(r, BaseException):
            raise r
    return {k: v for r in results.values() for k, v in r.items()}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def grid_png(path: Path, rows: list[tuple[str, list[torch.Tensor]]], prompts: list[str]) -> None:
    """A labelled grid: ``rows`` of (label, pictures [3, H, W] in [0, 1]), one column per prompt."""
    from PIL import Image, ImageDraw

    size = scenes.SIZE * SCALE
    label_w, head_h, pad = 150, 34, 4
    w = label_w + len(prompts) * (size + pad)
    h = head_h + len(rows) * (size + pad)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, p in enumerate(prompts):
        words = p.split()
        x = label_w + j * (size + pad)
        draw.text((x + 2, 2), " ".join(words[:3]), fill=(0, 0, 0))
        draw.text((x + 2, 16), " ".join(words[3:]), fill=(0, 0, 0))
    for i, (label, pics) in enumerate(rows):
        y = head_h + i * (size + pad)
        for k, line in enumerate(label.split("\n")):
            draw.text((4, y + size // 2 - 8 + 14 * k), line, fill=(0, 0, 0))
        for j, pic in enumerate(pics):
            arr = (pic.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (size + pad), y))
    canvas.save(path)


def summarise(args, prompts, strategies, out: dict, judge=None) -> tuple[dict, list]:
    pics = {name: latent.decode(x)[0] for name, (x, _) in out.items()}
    table, rows = [], [("serial", [pics[f"serial-{i}"] for i in range(len(prompts))])]
    for s in ["serial", *strategies]:
        for i, prompt in enumerate(prompts):
            x, m = out[f"{s}-{i}"]
            ref = out[f"serial-{i}"][0]
            row = {"strategy": s, "prompt": prompt, "wall_s": m["wall_s_median"],
                   "rel_l2_vs_serial": float((x - ref).norm() / ref.norm()),
                   "psnr_vs_serial_db": psnr(pics[f"{s}-{i}"], pics[f"serial-{i}"])}
            if math.isinf(row["psnr_vs_serial_db"]):
                row["psnr_vs_serial_db"] = None  # identical pictures (JSON has no infinity)
            if judge is not None:
                row["judge_agrees"] = judge.agreement(pics[f"{s}-{i}"][None], [prompt])
            table.append(row)
        if s != "serial":
            rows.append((s, [pics[f"{s}-{i}"] for i in range(len(prompts))]))
    for s in strategies:
        rows.append((f"|{s} - serial|\nx 4", [((pics[f"{s}-{i}"] - pics[f"serial-{i}"]).abs() * 4)
                                                 for i in range(len(prompts))]))
    return {"table": table}, rows


def print_table(report: dict) -> None:
    print(f"{'strategy':<14}{'wall_s':>8}{'rel_l2':>10}{'psnr_db':>9}{'judge':>7}  prompt")
    for r in report["table"]:
        judge = f"{r['judge_agrees']:.2f}" if "judge_agrees" in r else "-"
        print(f"{r['strategy']:<14}{r['wall_s']:>8.2f}{r['rel_l2_vs_serial']:>10.2e}"
              f"{'-' if r['psnr_vs_serial_db'] is None else format(r['psnr_vs_serial_db'], '.1f'):>9}{judge:>7}  "
              f"{r['prompt']}")


def main(argv=None) -> int:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda n, f: (end_children(), sys.exit(128 + n)))
    args = parse_args(argv)
    began = time.perf_counter()
    prompts = [p.strip() for p in args.prompts.split(";") if p.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        for p in prompts:
            scenes.parse(p)
        bad = [s for s in strategies if s not in PARALLEL]
        if bad:
            raise ValueError(f"unknown strategy {bad[0]!r} in --strategies: choose from {', '.join(PARALLEL)}")
        if not Path(args.checkpoint).is_file():
            raise ValueError(f"no checkpoint at {args.checkpoint}: train it with ./dev.sh train")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    from .builtin import judge as judges

    judge = judges.load_beside(args.checkpoint)
    with owned_tempdir("pipefusion-demo-") as tmp:
        cond = encode_prompts(args.checkpoint, prompts, Path(tmp))
        serial, par = make_jobs(args, strategies, cond)
        out = run_both(args, {"checkpoint": str(Path(args.checkpoint).resolve()), "seed": args.seed}, serial, par)
    report, rows = summarise(args, prompts, strategies, out, judge)
    report.update({"checkpoint": args.checkpoint, "steps": args.steps, "sampler": args.sampler,
                   "scheduler": args.scheduler, "seed": args.seed, "world_size": args.world_size,
                   "patches": args.patches or args.world_size, "warmup_steps": args.warmup_steps,
                   "total_s": time.perf_counter() - began})
    grid_png(folder / "grid.png", rows, prompts)
    (folder / "demo.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"picture: {(folder / 'grid.png').resolve()}\ntable:   {(folder / 'demo.json').resolve()}  "
          f"({report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
