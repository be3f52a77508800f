"""strategy=auto in a worker group: the probes, the prediction of every plan, the choice (all ranks agree).

Every rank calls the same methods in the same order (they are collective on the control plane):

- the link is probed once per group, the first time a job needs a prediction (parallel/probe.py);
- block costs are probed by rank 0 once per model structure, device and dtype (cached as JSON in
  ``cache_dir``: the group's run directory, or ``PIPEFUSION_PROBE_DIR``) and broadcast, so every rank
  predicts from the same numbers;
- memory: each rank checks every candidate against its own budget (the admission estimate), the answers
  are gathered, and a plan fits where it fits on every rank.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from .config import ParallelConfig
from .memory import AdmissionError
from .parallel.planner import Choice, candidates, choose, predict, workload_of
from .parallel.probe import cached_blocks, grids_for, machine_costs, probe_link
from .parallel.simulate import BlockCost, Costs, Link, Prediction

log = logging.getLogger("comfy_pipefusion.autoplan")
ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}


def default_cache_dir() -> Path:
    return Path(os.environ.get("PIPEFUSION_PROBE_DIR") or Path.home() / ".cache" / "comfy-pipefusion" / "probes")


class GroupPlanner:
    """One per rank and group: what the group measured, kept between jobs."""

    def __init__(self, comm, device, threads: int, cache_dir: Path | None = None) -> None:
        self.comm, self.device, self.threads = comm, device, threads
        self.cache_dir = cache_dir
        self.link: Link | None = None
        self.unprobed = False  # the last job's block probe failed (no prediction; auto took the first plan)
        self.probed: dict | None = None  # the last job's block costs as measured or cached (``probes``)
        self.spans: list[dict] = []  # when this rank probed ({"probe", "start", "end"}, time.time())

    def costs(self, fam, config: dict, dtype, problem) -> Costs | None:
        """The group's costs for this model and job size (collective); None (on every rank, logged) when
        the block probe failed."""
        n_txt, n_img = problem.n_txt, problem.n_img
        if self.link is None:
            self.comm.barrier()  # the probe starts when every rank is here (a rank may wait for its turn)
            start = time.time()
            self.link = probe_link(self.comm)
            self.spans.append({"probe": "link", "start": start, "end": time.time()})
            log.info("link: %.3g MB/s one way, %.3g MB/s both ways (%.3g in a train of all-to-alls), %.3g ms "
                     "latency; the slowest rank %.1f%% behind at a collective", self.link.bandwidth / 1e6,
                     self.link.duplex / 1e6, self.link.exchange / 1e6, self.link.latency * 1e3,
                     100 * self.link.straggle)
        raw = None
        if self.comm.rank == 0:  # a failure is broadcast too: no rank is left waiting for the numbers
            try:
                start = time.time()
                blocks, outside, fresh = cached_blocks(self.cache_dir, fam, config, self.device, dtype, n_txt,
                                                       self.threads, grids_for(problem.rows, problem.cols))
                raw = {"blocks": {k: vars(v) for k, v in blocks.items()}, "outside": outside}
                if fresh:
                    self.spans.append({"probe": "blocks", "start": start, "end": time.time()})
            except Exception as exc:  # noqa: BLE001 - every rank raises it below
                raw = {"error": f"the block probe failed on rank 0: {type(exc).__name__}: {exc}"}
        raw = self.comm.broadcast_object(raw)
        self.unprobed = "error" in raw
        if "error" in raw:
            log.warning("%s: no prediction for this job", raw["error"])
            self.probed = None
            return None
        self.probed = {**raw, "threads": self.threads}
        blocks = {k: BlockCost(**v) for k, v in raw["blocks"].items()}
        return machine_costs(blocks, raw["outside"], self.link, n_img)

    def choose(self, par: ParallelConfig, problem, fam, meta, config: dict, dtype: str, fits) -> Choice:
        """The plan for a job whose ``par`` has strategy 'auto' (collective). ``fits(cfg)`` is this rank's
        memory check (False, or an AdmissionError, when the plan does not fit here)."""
        rest = {k: v for k, v in dataclasses.asdict(par).items()
                if k not in ("strategy", "patches", "stage_split", "world_size")}
        base = ParallelConfig("pipefusion" if self.comm.world_size > 1 else "serial", self.comm.world_size, **rest)
        plans = candidates(self.comm.world_size, problem.rows, base.warmup_steps, base, problem.branches == 2,
                           meta.config.num_attention_heads, problem.cols)
        mine = []
        for cfg in plans:
            try:
                mine.append(bool(fits(cfg)))
            except ValueError as exc:
                mine.append(str(exc))
        every = self.comm.gather_object(mine)
        ok = {i: all(r[i] is True for r in every) for i in range(len(plans))}  # fits on every rank
        refusals = [r[i] for r in every for i in range(len(plans)) if isinstance(r[i], str)]
        costs = self.costs(fam, config, dtype_of(dtype), problem)
        work = workload_of(fam, meta, problem, base.warmup_steps, ELEM[dtype])

        def agreed(cfg: ParallelConfig) -> bool:
            if not ok[plans.index(cfg)] and refusals and not any(ok.values()):
                raise AdmissionError(refusals[0])  # none fits: the first plan's refusal, with its way out
            return ok[plans.index(cfg)]

        if costs is None:  # no numbers to compare: the first plan that fits (PipeFusion's, the least memory)
            costs = Costs(blocks={k: BlockCost(1.0) for k in work.kinds}, link=Link(1.0))
            plans = [next((c for c in plans if agreed(c)), plans[0])]
        choice = choose(plans, work, costs, agreed)
        log.info("auto: %s", choice.describe())
        return choice

    def plan_job(self, plan, problem, fam, config: dict, meta, dtype: str, fits):
        """(plan, Choice or None, predicted seconds, probes) of a job whose ``plan`` is predicted, or chosen
        where its strategy is 'auto' (``fits``: see ``choose``). Collective. See ``probes``."""
        if plan.strategy != "auto":
            p = self.predict(plan, problem, fam, meta, config, dtype)
            return plan, None, p.wall_s if p is not None else None, self.probes()
        choice = self.choose(plan, problem, fam, meta, config, dtype, fits)
        return choice.cfg, choice, None if self.unprobed else choice.prediction.wall_s, self.probes()

    def probes(self) -> dict:
        """What the last prediction was made from, so that it can be made again (bench/repredict.py): the
        probed link (bandwidth B/s, latency s), the block costs (per kind; ``outside``: seconds per image
        token outside the blocks; None when the block probe failed) and their thread count, and when this
        rank ran a probe ({"probe": "link" or "blocks", "start", "end"}, time.time(); cached block costs
        are not probed again)."""
        return {"link": vars(self.link), "costs": self.probed, "spans": list(self.spans)}

    def predict(self, cfg: ParallelConfig, problem, fam, meta, config: dict, dtype: str) -> Prediction | None:
        """The simulator's wall time for a fixed plan (collective)."""
        costs = self.costs(fam, config, dtype_of(dtype), problem)
        if costs is None:
            return None
        return predict(cfg, workload_of(fam, meta, problem, cfg.warmup_steps, ELEM[dtype]), costs)


def dtype_of(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
