"""Peak resident memory of each rank while it loads its PipeFusion stage from a big checkpoint.

    .venv/bin/python tools/measure_load_memory.py [--family flux|flux2] [--dir /tmp] [--doubles 5 --singles 5]
                                                  [--world-size 4] [--dtype bfloat16] [--json out.json] [--keep]

Writes a synthetic Flux.1 (or, with ``--family flux2``, Flux.2) checkpoint in the original single-file layout at
the real width (3072; Flux.2's 6144 with its 15360-wide text input and shared modulation), bf16, with
``--doubles`` double and ``--singles`` single blocks (Flux.1 5 + 5: 4.9 GB; Flux.2 2 + 2: 6.2 GB), streamed to
disk tensor by tensor; then
starts ``--world-size`` CPU ranks under torchrun, each of which builds the model on the meta device and loads
its stage with ``load_rank_model`` (balance "compute", as the engine does), while a thread samples its resident
memory every 2 ms. Each rank reports its stage's bytes, its resident memory before the load, the peak during
it and ``ru_maxrss``; the target is peak <= stage bytes + 1 GiB. The checkpoint is deleted afterwards unless
``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GIB = 2**30
FLUX_WIDTH = dict(in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def real_width(family_name: str) -> dict:
    """The family's configuration at its real width, without the depth."""
    if family_name == "flux2":
        from comfy_pipefusion.models.flux2 import REAL

        return dict(REAL)
    return dict(FLUX_WIDTH)


def write_synthetic(path: Path, doubles: int, singles: int, family_name: str = "flux") -> int:
    """Stream a bf16 original-layout checkpoint of ``family_name`` (flux, flux2) to ``path``; returns its size."""
    from comfy_pipefusion.models import family
    from comfy_pipefusion.models.checkpoint import ORIGINAL_MAPS
    from comfy_pipefusion.models.keymap import invert

    config = {**real_width(family_name), "num_layers": doubles, "num_single_layers": singles}
    meta = family.get(family_name).build_meta(config)
    shapes = {k: v.shape for k, v in invert(meta.state_dict(), ORIGINAL_MAPS[family_name](config)).items()}
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * shape.numel()
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    pattern = (torch.randn(2**25, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    chunk = pattern.view(torch.uint8).numpy().tobytes()  # 64 MiB of plausible bf16 weights, repeated
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        left = offset
        while left:
            f.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))
    return path.stat().st_size


class PeakSampler:
    """Samples this process's resident set size every ``period`` seconds while running."""

    def __init__(self, period: float = 0.002) -> None:
        import psutil

        self.proc, self.period, self.peak = psutil.Process(), period, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def __enter__(self) -> "PeakSampler":
        self.peak = self.proc.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def rank_main(path: str, out: str, dtype_name: str) -> None:
    """One torchrun rank: load this rank's stage and report its memory."""
    import psutil
    import torch.distributed as dist

    from comfy_pipefusion.config import ParallelConfig
    from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ParallelConfig("pipefusion", world_size=world)
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with PeakSampler() as sampler:
        loaded = load_rank_model(ModelSource(checkpoint=path), cfg, rank, torch.device("cpu"),
                                 getattr(torch, dtype_name))
    seconds = time.perf_counter() - start
    model = next(x for x in loaded if isinstance(x, torch.nn.Module))
    stage = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.is_meta)
    held = [n for n, m in model.named_children() if any(not p.is_meta for p in m.parameters())]
    report = {"rank": rank, "stage_bytes": stage, "rss_before": before, "peak_rss": sampler.peak,
              "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "load_s": seconds,
              "modules": held}
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        Path(out).write_text(json.dumps(reports, indent=1))
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="flux", choices=("flux", "flux2"), help="Flux.1 (width 3072) or Flux.2 (6144)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the synthetic checkpoint goes")
    ap.add_argument("--doubles", type=int, default=5)
    ap.add_argument("--singles", type=int, default=5)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype the ranks load into")
    ap.add_argument("--json", help="write the per-rank figures here")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--rank-load", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_load:
        rank_main(args.rank_load, args.out, args.dtype)
        return 0
    path = Path(args.dir) / f"pipefusion-load-memory-{os.getpid()}.safetensors"
    out = Path(args.dir) / f"pipefusion-load-memory-{os.getpid()}.json"
    try:
        size = write_synthetic(path, args.doubles, args.singles, args.family)
        width = 6144 if args.family == "flux2" else 3072
        print(f"checkpoint: {path} {size / GIB:.2f} GiB ({args.doubles} double + {args.singles} single {args.family} "
              f"blocks, width {width}, bf16, original layout)")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world_size}",
               f"--log-dir={os.devnull}",  # no torchelastic_* folder left in the temporary folder
               __file__, "--rank-load", str(path), "--out", str(out), "--dtype", args.dtype]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        reports = json.loads(out.read_text())
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    print(f"{'rank':>4} {'stage GiB':>10} {'RSS before':>11} {'peak RSS':>9} {'peak-before':>12} "
          f"{'peak-stage':>11} {'ru_maxrss':>10} {'load s':>7}  target peak <= stage + 1 GiB")
    ok = True
    for r in reports:
        fits = r["peak_rss"] <= r["stage_bytes"] + GIB
        ok &= fits
        print(f"{r['rank']:>4} {r['stage_bytes'] / GIB:>10.3f} {r['rss_before'] / GIB:>11.3f} "
              f"{r['peak_rss'] / GIB:>9.3f} {(r['peak_rss'] - r['rss_before']) / GIB:>12.3f} "
              f"{(r['peak_rss'] - r['stage_bytes']) / GIB:>11.3f} {r['ru_maxrss'] / GIB:>10.3f} "
              f"{r['load_s']:>7.1f}  {'ok' if fits else 'OVER'}  {', '.join(r['modules'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"file_bytes": size, "reports": reports}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
