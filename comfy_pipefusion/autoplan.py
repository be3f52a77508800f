"""strategy=auto in a worker group: the probes, the prediction of every plan, the choice (all ranks agree).

Every rank calls the same methods in the same order (they are collective on the control plane):

- the link is probed once per group, the first time a job needs a prediction (parallel/probe.py);
- block costs are probed by every rank at once on its own device, once per model structure, device, dtype
  and group size (cached as JSON in ``cache_dir``: the group's run directory, or ``PIPEFUSION_PROBE_DIR``),
  and gathered: every rank predicts from the same numbers, the slowest rank's per block kind (a slower card,
  or ranks sharing one machine's memory, pace the group); where the devices differ (``probe.pace_of``), each
  PipeFusion stage at its own device's pace, and auto also weighs stages sized to the devices;
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
from .parallel.planner import Choice, candidates, choose, paced, predict, workload_of
from .parallel.probe import (REPEATS, SWEEPS, SWEEPS_UNTIMED, cache_path, device_name, grids_for, machine_costs,
                              pace_of, probe_blocks, probe_link, read_cached, slowest, write_cached)
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
        self.devices: list[str] = []  # every rank's device name, gathered with the link probe
        self.unprobed = False  # the last job's block probe failed (no prediction; auto took the first plan)
        self.probed: dict | None = None  # the last job's block costs as measured or cached (``probes``)
        self.spans: list[dict] = []  # when this rank probed ({"probe", "start", "end"}, time.time())

    def costs(self, fam, config: dict, dtype, problem, kinds=()) -> Costs | None:
        """The group's costs for this model and job size (collective); None (on every rank, logged) when
        the block probe failed. ``kinds``: the model's blocks, for each rank's pace (``Costs.pace``)."""
        n_txt, n_img = problem.n_txt, problem.n_img
        if self.link is None:
            self.comm.barrier()  # the probe starts when every rank is here (a rank may wait for its turn)
            start = time.time()
            self.link = probe_link(self.comm)
            self.devices = self.comm.gather_object(device_name(self.device))  # every rank's, for the cache
            self.spans.append({"probe": "link", "start": start, "end": time.time()})
            log.info("link: %.3g MB/s one way, %.3g MB/s both ways (%.3g in a train of all-to-alls), %.3g ms "
                     "latency; the slowest rank %.1f%% behind at a collective", self.link.bandwidth / 1e6,
                     self.link.duplex / 1e6, self.link.exchange / 1e6, self.link.latency * 1e3,
                     100 * self.link.straggle)
        grids = grids_for(problem.rows, problem.cols)
        how = {"config": config, "grids": grids, "n_txt": n_txt, "sweeps": [SWEEPS_UNTIMED, SWEEPS, REPEATS]}
        path = cache_path(self.cache_dir, how, self.devices, dtype, self.threads)
        raw = self.comm.broadcast_object(read_cached(path) if self.comm.rank == 0 else None)
        if raw is None:
            raw = self._probe_blocks(fam, config, dtype, n_txt, grids, problem.n_txt + n_img)
            if raw is not None and self.comm.rank == 0:
                write_cached(path, raw)
        self.unprobed = raw is None
        if raw is None:
            self.probed = None
            return None
        blocks = {k: BlockCost(**v) for k, v in raw["blocks"].items()}
        outside = raw["outside"]
        self.probed = {**raw, "threads": self.threads}
        # each rank's pace where the devices differ
        return machine_costs(blocks, outside, self.link, n_img, pace_of(raw, kinds, problem.n_txt + n_img))

    def _probe_blocks(self, fam, config: dict, dtype, n_txt: int, grids, n: int) -> dict | None:
        """Every rank probes its device at once (the pace the ranks keep in a job); the group's costs are the
        slowest rank's per block kind at ``n`` tokens (``slowest``), with every rank's reading. None on every
        rank (logged) when a rank's probe failed."""
        self.comm.barrier()
        try:
            start = time.time()
            blocks, outside = probe_blocks(fam, config, self.device, dtype, n_txt, grids)
            self.spans.append({"probe": "blocks", "start": start, "end": time.time()})
            log.info("probed %s block kinds on %s in %.1f s", len(blocks), self.device, time.time() - start)
            mine = {"blocks": {k: vars(v) for k, v in blocks.items()}, "outside": outside}
        except Exception as exc:  # noqa: BLE001 - every rank learns of it below
            mine = {"error": f"{type(exc).__name__}: {exc}"}
        every = self.comm.gather_object(mine)  # a failure is gathered too: no rank is left waiting
        failed = [f"the block probe failed on rank {r}: {x['error']}" for r, x in enumerate(every) if "error" in x]
        if failed:
            log.warning("%s: no prediction for this job", "; ".join(failed))
            return None
        readings = [({k: BlockCost(**v) for k, v in x["blocks"].items()}, x["outside"]) for x in every]
        blocks, outside, who = slowest(readings, n)
        return {"blocks": {k: vars(v) for k, v in blocks.items()}, "outside": outside, "slowest": who,
                "ranks": every}

    def choose(self, par: ParallelConfig, problem, fam, meta, config: dict, dtype: str, fits) -> Choice:
        """The plan for a job whose ``par`` has strategy 'auto' (collective). ``fits(cfg)`` is this rank's
        memory check (False, or an AdmissionError, when the plan does not fit here)."""
        rest = {k: v for k, v in dataclasses.asdict(par).items()
                if k not in ("strategy", "patches", "stage_split", "world_size")}
        base = ParallelConfig("pipefusion" if self.comm.world_size > 1 else "serial", self.comm.world_size, **rest)
        work = workload_of(fam, meta, problem, base.warmup_steps, ELEM[dtype])
        costs = self.costs(fam, config, dtype_of(dtype), problem, work.kinds)
        plans = candidates(self.comm.world_size, problem.rows, base.warmup_steps, base, problem.branches == 2,
                           work.heads, problem.cols)
        if costs is not None:  # where the devices differ, PipeFusion with stages sized to them too
            plans = paced(plans, work, costs)
        mine = []
        for cfg in plans:
            try:
                mine.append(bool(fits(cfg)))
            except ValueError as exc:
                mine.append(str(exc))
        every = self.comm.gather_object(mine)
        ok = {i: all(r[i] is True for r in every) for i in range(len(plans))}  # fits on every rank
        refusals = [r[i] for r in every for i in range(len(plans)) if isinstance(r[i], str)]

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
        token outside the blocks; None when the block probe failed), their thread count, every rank's reading
        (``ranks``) and which rank's each kind's costs are (``slowest``), and when this
        rank ran a probe ({"probe": "link" or "blocks", "start", "end"}, time.time(); cached block costs
        are not probed again)."""
        return {"link": vars(self.link), "costs": self.probed, "spans": list(self.spans)}

    def predict(self, cfg: ParallelConfig, problem, fam, meta, config: dict, dtype: str) -> Prediction | None:
        """The simulator's wall time for a fixed plan (collective)."""
        work = workload_of(fam, meta, problem, cfg.warmup_steps, ELEM[dtype])
        costs = self.costs(fam, config, dtype_of(dtype), problem, work.kinds)
        if costs is None:
            return None
        return predict(cfg, work, costs)


def dtype_of(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
