"""Train the built-in model (and its judge) from a seed, and write the checkpoint that is committed.

    ./dev.sh train                       # = python tools/train_builtin.py  (the committed weights)
    python tools/train_builtin.py --steps 20 --out /tmp/x.safetensors   # a short run

Writes ``--out`` (default comfy_pipefusion/builtin/shapes-flux.safetensors) and ``<out>.json`` with the
recipe (config, seed, steps, batch, lr), the loss curve, the time taken and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comfy_pipefusion.builtin import judge as judges, model as builtin, scenes  # noqa: E402
from comfy_pipefusion.builtin.train import TrainConfig, train  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a busy machine more threads mostly wait for each other)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                    help="dtype the weights are stored in (the 10 MB budget)")
    ap.add_argument("--out", default=str(builtin.WEIGHTS))
    ap.add_argument("--judge-steps", type=int, default=400, help="the judge's training steps (0: no judge)")
    ap.add_argument("--judge-only", action="store_true", help="train and write only the judge")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.judge_steps:
        judge, secs = judges.train_judge(steps=args.judge_steps, seed=args.seed,
                                         on_log=lambda s, l: print(f"judge step {s}  loss {l:.3f}", flush=True))
        sc, imgs = scenes.batch(256, torch.Generator().manual_seed(args.seed + 99))
        acc = judge.agreement(imgs, [s.caption for s in sc])
        judges.save(judge, judges.path_beside(args.out))
        print(f"wrote {judges.path_beside(args.out)} in {secs:.0f} s; agreement on 256 fresh drawn scenes {acc:.3f}")
    if args.judge_only:
        return 0
    cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    load0 = os.getloadavg()

    def on_log(step: int, loss: float) -> None:
        print(f"step {step:5d}/{cfg.steps}  loss {loss:.4f}  {time.strftime('%H:%M:%S')}", flush=True)

    res = train(cfg, on_log=on_log)
    out = builtin.save(res.model, res.table, args.out, dtype=getattr(torch, args.dtype),
                       extra_metadata={"pipefusion.train": json.dumps(asdict(cfg))})
    record = {"recipe": asdict(cfg), "config": builtin.CONFIG, "dtype": args.dtype, "threads": args.threads,
              "seconds": res.seconds, "loss_curve": res.losses, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "torch": torch.__version__, "bytes": out.stat().st_size}
    Path(str(out) + ".json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {res.seconds:.0f} s; loss {res.losses[0]:.4f} -> "
          f"{res.losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
