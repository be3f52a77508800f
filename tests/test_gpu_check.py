"""tools/gpu_check.sh end to end on the CPU (--cpu --quick via GPU_CHECK_ALLOW_CPU=1), so that the one
command meant for the first GPU machine runs every step's code in CI and cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("env", "gpu_tests", "cuda_vs_cpu", "patch_eff", "load_memory", "admission", "multi_gpu", "fp8")


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "GPU_CHECK_ALLOW_CPU": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--quick", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and list(report["steps"]) == list(STEPS)
    for name in STEPS:
        assert report["steps"][name]["status"] == "ok", (name, report["steps"][name])
        assert any(line.startswith(name) and " ok " in line for line in proc.stdout.splitlines()), proc.stdout
    s = report["steps"]
    assert s["gpu_tests"]["skipped"] and not s["gpu_tests"]["failed"]  # no CUDA: the gpu tests skip
    assert {"float32", "bfloat16"} <= set(s["cuda_vs_cpu"]) and s["cuda_vs_cpu"]["float32"]["rel_l2"] <= 1e-4
    assert [sorted(r["patches"]) for r in s["patch_eff"]["sizes"]] == [["1", "2"]] * 2
    assert all(st["estimate_gib"] >= 0 and st["load_s"] > 0 for st in s["load_memory"]["stages"])
    assert s["admission"]["ranks"][0]["strategy"] == "serial"
    assert all(v["max_abs_vs_serial"] <= 1e-4 for v in s["multi_gpu"]["strategies"].values())
    assert s["fp8"]["exact_upcast"] and set(s["fp8"]["ms_per_call"]) == {"cast", "upcast"}  # no scaled_mm on CPU
