"""The MODEL path's costs on a real ComfyUI server: peak memory of the ComfyUI process and of each rank, and the
time of a full weight transfer against a LoRA change on the warm group.

    .venv/bin/python tools/measure_parallelize.py [--doubles 1 --singles 1] [--bf16] [--json out.json]

``--bf16``: ComfyUI keeps the weights in bf16 (``--bf16-unet``), so the file written to /dev/shm is bf16 too,
and the ranks hold bf16 stages (Parallelize's weight_dtype): a multi-GB checkpoint in about half the memory.

Writes a synthetic Flux.1 checkpoint at the real width (tools/measure_load_memory.py; bf16 on disk, float32 in
ComfyUI on the CPU) and a kohya LoRA (tests/lora_files.py), starts the test ComfyUI host, then queues, with only
UNETLoader -> (LoraLoaderModelOnly) -> PipeFusion Parallelize (cpu:2) -> KSampler (2 steps):
  0. the model loaded by ComfyUI alone (its resident peak before our node runs);
  1. no LoRA: the whole patched model written to /dev/shm, the group started, the ranks load their stages;
  2. the LoRA at 1.0, 3. at 0.5, 4. removed: only the changed weights written and updated in place.
Reports each prompt's wall time, the seconds the ComfyUI process spent writing (its log), the time the group
spent loading (the websocket's "loading" -> "busy" states) and VmHWM (peak RSS) of ComfyUI and each rank.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

GIB = 2**30


def hwm(pid: int) -> int:
    """Peak resident set size (VmHWM) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def prompt(unet: str, lora: float | None, out: str, weight_dtype: str = "default") -> dict:
    cond = {"tokens": 4, "width": 4096, "pooled_width": 768, "guidance": 3.5, "seed": 0}
    nodes = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
             "3": {"class_type": "PipeFusionTestConditioning", "inputs": cond},
             "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    model = ["1", 0]
    if lora is not None:
        nodes["l"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "strength_model": lora,
                                                                       "lora_name": "measure-kohya.safetensors"}}
        model = ["l", 0]
    nodes["p"] = {"class_type": "PipeFusionParallelize", "inputs": {"model": model, "devices": "cpu:2",
                                                                    "strategy": "pipefusion", "patches": 2,
                                                                    "warmup_steps": 1, "weight_dtype": weight_dtype}}
    nodes["k"] = {"class_type": "KSampler", "inputs": {
        "model": ["p", 0], "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    nodes["s"] = {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": out}}
    return nodes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doubles", type=int, default=1)
    ap.add_argument("--singles", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="ComfyUI and the ranks keep bf16 weights")
    ap.add_argument("--json")
    args = ap.parse_args()
    from comfy_helpers import run_prompt, start_server, worker_pids
    from lora_files import write_kohya
    from measure_load_memory import write_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="pf-measure-"))
    base, run_dir = tmp / "base", tmp / "run"
    (base / "models" / "diffusion_models").mkdir(parents=True)
    (base / "models" / "loras").mkdir(parents=True)
    run_dir.mkdir(mode=0o700)
    size = write_synthetic(base / "models" / "diffusion_models" / "measure.safetensors", args.doubles, args.singles)
    write_kohya(base / "models" / "loras" / "measure-kohya.safetensors", "flux")
    srv = start_server(base, run_dir, extra_env={"PIPEFUSION_LOG": "INFO"},
                       args=("--bf16-unet",) if args.bf16 else ())
    rows = []
    try:
        load_only = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "measure.safetensors",
                                                                  "weight_dtype": "default"}},
                     "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                     "c": {"class_type": "PipeFusionTestLoadedModels",
                           "inputs": {"model": ["1", 0], "samples": ["5", 0], "name": "measure"}}}
        status, _ = run_prompt(srv, load_only, timeout=1800)
        rows.append({"case": "ComfyUI loads the model", "status": status, "comfy_hwm": hwm(srv.pid)})
        for case, lora in (("no LoRA (full transfer)", None), ("LoRA 1.0 added", 1.0), ("LoRA at 0.5", 0.5),
                           ("LoRA removed", None)):
            marks: list = []
            t0 = time.monotonic()
            status, _ = run_prompt(srv, prompt("measure.safetensors", lora, f"m{len(rows)}",
                                               "bfloat16" if args.bf16 else "default"), timeout=1800,
                                   on_message=lambda m: marks.append((time.monotonic(), m)))
            wall = time.monotonic() - t0
            st = [(t, m["data"]["state"]) for t, m in marks if m["type"] == "pipefusion.status"]
            load = next((t for t, s in st if s == "loading"), None)
            busy = next((t for t, s in st if s == "busy"), None)
            pids = worker_pids(srv.pid)
            rows.append({"case": case, "status": status, "wall_s": round(wall, 2),
                         "group_loading_s": round(busy - load, 2) if load and busy else 0.0,
                         "comfy_hwm": hwm(srv.pid), "rank_hwm": [hwm(p) for p in pids], "pids": pids})
        log = srv.log_path.read_text(errors="replace")
        writes = re.findall(r"PipeFusion Parallelize: (.*) written in ([0-9.]+) s", log)
    finally:
        srv.stop()
    print(f"checkpoint: {size / GIB:.2f} GiB bf16 on disk ({args.doubles} double + {args.singles} single blocks)")
    for r in rows:
        extra = "" if "wall_s" not in r else (
            f"  wall {r['wall_s']:6.1f} s  group loading {r['group_loading_s']:5.1f} s"
            f"  ranks' peak RSS {[round(h / GIB, 2) for h in r['rank_hwm']]} GiB")
        print(f"{r['case']:28s} {r['status']:18s} ComfyUI peak RSS {r['comfy_hwm'] / GIB:6.2f} GiB{extra}")
    for what, secs in writes:
        print(f"  ComfyUI wrote {what} in {secs} s")
    loaded, peak = rows[0]["comfy_hwm"], max(r["comfy_hwm"] for r in rows)
    stage = max(max(r.get("rank_hwm") or [0]) for r in rows)
    print(f"ComfyUI's peak grew by {(peak - loaded) / GIB:.2f} GiB over loading the model alone "
          f"(the largest rank's peak, a stage and its work: {stage / GIB:.2f} GiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "writes": writes, "checkpoint_bytes": size}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
