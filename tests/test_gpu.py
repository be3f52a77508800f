"""The CUDA + NCCL path. Runs only where GPUs are present (marker ``gpu``)."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.group import run_jobs

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for a NCCL group")
def test_nccl_pipefusion_and_distrifusion_match_serial(serial_ref):
    jobs = [{"name": n, "sample": {"sampler": "frozen", "steps": 4},
             "parallel": {"strategy": s, "warmup_steps": 1}} for n, s in (("pf", "pipefusion"), ("df", "distrifusion"))]
    res = run_jobs("tiny", 0, jobs, world_size=2, timeout=600)
    ref = serial_ref("frozen", 4)
    for name in ("pf", "df"):
        assert res[name][1]["device"].startswith("cuda")
        assert float((res[name][0] - ref).abs().max()) <= 1e-4  # TF32/kernels differ from the CPU reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_serial_matches_cpu(serial_ref):
    res = run_jobs("tiny", 0, [{"name": "s", "sample": {"sampler": "frozen", "steps": 4},
                                "parallel": {"strategy": "serial"}}], world_size=1, timeout=600)
    assert float((res["s"][0] - serial_ref("frozen", 4)).abs().max()) <= 1e-3
