"""The CUDA + NCCL path. Runs only where GPUs are present (marker ``gpu``)."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.oneshot import run_jobs
from frozen_sampler import WORKER_ARGS

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for a NCCL group")
def test_nccl_pipefusion_and_distrifusion_match_serial(serial_ref):
    jobs = [{"name": n, "sample": {"sampler": "frozen", "steps": 4},
             "parallel": {"strategy": s, "warmup_steps": 1}} for n, s in (("pf", "pipefusion"), ("df", "distrifusion"))]
    res = run_jobs("tiny", 0, jobs, world_size=2, timeout=600, worker_args=WORKER_ARGS)
    ref = serial_ref("frozen", 4)
    for name in ("pf", "df"):
        assert res[name][1]["device"].startswith("cuda")
        assert float((res[name][0] - ref).abs().max()) <= 1e-4  # TF32/kernels differ from the CPU reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_serial_matches_cpu(serial_ref):
    res = run_jobs("tiny", 0, [{"name": "s", "sample": {"sampler": "frozen", "steps": 4},
                                "parallel": {"strategy": "serial"}}], world_size=1, timeout=600,
                   worker_args=WORKER_ARGS)
    assert float((res["s"][0] - serial_ref("frozen", 4)).abs().max()) <= 1e-3


BF16_REL_L2 = 3e-2  # bfloat16 (8-bit mantissa) through every block, against float32 on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, BF16_REL_L2)])
def test_cuda_forward_matches_cpu_on_the_same_weights(dtype, tol):
    """One diffusers forward of the same synthetic weights on the GPU and on the CPU (float32 reference);
    TF32 off; t = 0.5 and guidance 4 are exact in bfloat16 after the x1000, so only the kernels differ."""
    from comfy_pipefusion.config import ParallelConfig
    from comfy_pipefusion.models import family
    from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model

    fam, preset = family.find_preset("small")
    cfg, rows, n_txt = preset["config"], 8, 16
    g = torch.Generator().manual_seed(1)
    x, txt = torch.randn(1, rows * rows, 64, generator=g), torch.randn(1, n_txt, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g)
    t, guidance = torch.full((1,), 0.5), torch.full((1,), 4.0)

    def forward(device, dt):
        model, _ = load_rank_model(ModelSource(preset="small"), ParallelConfig("serial", 1), 0, torch.device(device), dt)
        args = [a.to(device, dt) for a in (x, t, txt, pooled, guidance)]
        with torch.inference_mode():
            return fam.forward(model, *args, rows, rows).float().cpu()

    torch.backends.cuda.matmul.allow_tf32 = False
    ref, got = forward("cpu", torch.float32), forward("cuda", dtype)
    assert float((got - ref).norm() / ref.norm()) <= tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_admission_refuses_on_the_gpu_before_allocating():
    from comfy_pipefusion.memory import AdmissionError
    from comfy_pipefusion.parallel.comm import Comm
    from comfy_pipefusion.engine import ModelCache, prepare
    from comfy_pipefusion.jobspec import Job

    device = torch.device("cuda", 0)
    before = torch.cuda.memory_allocated(device)
    models = ModelCache(device)
    job = {"model": {"preset": "mid"}, "parallel": {"strategy": "serial"},
           "sample": {"height": 16384, "width": 16384, "steps": 1, "batch": 4}}  # ~330 GiB
    with pytest.raises(AdmissionError, match="its GPU has .* free; to fit"):
        prepare(Job.from_wire(job, 1), Comm(0, 1, device=device), models)
    assert models.value is None and torch.cuda.memory_allocated(device) == before
