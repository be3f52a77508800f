"""The first run on a GPU machine: one table, one JSON (issue 10 §6). Started by tools/gpu_check.sh.

    python tools/gpu_check.py [--json gpu_check.json] [--deadline-s 420]
    python tools/gpu_check.py --cpu --quick        # every step's code on CPU, small sizes (the suite runs it)

Steps (each bounded; one that fails is recorded and the next runs):
  env             torch, CUDA, the GPUs and their free memory
  gpu_tests       ``pytest -m gpu tests/test_gpu.py`` (passed / failed / skipped)
  cuda_vs_cpu     one forward of the same weights on the GPU and on the CPU: float32 (TF32 off) within
                  FP32_TOL, bfloat16 within BF16_TOL (relative L2 error)
  patch_eff       a Flux-width model (3072 wide, 3 blocks) at 1024² and 2048²: our patch-wise path with
                  M = 1, 2, 4, 8 patches against one diffusers forward, time per step (what bounds
                  PipeFusion's speed on any number of GPUs)
  load_memory     a bf16 checkpoint of that width split in two stages: each stage's load time and peak
                  memory, against the admission estimate of its weights
  admission       a real worker job: its peak memory against comfy_pipefusion/memory.py's estimate
  multi_gpu       with 2 or more GPUs: pipefusion and distrifusion against serial, exactness (frozen
                  trajectory) and speed (the bench); skipped with the reason on one GPU
  fp8             an 8-bit Linear: upcast copy == per-call cast, torch._scaled_mm (sm_89+) against them,
                  milliseconds per call of each
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from comfy_pipefusion import footprint, memory  # noqa: E402
from comfy_pipefusion.attention import StaleKV  # noqa: E402
from comfy_pipefusion.config import ParallelConfig  # noqa: E402
from comfy_pipefusion.oneshot import run_jobs  # noqa: E402
from comfy_pipefusion.models import checkpoint, family, flux  # noqa: E402
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model  # noqa: E402
from comfy_pipefusion.patches import full_span, pipefusion_spans  # noqa: E402

FP32_TOL = 1e-4  # relative L2, GPU float32 with TF32 off against the CPU
FROZEN_TOL = 1e-4  # max abs, a strategy against serial on the frozen trajectory (float32; kernels differ on GPU)
BF16_TOL = 3e-2  # relative L2, GPU bfloat16 against the CPU's float32 (8-bit mantissa through every block)
FP8_MM_TOL = 8e-2  # relative L2, torch._scaled_mm (activations in e4m3: 3-bit mantissa) against the cast
WIDE = dict(num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
QUICK_WIDE = dict(WIDE, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def gib(n: float) -> float:
    return round(n / 2 ** 30, 3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def random_model(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A Flux model with random weights made on ``device`` (fast at any width; values only need to be sane)."""
    model = flux.build_meta(config).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5 / 4, generator=g)
    return model.to(dtype).eval().requires_grad_(False)


def inputs(config: dict, rows: int, cols: int, n_txt: int, device, dtype, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows * cols, 64, generator=g)
    txt = torch.randn(1, n_txt, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=g)
    # t = 0.5 and guidance 4 are exact in bfloat16 after diffusers' x1000, so the comparison measures the
    # kernels, not the rounding of the timestep (700 would become 704 in bfloat16)
    return [t.to(device, dtype) for t in (x, txt, pooled)] + [torch.full((1,), 0.5, device=device, dtype=dtype),
                                                                torch.full((1,), 4.0, device=device, dtype=dtype)]


# ------------------------------------------------------------------------------------------------- steps

def step_env(a) -> dict:
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)  # creates this process's context on GPU i
            gpus.append({"name": torch.cuda.get_device_name(i), "free_gib": gib(free), "total_gib": gib(total)})
        # what a CUDA context costs (memory.CUDA_CONTEXT_BYTES assumes 0.59 GiB): GPU 0's used memory
        # beyond torch's own blocks, on a GPU nothing else uses
        used = gpus[0]["total_gib"] - gpus[0]["free_gib"] - gib(torch.cuda.memory_reserved(0))
        gpus[0]["context_gib_upper_bound"] = round(used, 3)
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus, "device": str(a.device),
            "summary": f"torch {torch.__version__}, {len(gpus)} GPU(s)" + (f": {gpus[0]['name']}" if gpus else "")}


def step_gpu_tests(a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.limit(300), env=a.env)
        import xml.etree.ElementTree as ET

        cases = ET.parse(xml).getroot().iter("testcase") if xml.exists() else []
        res = {"passed": [], "failed": [], "skipped": []}
        for c in cases:
            kind = "failed" if c.find("failure") is not None or c.find("error") is not None else \
                "skipped" if c.find("skipped") is not None else "passed"
            res[kind].append(c.get("name"))
    status = "failed" if proc.returncode not in (0, 5) or res["failed"] else "ok"
    return {**res, "status": status, "output_tail": proc.stdout[-1500:],
            "summary": f"{len(res['passed'])} passed, {len(res['failed'])} failed, {len(res['skipped'])} skipped"}


def step_cuda_vs_cpu(a) -> dict:
    name = "tiny" if a.quick else "small"
    fam, preset = family.find_preset(name)
    config, rows, n_txt = preset["config"], 8, 16
    ref_model, _ = load_rank_model(ModelSource(preset=name), ParallelConfig("serial", 1), 0,
                                   torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        ref = fam.forward(ref_model, *_args(config, rows, n_txt, "cpu", torch.float32)).float()
        out = {}
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        for kind, dtype, tol in (("float32", torch.float32, FP32_TOL), ("bfloat16", torch.bfloat16, BF16_TOL)):
            model = load_rank_model(ModelSource(preset=name), ParallelConfig("serial", 1), 0, a.device, dtype)[0]
            got = fam.forward(model, *_args(config, rows, n_txt, a.device, dtype)).float().cpu()
            rel = float((got - ref).norm() / ref.norm())
            out[kind] = {"rel_l2": rel, "tolerance": tol, "ok": rel <= tol}
    ok = all(v["ok"] for v in out.values())
    return {**out, "status": "ok" if ok else "failed", "summary": ", ".join(
        f"{k} rel_l2 {v['rel_l2']:.1e} (<= {v['tolerance']:.0e})" for k, v in out.items())}


def _args(config, rows, n_txt, device, dtype):
    x, txt, pooled, t, guidance = inputs(config, rows, rows, n_txt, device, dtype)
    return x, t, txt, pooled, guidance, rows, rows


def step_patch_eff(a) -> dict:
    config = QUICK_WIDE if a.quick else WIDE
    sizes, ms = ((128, 256), (1, 2)) if a.quick else ((1024, 2048), (1, 2, 4, 8))
    dtype, n_txt, reps = a.dtype, 64 if a.quick else 512, 1 if a.quick else 3
    model = random_model(config, a.device, dtype)
    blocks = flux.blocks_of(model)
    rows_out = []
    with torch.inference_mode():
        for px in sizes:
            rows = px // 16
            x, txt, pooled, t, guidance = inputs(config, rows, rows, n_txt, a.device, dtype)
            full = timed(lambda: flux.forward(model, x, t, txt, pooled, guidance, rows, rows), a.device, reps)
            emb = flux.embeddings(model, txt, n_txt, rows, rows, a.device, dtype)
            temb = flux.time_embedding(model, emb, t, pooled, guidance, dtype)
            heads, hd = config["num_attention_heads"], config["attention_head_dim"]
            kvs = [(StaleKV(1, heads, n_txt, rows * rows, hd, dtype, a.device),) for _ in blocks]
            row = {"pixels": px, "tokens": rows * rows + n_txt, "full_forward_s": full, "patches": {}}
            for m in ms:
                spans = pipefusion_spans(rows, rows, n_txt, m, "last_patch") if m > 1 else [full_span(n_txt, rows * rows)]

                def step():
                    for sp in spans:
                        img = flux.embed_image(model, emb, x[:, sp.i0:sp.i1], sp)
                        tx = emb.txt[:, sp.t0:sp.t1] if sp.n_txt else None
                        _, img = flux.run_blocks(model, blocks, kvs, sp, tx, img, temb, emb.for_span(sp))
                        flux.final_layer(model, img, temb)
                s = timed(step, a.device, reps)
                row["patches"][m] = {"step_s": s, "efficiency_vs_full": full / s}
            rows_out.append(row)
            kvs = None  # the buffers go before the next size
    summary = "; ".join(f"{r['pixels']}²: full {r['full_forward_s'] * 1e3:.1f} ms, " + ", ".join(
        f"M={m} {v['efficiency_vs_full']:.2f}" for m, v in r["patches"].items()) for r in rows_out)
    return {"width": config["num_attention_heads"] * config["attention_head_dim"], "dtype": str(dtype),
            "sizes": rows_out, "summary": summary}


def step_load_memory(a) -> dict:
    config = dict(QUICK_WIDE if a.quick else WIDE, num_layers=2, num_single_layers=4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wide.safetensors"
        checkpoint.save_checkpoint(random_model(config, torch.device("cpu"), torch.bfloat16), path, torch.bfloat16)
        cfg, source, meta = ParallelConfig("pipefusion", 2), ModelSource(checkpoint=str(path)), flux.build_meta(config)
        size = memory.JobSize(2, 1, 1, config["joint_attention_dim"], dtype="bfloat16")
        stages = []
        for rank in range(2):
            before = _mem_now(a.device)
            t = time.perf_counter()
            model, _ = load_rank_model(source, cfg, rank, a.device, torch.bfloat16)
            sync(a.device)
            took = time.perf_counter() - t
            peak = _mem_peak(a.device) - before
            est = footprint.rank_bytes(flux, meta, cfg, size, rank, a.device.type).weights
            stages.append({"rank": rank, "load_s": took, "peak_gib": gib(peak), "estimate_gib": gib(est),
                           "file_gib": gib(path.stat().st_size), "ratio": est / max(peak, 1)})
            del model
    return {"stages": stages, "summary": "; ".join(
        f"stage {s['rank']}: {s['load_s']:.2f} s, peak {s['peak_gib'] * 1024:.0f} MiB (estimate "
        f"{s['estimate_gib'] * 1024:.0f})" for s in stages)}


def _mem_now(device) -> int:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    import psutil

    return psutil.Process().memory_info().rss


def _mem_peak(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import psutil  # CPU: the RSS now (the process's lifetime peak would hide a second stage)

    return psutil.Process().memory_info().rss


def step_admission(a) -> dict:
    preset, px = ("tiny", 128) if a.quick else ("mid", 1024)
    fam, p = family.find_preset(preset)
    meta = fam.build_meta(p["config"])
    jobs, out = [("serial", 1)] + ([("pipefusion", 2)] if a.gpus >= 2 else []), []
    for strategy, n in jobs:
        job = {"name": "j", "parallel": {"strategy": strategy}, "text_tokens": p["text_tokens"],
               "sample": {"height": px, "width": px, "steps": 1}}
        _, m = run_jobs(preset, 0, [job], world_size=n, timeout=a.limit(240), cpu_only=a.cpu)["j"]
        size = memory.JobSize(px // 16, px // 16, p["text_tokens"], fam.conditioning_dims(p["config"])[0])
        est = memory.estimate(fam, meta, ParallelConfig(strategy, n), size, a.device.type)
        for r in range(n):
            grown = m["peak_bytes_per_rank"][r] - m["base_bytes_per_rank"][r]
            out.append({"strategy": strategy, "rank": r, "measured_gib": gib(grown), "estimate_gib": gib(est[r].total),
                        "ratio": est[r].total / max(grown, 1), "parts": est[r].describe(),
                        "load_s": m["load_s_per_rank"][r]})
    return {"preset": preset, "pixels": px, "ranks": out, "summary": "; ".join(
        f"{o['strategy']} r{o['rank']}: est/measured {o['ratio']:.2f}" for o in out)}


def step_multi_gpu(a) -> dict:
    """One bench run on the frozen trajectory (one warm-up step, the rest asynchronous): every strategy must
    equal serial (the exactness invariant) and the bench times them against serial in turns."""
    n = 2 if a.cpu else min(a.gpus, 4)
    if n < 2:
        return {"status": "skipped", "summary": f"needs 2 or more GPUs; this machine has {a.gpus}"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        bench = [sys.executable, "-m", "comfy_pipefusion.bench", "--world-size", str(n), "--json", str(out),
                 "--strategies", "serial,pipefusion,distrifusion", "--sampler", "frozen", "--warmup-steps", "1",
                 "--test-samplers", str(ROOT / "tests" / "frozen_sampler.py")]
        bench += ["--preset", "tiny", "--steps", "2", "--repeats", "1"] if a.quick else \
            ["--preset", "mid", "--steps", "8", "--repeats", "2"]
        proc = subprocess.run(bench, cwd=ROOT, capture_output=True, text=True, timeout=a.limit(300), env=a.env)
        if proc.returncode:
            raise RuntimeError(f"bench exited {proc.returncode}: {proc.stderr[-1500:]}")
        rows = [r for r in json.loads(out.read_text())["results"] if r["strategy"] != "serial"]
    res = {r["name"]: {"max_abs_vs_serial": r["max_abs_err_vs_serial"], "wall_s": r["wall_s"],
                       "speedup_vs_serial": r["speedup_vs_serial"]} for r in rows}
    ok = all(v["max_abs_vs_serial"] <= FROZEN_TOL for v in res.values())
    return {"world_size": n, "strategies": res, "status": "ok" if ok else "failed", "summary": ", ".join(
        f"{k} err {v['max_abs_vs_serial']:.1e} {v['speedup_vs_serial']:.2f}x" for k, v in res.items())}


def step_fp8(a) -> dict:
    """One Flux-width 8-bit Linear: the upcast copy equals the per-call cast exactly; torch._scaled_mm (sm_89+,
    PIPEFUSION_FP8_MATMUL=scaled) within FP8_MM_TOL of it; time per call of each."""
    from comfy_pipefusion.models import fp8

    d, n = (64, 256) if a.quick else (3072, 4096)
    dtype = torch.bfloat16 if a.device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(d, 4 * d).to(a.device)
    lin.weight = torch.nn.Parameter((torch.randn(4 * d, d, generator=g) / d ** 0.5).to(a.device, torch.float8_e4m3fn),
                                    requires_grad=False)
    lin.bias.data = lin.bias.data.to(dtype)
    fp8.keep_stored(lin)
    x = torch.randn(n, d, generator=g).to(a.device, dtype)
    out, ms = {}, {}
    with torch.inference_mode():
        for mode in ("cast", "upcast") + (("scaled_mm",) if fp8.scaled_mm_available(a.device) else ()):
            fp8.set_compute(lin, mode, dtype)
            out[mode] = lin(x).float()
            ms[mode] = round(timed(lambda: lin(x), a.device, 5 if a.quick else 20) * 1e3, 3)
    res = {"exact_upcast": bool(torch.equal(out["upcast"], out["cast"])), "ms_per_call": ms,
           "scaled_mm": "used" if "scaled_mm" in out else "not available on this device"}
    if "scaled_mm" in out:
        res["scaled_mm_rel_l2"] = float((out["scaled_mm"] - out["cast"]).norm() / out["cast"].norm())
    ok = res["exact_upcast"] and res.get("scaled_mm_rel_l2", 0.0) <= FP8_MM_TOL
    return {**res, "status": "ok" if ok else "failed", "summary": f"upcast {'==' if res['exact_upcast'] else '!='} "
            f"cast; ms/call {ms}; scaled_mm {res.get('scaled_mm_rel_l2', res['scaled_mm'])}"}


STEPS = {"env": step_env, "gpu_tests": step_gpu_tests, "cuda_vs_cpu": step_cuda_vs_cpu, "patch_eff": step_patch_eff,
         "load_memory": step_load_memory, "admission": step_admission, "multi_gpu": step_multi_gpu, "fp8": step_fp8}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run every step on the CPU (exercises the code)")
    ap.add_argument("--quick", action="store_true", help="small sizes")
    ap.add_argument("--json", default="gpu_check.json")
    ap.add_argument("--deadline-s", type=float, default=420.0, help="steps that would start later are skipped")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of: " + ", ".join(STEPS))
    a = ap.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("error: this torch sees no CUDA device; run with --cpu to exercise the steps on the CPU",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    a.device = torch.device("cpu") if a.cpu else torch.device("cuda", 0)
    a.dtype = torch.float32 if a.cpu else torch.bfloat16
    a.gpus = 0 if a.cpu else torch.cuda.device_count()
    a.env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if a.cpu else {})}
    a.limit = lambda want: max(10.0, min(want, a.deadline_s - (time.monotonic() - start)))
    report = {"device": str(a.device), "quick": a.quick, "steps": {}}
    print(f"{'step':<13}{'status':<9}{'seconds':>8}  summary")
    for name in [s.strip() for s in a.steps.split(",") if s.strip()]:
        t = time.monotonic()
        if t - start > a.deadline_s:
            res = {"status": "skipped", "summary": f"out of time (deadline {a.deadline_s:.0f} s)"}
        else:
            try:
                res = STEPS[name](a)
                res.setdefault("status", "ok")
            except Exception as exc:  # noqa: BLE001 - recorded; the next step runs
                res = {"status": "failed", "summary": f"{type(exc).__name__}: {str(exc)[:300]}",
                       "traceback": traceback.format_exc()[-3000:]}
        res["seconds"] = round(time.monotonic() - t, 2)
        report["steps"][name] = res
        print(f"{name:<13}{res['status']:<9}{res['seconds']:>8.1f}  {res.get('summary', '')}", flush=True)
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    skipped = [k for k, v in report["steps"].items() if v["status"] == "skipped"]
    if skipped:
        print("skipped: " + "; ".join(f"{k} ({report['steps'][k]['summary']})" for k in skipped))
    print(f"wrote {a.json}")
    return 1 if any(v["status"] == "failed" for v in report["steps"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
