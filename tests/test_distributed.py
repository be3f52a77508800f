"""The engine on real torchrun/gloo process groups of 2, 3 and 4 ranks (under NCCL's ordering rules, see conftest), against the serial reference."""
from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.models import flux
from comfy_pipefusion.parallel.costs import expected_bytes
from comfy_pipefusion.parallel.plan import rank_modules

from conftest import EXACT_STEPS, PATCHES, PRESET, STALE_STEPS, suite_jobs

WORLDS = (2, 3, 4)
TOL = 1e-5


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("world", WORLDS)
def test_full_warmup_equals_serial(world, group_results, serial_ref):
    """Invariant 1: warm-up steps >= steps makes every strategy synchronous, hence exact."""
    res = group_results(world)
    ref = serial_ref("euler", EXACT_STEPS)
    names = [f"pf_full_m{m}" for m in PATCHES[world]] + ["df_full"]
    for name in names:
        assert res[name][0].shape == ref.shape
        assert max_abs(res[name][0], ref) <= TOL, name


@pytest.mark.parametrize("world", WORLDS)
def test_frozen_trajectory_equals_serial(world, group_results, serial_ref):
    """Invariant 2: identity updates at a constant sigma make stale K/V equal fresh K/V, so the
    asynchronous steps (bands, buffers, ring, text stream) must reproduce serial exactly."""
    res = group_results(world)
    ref = serial_ref("frozen", EXACT_STEPS)
    names = [f"pf_frozen_m{m}" for m in PATCHES[world]] + \
            ["pf_frozen_first_patch", "pf_frozen_every_patch", "pf_frozen_memory", "df_frozen"]
    for name in names:
        assert max_abs(res[name][0], ref) <= TOL, name
    # and the frozen result really depends on the model: it is not the initial latent
    assert float(ref.abs().max()) > 0.1


@pytest.mark.parametrize("world", WORLDS)
def test_staleness_is_bounded(world, group_results, serial_ref):
    """With one warm-up step, stale K/V err at least 3x less than bands that never see each other."""
    res = group_results(world)
    ref = serial_ref("euler", STALE_STEPS)
    naive = rel_l2(res["stale_naive_patch"][0], ref)
    for name in ("stale_pipefusion", "stale_distrifusion"):
        err = rel_l2(res[name][0], ref)
        assert 0 < err <= naive / 3, (name, err, naive)


@pytest.mark.parametrize("world", WORLDS)
def test_bytes_sent_match_formulas(world, group_results):
    res = group_results(world)
    cfg = flux.PRESETS[PRESET]["config"]
    p = flux.PRESETS[PRESET]
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    for job in suite_jobs(world):
        par = ParallelConfig(world_size=world, **job["parallel"])
        steps = job["sample"]["steps"]
        want = [expected_bytes(par.strategy, rank=r, world=world, batch=1, width=width, n_txt=p["text_tokens"],
                               rows=p["height"] // 16, cols=p["width"] // 16, steps=steps,
                               warmup=par.warmup_steps, patches=par.num_patches, elem=4,
                               layers=cfg["num_layers"] + cfg["num_single_layers"], text_stream=par.text_stream)
                for r in range(world)]
        assert res[job["name"]][1]["bytes_sent_per_rank"] == want, job["name"]
    # pipefusion sends far less than distrifusion
    pf = max(res["stale_pipefusion"][1]["bytes_sent_per_rank"])
    df = max(res["stale_distrifusion"][1]["bytes_sent_per_rank"])
    assert pf * 3 < df


@pytest.mark.parametrize("world", WORLDS)
def test_pipefusion_ranks_hold_only_their_stage(world, group_results):
    """Each rank materialises its own blocks (plus embedders on the first, final layer on the last)."""
    res = group_results(world)
    meta = flux.build_meta(flux.PRESETS[PRESET]["config"])

    def nbytes(names):
        return sum(p.numel() * 4 for n in names for p in meta.get_submodule(n).parameters())

    total = sum(p.numel() * 4 for p in meta.parameters())
    embedders = nbytes(flux.SHARED_MODULES + flux.FIRST_MODULES)
    final = nbytes(flux.LAST_MODULES)
    for job in ("pf_frozen_memory", f"pf_frozen_m{PATCHES[world][0]}"):
        cfg = ParallelConfig(world_size=world, **suite_jobs_by_name(world)[job]["parallel"])
        got = res[job][1]["param_bytes_per_rank"]
        assert got == [nbytes(rank_modules(flux, meta, cfg, r)) for r in range(world)], job
        blocks = [b.prefix for b in flux.blocks_of(meta)]
        held = [set(rank_modules(flux, meta, cfg, r)) & set(blocks) for r in range(world)]
        assert sorted(sum((sorted(h) for h in held), [])) == sorted(blocks)  # every block once, nowhere twice
    mem = res["pf_frozen_memory"][1]["param_bytes_per_rank"]
    assert max(mem) <= total / world + embedders + final, (mem, total / world)
    assert max(res["df_frozen"][1]["param_bytes_per_rank"]) == total  # distrifusion: full replicas


def suite_jobs_by_name(world: int) -> dict:
    return {j["name"]: j for j in suite_jobs(world)}
