"""strategy=auto: predict every plan of a group that fits in memory and pick the fastest.

The plans of a group of N ranks: PipeFusion with M = N, 2N, 4N patches (as many as the image has token
rows), DistriFusion, the exact methods and hybrids that fit the group (``exact_candidates``), each with the
user's warm-up steps (never fewer: warm-up is a quality setting). Each is predicted by the simulator
(simulate.py) from the probed costs (probe.py) and checked with the memory admission estimate (memory.py)
by the caller's ``fits``. The fastest that fits wins, except among plans predicted within MARGIN of it
(closer than the simulator tells apart): there the one that sends the least (its busiest link's seconds)
wins, then an exact one (serial's picture: no stale activations, ``exact``), then the earlier candidate
(PipeFusion first). Measured on CPUs, the simulator's errors lean one way: a plan that computes more and sends
less (PipeFusion) is predicted slower, against one that sends more (DistriFusion, Ulysses), than it runs; an
earlier rule taking an exact plan within 3% of a faster stale one ran Ulysses 10% slower than PipeFusion.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import STRATEGIES, ParallelConfig
from .simulate import Costs, Prediction, Workload, simulate

MARGIN = 0.03
"""How much slower (predicted) than the fastest a plan that sends less may be and still be chosen."""


@dataclass(frozen=True)
class Choice:
    """The plan ``auto`` picked, with every candidate's prediction (seconds) and whether it fits."""

    cfg: ParallelConfig
    prediction: Prediction
    table: tuple[tuple[str, float, bool, float], ...]
    """(plan label, predicted seconds, fits in memory, its busiest link's seconds) per candidate, in candidate
    order."""

    def describe(self) -> str:
        return f"{label(self.cfg)} (predicted {self.prediction.wall_s:.2f} s; " + ", ".join(
            f"{name} {s:.2f} s{'' if ok else ' (does not fit)'}" for name, s, ok, _ in self.table) + ")"

    def as_dict(self) -> dict:
        return {"plan": label(self.cfg), "strategy": self.cfg.strategy, "patches": self.cfg.num_patches,
                "ulysses": self.cfg.ulysses, "stage_split": self.cfg.stage_split,
                "warmup_steps": self.cfg.warmup_steps, "predicted_s": self.prediction.wall_s,
                "candidates": [{"plan": n, "predicted_s": s, "fits": ok, "comm_s": c} for n, s, ok, c in self.table]}


def label(cfg: ParallelConfig) -> str:
    u = f" U{cfg.ulysses}" if cfg.ulysses else ""  # a Ulysses degree chosen, not the plan's default
    if cfg.strategy.endswith("pipefusion"):
        split = f" S{'/'.join(map(str, cfg.stage_split))}" if cfg.stage_split else ""  # blocks per stage
        return f"{cfg.strategy} x{cfg.world_size}{u} M{cfg.num_patches} W{cfg.warmup_steps}{split}"
    return f"{cfg.strategy} x{cfg.world_size}{u} W{cfg.warmup_steps}"


def candidates(world: int, rows: int, warmup: int, base: ParallelConfig | None = None, cfg: bool = False,
               heads: int = 0, cols: int | None = None) -> list[ParallelConfig]:
    """The plans ``auto`` considers on ``world`` ranks for an image of ``rows`` x ``cols`` token rows and
    columns (``cfg``: a true-CFG job of two branches, which CFG halves split: not DualCFGGuider's three;
    ``heads``: the model's attention heads); ``base`` carries the user's other settings (text stream, balance)."""
    if world == 1:
        return [ParallelConfig("serial", 1, warmup_steps=warmup)]
    keep = {} if base is None else {"text_stream": base.text_stream, "balance": base.balance}
    out = []
    for m in (world, 2 * world, 4 * world):
        if m <= rows:
            out.append(ParallelConfig("pipefusion", world, patches=m, warmup_steps=warmup, **keep))
    if world <= rows:
        out.append(ParallelConfig("distrifusion", world, warmup_steps=warmup))
    return out + exact_candidates(world, rows, warmup, cfg, heads, cols)


def exact_candidates(world: int, rows: int, warmup: int, cfg: bool, heads: int,
                     cols: int | None = None) -> list[ParallelConfig]:
    """The exact methods and hybrids where the engine has them (config.STRATEGIES): Ulysses when the model has
    at least as many heads as its degree, split evenly or not (alone, or inside each PipeFusion stage or
    DistriFusion band with every degree that leaves at least 2 of them: 2 first, the default), CFG halves
    (alone, or around each other method) on a true-CFG job; none that the image cannot be cut for
    (``ParallelConfig.check_image``)."""
    out = []
    names = [s for s in STRATEGIES if "ulysses" in s or s.startswith("cfg")]
    for s in names:
        if s.startswith("cfg") and not cfg:
            continue
        branch = world // (2 if s.startswith("cfg") else 1)
        inside = "ulysses" in s and s.split("+")[-1] in ("pipefusion", "distrifusion")
        for u in [0] + [d for d in range(3, branch // 2 + 1) if branch % d == 0] if inside else [0]:
            try:
                plan = ParallelConfig(s, world, warmup_steps=warmup, ulysses=u)
                plan.check_image(rows, cols)
            except ValueError:  # not a plan of this many ranks (cfg alone on 4, 2 lanes x 2 stages on 2), image
                continue
            if "ulysses" in s and (not heads or heads < plan.ulysses_degree):
                continue
            out.append(plan)
    return out


def paced(plans: list[ParallelConfig], work: Workload, costs: Costs) -> list[ParallelConfig]:
    """``plans`` and, where the ranks' devices differ (``costs.pace``: ``probe.pace_of``),
    each plain PipeFusion plan again with its stages sized to its devices (``plan.balanced_split`` weighted by
    each rank's pace: a card twice as fast takes about twice the blocks), where that split differs from the
    engine's own."""
    from dataclasses import replace

    from .simulate import stage_sizes

    if not costs.pace:
        return plans
    out = list(plans)
    for cfg in plans:
        if cfg.strategy != "pipefusion" or cfg.stage_split is not None or cfg.stages > len(work.kinds):
            continue
        split = stage_sizes(work, costs, cfg.stages, pace=costs.pace[:cfg.stages])
        if split != stage_sizes(work, costs, cfg.stages):
            out.append(replace(cfg, stage_split=split))
    return out


def predict(cfg: ParallelConfig, work: Workload, costs: Costs) -> Prediction:
    return simulate(cfg.strategy, cfg.world_size, work, costs, patches=cfg.num_patches,
                    text_stream=cfg.text_stream, stage_split=cfg.stage_split, ulysses=cfg.ulysses_degree)


def exact(cfg: ParallelConfig, work: Workload) -> bool:
    """Whether ``cfg`` gives serial's result on ``work``: no stale method in it (serial, cfg, ulysses and their
    hybrids), or every evaluation synchronous (warm-up covering the whole job)."""
    return cfg.patch_method not in ("pipefusion", "distrifusion") or work.warmup_evals >= work.evals


def choose(plans: list[ParallelConfig], work: Workload, costs: Costs, fits=lambda cfg: True) -> Choice:
    """The plan ``auto`` runs: of those that ``fits`` and are predicted within MARGIN of the fastest, the one
    that sends the least, an exact one on a tie, else the earliest. With none fitting, the
    first refusal's error is raised again (``fits`` may raise memory.AdmissionError instead of returning
    False: the one of the plan that needs the least memory is the most useful, and PipeFusion's come first)."""
    if not plans:
        raise ValueError("no plan to choose from: the image has fewer token rows than the group has ranks")
    table, ok_plans, refusal = [], [], None
    for cfg in plans:
        p = predict(cfg, work, costs)
        try:
            ok = bool(fits(cfg))
        except ValueError as exc:  # memory.AdmissionError is a ValueError
            ok, refusal = False, refusal or exc
        table.append((label(cfg), p.wall_s, ok, p.comm_s))
        if ok:
            ok_plans.append((cfg, p))
    if not ok_plans:
        if refusal is not None:
            raise refusal
        raise ValueError("none of the plans fits in memory: " + ", ".join(row[0] for row in table))
    fastest = min(p.wall_s for _, p in ok_plans)
    near = [(cfg, p) for cfg, p in ok_plans if p.wall_s <= fastest * (1 + MARGIN)]
    best = min(near, key=lambda c: (c[1].comm_s, not exact(c[0], work)))  # min keeps the earliest of equals
    return Choice(best[0], best[1], tuple(table))


def workload_of(fam, meta, problem, warmup_steps: int, elem: int) -> Workload:
    """The simulator's view of a job (``job.Problem``) on a model (``meta``: its structure)."""
    from ..job import evaluation_plan
    from ..models import family

    evals, step_of = evaluation_plan(problem.spec, problem.sampling)
    blocks = fam.blocks_of(meta)
    layers = {b.kind: len(fam.kv_buffers(meta, b, lambda kind: kind)) for b in blocks}
    heads, head_dim = family.attention_shape(meta)  # Z-Image names them otherwise
    return Workload(kinds=tuple(b.kind for b in blocks), width=heads * head_dim,
                    rows=problem.rows, cols=problem.cols, n_txt=problem.n_span_txt, evals=evals,
                    warmup_evals=sum(1 for k in range(evals) if step_of(k) < warmup_steps), batch=problem.batch,
                    cfg=problem.cfg, middle=problem.branches == 3, elem=elem, channels=problem.x0.shape[-1],
                    kv_layers=layers, heads=heads)
