"""Round-trip overhead of one job on a warm group, beyond the sampling itself.

    python tools/measure_roundtrip.py [--size 2048] [--ranks 2] [--repeats 5]

Uses a 2-block Flux-shaped model that takes real Flux conditioning ([1, 512, 4096] T5 states, [1, 768]
pooled), so what travels is what a real 2048x2048 Flux job moves: text states, latent and noise in,
latent out, all float32 in shared memory. Overhead = the launcher's wall time for the job minus the
workers' own sampling time (model loaded, group warm); the median of --repeats jobs is printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comfy_pipefusion.models import flux  # noqa: E402
from comfy_pipefusion.models.checkpoint import save_checkpoint  # noqa: E402
from launcher import GroupPlan, Launcher  # noqa: E402

CONFIG = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
              joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(2, 6, 8))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pf-rt-"))
    root.chmod(0o700)
    model = flux.build_meta(CONFIG)
    flux.materialize(model, [n for n, m in model.named_children() if any(True for _ in m.parameters())],
                     torch.device("cpu"), torch.float32, 0)
    ckpt = root / "rt.safetensors"
    save_checkpoint(model, ckpt)
    h = args.size // 8
    tensors = {"txt": torch.randn(1, 512, 4096), "pooled": torch.randn(1, 768),
               "latent": torch.zeros(1, 16, h, h), "noise": torch.randn(1, 16, h, h)}
    moved = sum(t.numel() * 4 for t in tensors.values()) + 16 * h * h * 4
    job = {"model": {"checkpoint": str(ckpt)}, "parallel": {"strategy": "pipefusion", "warmup_steps": 1},
           "sample": {"height": args.size, "width": args.size, "steps": 1, "seed": 0}}
    launcher = Launcher(root)
    plan = GroupPlan(world_size=args.ranks)
    try:
        launcher.run(plan, job, tensors, (1, 16, h, h))  # start the group and load the model
        over, walls = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            _, reply = launcher.run(plan, job, tensors, (1, 16, h, h))
            total = time.perf_counter() - start
            over.append(total - reply["wall_s"])
            walls.append(reply["wall_s"])
    finally:
        launcher.stop()
    print(f"{args.size}x{args.size} Flux job on a warm group of {args.ranks}: {moved / 2**20:.1f} MiB through shared "
          f"memory; overhead beyond sampling: median {statistics.median(over) * 1000:.1f} ms "
          f"(min {min(over) * 1000:.1f}, max {max(over) * 1000:.1f}) over {args.repeats} jobs; "
          f"sampling itself {statistics.median(walls):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
