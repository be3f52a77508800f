"""What live previews and LoRA changes cost on a warm group (issue 12's figures), on the CPU or the GPUs.

    python tools/measure_preview_lora.py [--preset small] [--size 512] [--steps 8] [--turns 4] [--ranks 2]

Previews: the same job with and without ``on_preview``, in alternating turns (the machine's load drifts);
reports the sampling wall time per step of each (the workers' own clock, from the "done" message).
LoRAs: a rank-16 LoRA on every linear weight of the blocks; a job with it (weights read and patched), then
one with another strength (patched again, no read), then without (undone), each against a job with nothing
to change; the ranks' own patch time comes from their log ("LoRAs: N weights ... in S s").
"""
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comfy_pipefusion.job import synthetic_conditioning  # noqa: E402
from comfy_pipefusion.models import flux  # noqa: E402
from comfy_pipefusion.models.checkpoint import save_checkpoint  # noqa: E402
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model  # noqa: E402
from comfy_pipefusion.config import ParallelConfig  # noqa: E402
from comfy_pipefusion.sampling.noise import comfy_noise  # noqa: E402
from launcher import GroupPlan, Launcher  # noqa: E402


def write_lora(model, path: Path, rank: int = 16) -> int:
    """A peft-format LoRA on every 2-D weight of the transformer blocks; returns its size in bytes."""
    g, out = torch.Generator().manual_seed(0), {}
    for k, v in model.state_dict().items():
        if "transformer_blocks." in k and k.endswith(".weight") and v.dim() == 2:
            m = k[:-len(".weight")]
            out[f"transformer.{m}.lora_A.weight"] = torch.randn(rank, v.shape[1], generator=g) * 0.01
            out[f"transformer.{m}.lora_B.weight"] = torch.randn(v.shape[0], rank, generator=g) * 0.01
    save_file(out, str(path))
    return path.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pf-"))
    root.chmod(0o700)
    cfg = flux.PRESETS[args.preset]["config"]
    model, _ = load_rank_model(ModelSource(preset=args.preset), ParallelConfig("serial", 1), 0,
                               torch.device("cpu"), torch.float32)
    ckpt, lora = root / "model.safetensors", root / "lora.safetensors"
    save_checkpoint(model, ckpt)
    lora_bytes = write_lora(model, lora)
    h = args.size // 8
    txt, pooled = synthetic_conditioning(cfg, 64, 1, 0)
    tensors = {"txt": txt, "pooled": pooled, "latent": torch.zeros(1, 16, h, h), "noise": comfy_noise((1, 16, h, h), 1)}
    launcher, plan = Launcher(root), GroupPlan(world_size=args.ranks)

    def job(adapters=()):
        return {"model": {"checkpoint": str(ckpt)}, "adapters": list(adapters),
                "parallel": {"strategy": "pipefusion", "patches": 2, "warmup_steps": 1},
                "sample": {"height": args.size, "width": args.size, "steps": args.steps, "seed": 1}}

    def run(preview: bool, adapters=()):
        seen = []
        t0 = time.perf_counter()
        _, done = launcher.run(plan, job(adapters), tensors, (1, 16, h, h),
                               on_preview=(lambda s, x, n: seen.append(s)) if preview else None)
        assert not preview or len(seen) == args.steps
        return done["wall_s"] / args.steps, time.perf_counter() - t0

    try:
        t0 = time.perf_counter()
        run(False)
        first = time.perf_counter() - t0
        per_step = {False: [], True: []}
        for turn in range(args.turns):
            for preview in ((False, True) if turn % 2 == 0 else (True, False)):
                per_step[preview].append(run(preview)[0])
        for preview, xs in per_step.items():
            print(f"previews {'on ' if preview else 'off'}: {statistics.median(xs) * 1e3:.1f} ms/step "
                  f"(median of {len(xs)}: {', '.join(f'{x * 1e3:.1f}' for x in xs)})")
        plain = run(False)[1]
        spec = {"path": str(lora), "strength": 1.0, "stamp": "a"}
        timings = {"first job (group start + weights read)": first, "job with nothing to change": plain,
                   "job + LoRA (read + patch)": run(False, [spec])[1],
                   "job + LoRA at another strength": run(False, [{**spec, "strength": 0.5}])[1],
                   "job without the LoRA (undone)": run(False)[1]}
        for k, v in timings.items():
            print(f"{k:42s} {v:6.2f} s")
        print(f"LoRA file: {lora_bytes / 2**20:.1f} MiB")
        for line in launcher.group.log_path.read_text(errors="replace").splitlines():
            if re.search(r"LoRAs: \d+ weights", line):
                print(line.strip())
    finally:
        launcher.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
