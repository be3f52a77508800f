"""Shared fixtures: serial references computed in this process, and one real torchrun group per world
size that runs every distributed job of the suite (process start-up dominates on 2 cores).

Every multi-rank group the suite starts (torchrun groups, the launcher's warm groups, the ComfyUI server's
workers, the bench) runs under NCCL's ordering rules (``PIPEFUSION_COMM_RULES=nccl``, see
comfy_pipefusion/parallel/rules.py): set here, before any group starts, so that every child inherits it."""
from __future__ import annotations

import os

import pytest
import torch

from comfy_pipefusion.config import ParallelConfig, SampleSpec
from comfy_pipefusion.oneshot import run_jobs
from comfy_pipefusion.job import preset_problem
from comfy_pipefusion.models import flux
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.parallel.serial import run_serial
from frozen_sampler import WORKER_ARGS, resolve

PRESET = "tiny"
EXACT_STEPS = 4  # exactness runs
STALE_STEPS = 8  # bounded-staleness runs
PATCHES = {2: (2, 4, 3), 3: (3, 6, 4), 4: (4, 8, 5)}  # M = N, 2N, uneven
COMM_RULES = {"PIPEFUSION_COMM_RULES": "nccl", "PIPEFUSION_COMM_HANG_S": "10"}


def pytest_configure(config) -> None:
    """NCCL's rules for every group of the session (tests that want plain gloo set it in their child's env)."""
    for k, v in COMM_RULES.items():
        os.environ.setdefault(k, v)


def sample(sampler: str, steps: int) -> dict:
    return {"sampler": sampler, "steps": steps}


def suite_jobs(world: int) -> list[dict]:
    jobs = []
    for m in PATCHES[world]:
        jobs.append({"name": f"pf_full_m{m}", "sample": sample("euler", EXACT_STEPS),
                     "parallel": {"strategy": "pipefusion", "patches": m, "warmup_steps": EXACT_STEPS}})
        jobs.append({"name": f"pf_frozen_m{m}", "sample": sample("frozen", EXACT_STEPS),
                     "parallel": {"strategy": "pipefusion", "patches": m, "warmup_steps": 1}})
    for stream in ("first_patch", "every_patch"):
        jobs.append({"name": f"pf_frozen_{stream}", "sample": sample("frozen", EXACT_STEPS),
                     "parallel": {"strategy": "pipefusion", "patches": PATCHES[world][2], "warmup_steps": 1,
                                  "text_stream": stream}})
    jobs.append({"name": "pf_frozen_memory", "sample": sample("frozen", EXACT_STEPS),
                 "parallel": {"strategy": "pipefusion", "warmup_steps": 1, "balance": "memory"}})
    jobs.append({"name": "df_full", "sample": sample("euler", EXACT_STEPS),
                 "parallel": {"strategy": "distrifusion", "warmup_steps": EXACT_STEPS}})
    jobs.append({"name": "df_frozen", "sample": sample("frozen", EXACT_STEPS),
                 "parallel": {"strategy": "distrifusion", "warmup_steps": 1}})
    for strategy in ("pipefusion", "distrifusion", "naive_patch"):
        jobs.append({"name": f"stale_{strategy}", "sample": sample("euler", STALE_STEPS),
                     "parallel": {"strategy": strategy, "warmup_steps": 1}})
    return jobs


@pytest.fixture(scope="session")
def serial_model():
    model, _ = load_rank_model(ModelSource(preset=PRESET), ParallelConfig("serial", 1), 0, torch.device("cpu"),
                               torch.float32)
    return model


@pytest.fixture(scope="session")
def serial_ref(serial_model):
    """LATENT samples of the serial reference (diffusers' own forward) for (sampler, steps)."""
    cache = {}

    def get(sampler: str, steps: int) -> torch.Tensor:
        if (sampler, steps) not in cache:
            p = flux.PRESETS[PRESET]
            problem = preset_problem(PRESET, SampleSpec(height=p["height"], width=p["width"], steps=steps,
                                                        sampler=resolve(sampler)))
            with torch.inference_mode():
                cache[sampler, steps] = problem.finish(run_serial(serial_model, problem, torch.float32,
                                                                  torch.device("cpu")))
        return cache[sampler, steps]
    return get


@pytest.fixture(scope="session")
def group_results():
    """{world_size: {job name: (samples, metrics)}}, each world size run once in a real torchrun group."""
    cache = {}

    def get(world: int):
        if world not in cache:
            cache[world] = run_jobs(PRESET, 0, suite_jobs(world), world_size=world, timeout=900,
                                    worker_args=WORKER_ARGS)
        return cache[world]
    return get
