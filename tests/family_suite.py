"""The strategies of one built-in preset on real torchrun groups against its serial reference: exact when
synchronous, exact on the frozen trajectory, and with one warm-up step a drift at least 3x below naive
patches (used by the test modules of newer families: test_kontext.py, test_chroma.py). The drift may be measured
on another preset of the same structure (``stale_preset``: Chroma's with a modulation smooth in sigma)."""
from __future__ import annotations

import torch

from comfy_pipefusion.config import ParallelConfig, SampleSpec
from comfy_pipefusion.job import preset_problem
from comfy_pipefusion.models import family
from comfy_pipefusion.oneshot import run_jobs
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.parallel.serial import run_serial
from frozen_sampler import WORKER_ARGS, resolve

STEPS, STALE_STEPS = 3, 8
TOL = 1e-5


def sample(preset: str, sampler: str, steps: int, **kw) -> dict:
    p = family.find_preset(preset)[1]
    return {"height": p["height"], "width": p["width"], "steps": steps, "sampler": sampler, **kw}


def jobs(preset: str, world: int, stale_preset: str | None = None, stale_steps: int = STALE_STEPS) -> list[dict]:
    out = []

    def add(name, sampler, steps, parallel, model=None, **kw):
        out.append({"name": name, "sample": sample(preset, sampler, steps, **kw), "parallel": parallel,
                    **({"model": {"preset": model, "seed": 0}} if model else {})})
    add("pf_full", "euler", STEPS, {"strategy": "pipefusion", "patches": 3, "warmup_steps": STEPS})
    add("df_full", "euler", STEPS, {"strategy": "distrifusion", "warmup_steps": STEPS})
    add("pf_frozen", "frozen", STEPS, {"strategy": "pipefusion", "patches": 3, "warmup_steps": 1})
    add("df_frozen", "frozen", STEPS, {"strategy": "distrifusion", "warmup_steps": 1})
    for strategy in ("pipefusion", "distrifusion", "naive_patch"):
        add(f"stale_{strategy}", "euler", stale_steps, {"strategy": strategy, "warmup_steps": 1}, stale_preset)
    if world == 2:  # true CFG: [positive; negative] in one model batch
        add("pf_cfg", "euler", STEPS, {"strategy": "pipefusion", "patches": 2, "warmup_steps": STEPS}, cfg=3.0)
    return out


class Suite:
    """Group results per world size and serial references, each computed once."""

    def __init__(self, preset: str, stale_preset: str | None = None, stale_steps: int = STALE_STEPS) -> None:
        self.preset, self.stale_preset, self.stale_steps = preset, stale_preset, stale_steps
        self._groups, self._serial, self._models = {}, {}, {}

    def group(self, world: int) -> dict:
        if world not in self._groups:
            todo = jobs(self.preset, world, self.stale_preset, self.stale_steps)
            self._groups[world] = run_jobs(self.preset, 0, todo, world_size=world, timeout=900, worker_args=WORKER_ARGS)
        return self._groups[world]

    def serial(self, sampler: str, steps: int, preset: str | None = None, **kw) -> torch.Tensor:
        preset = preset or self.preset
        key = (preset, sampler, steps, tuple(sorted(kw.items())))
        if key not in self._serial:
            if preset not in self._models:
                self._models[preset] = load_rank_model(ModelSource(preset=preset), ParallelConfig("serial", 1), 0,
                                                       torch.device("cpu"), torch.float32)[0]
            problem = preset_problem(preset, SampleSpec(**sample(self.preset, resolve(sampler), steps, **kw)))
            with torch.inference_mode():
                self._serial[key] = problem.finish(run_serial(self._models[preset], problem, torch.float32,
                                                              torch.device("cpu")))
        return self._serial[key]

    def check_exact(self, world: int) -> None:
        out = self.group(world)
        for name, sampler in (("pf_full", "euler"), ("df_full", "euler"), ("pf_frozen", "frozen"),
                              ("df_frozen", "frozen")):
            ref = self.serial(sampler, STEPS)
            assert float(ref.abs().max()) > 0.05
            assert float((out[name][0] - ref).abs().max()) <= TOL, (self.preset, world, name)

    def check_staleness(self, world: int, factor: dict | None = None) -> dict:
        """Each strategy's drift at least ``factor[strategy]`` (default 3) times below naive patches; returns
        the measured {strategy: relative L2}."""
        out, ref = self.group(world), self.serial("euler", self.stale_steps, self.stale_preset)
        naive = rel(out["stale_naive_patch"][0], ref)
        errs = {}
        for strategy in ("pipefusion", "distrifusion"):
            errs[strategy] = err = rel(out[f"stale_{strategy}"][0], ref)
            want = (factor or {}).get(strategy, 3.0)
            assert 0 < err <= naive / want, (self.preset, world, strategy, err, naive, want)
        return {**errs, "naive_patch": naive}

    def check_cfg(self) -> None:
        ref = self.serial("euler", STEPS, cfg=3.0)
        assert float((self.group(2)["pf_cfg"][0] - ref).abs().max()) <= TOL * max(1.0, float(ref.abs().max()))
        assert float((ref - self.serial("euler", STEPS)).abs().max()) > 1e-3


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())
