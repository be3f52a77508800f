"""Short probes of what the simulator needs: each block kind's compute on this device, and each link.

Blocks: one block of each kind of the model's own structure, filled with synthetic weights (timing does
not depend on the values), runs through the family's patch-wise code (the engine's ``run_blocks``) over a
whole image of three sizes (the job's, half and a quarter of it), swept once untimed to warm up, then a
few times timed; ``t(n) = per_call + per_token (n + n^2 / 6d)`` is fitted to each size's median over the
timed sweeps (``fit``). Every rank of a group probes its own device at once, as the ranks compute when they
run a job (on one machine they share its memory bandwidth and caches: one rank probing alone read up to 30%
faster per token than the group then ran), and the group predicts from the slowest (``slowest``). The group's
result is cached as JSON per model structure, every rank's device, dtype, thread count and torch version
(``cache_path``), so a group pays for the probe once.

Links: a ping-pong with rank 0 (small messages: latency; large ones: bandwidth), then both ways at once
(the collectives' rate), on the data plane; last, the ranks' pace at a collective (the same compute on every
rank in lockstep: ``straggle``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from ..config import SampleSpec
from ..job import synthetic_problem
from ..models import family
from ..patches import full_span
from .runtime import JobRuntime
from .simulate import BlockCost, Costs, Link

log = logging.getLogger("comfy_pipefusion.probe")


def grids_for(rows: int, cols: int) -> tuple[tuple[int, int], ...]:
    """Token rows x cols of the probe images: the job's own size, half and a quarter of it (a size the
    model takes, e.g. within SD3's position table), at least 2 x 2."""
    out = []
    for f in (4, 2, 1):
        g = (max(2, min(rows, -(-rows // f))), max(2, min(cols, -(-cols // f))))
        if g not in out:
            out.append(g)
    return tuple(out)
REPEATS = 2
"""Runs per size in a timed sweep; the fastest counts."""
SWEEPS = 3
"""Timed sweeps over the sizes; each size's time is the median of theirs. A machine's speed wanders over
seconds (a shared CPU's neighbours, clocks): sweeps spread each size's runs over the probe's whole time, so
that one slow or fast moment does not set a size's time, nor all of one."""
SWEEPS_UNTIMED = 1
"""Sweeps run first, untimed: a young process runs its first calls at each size slower (its allocator's heap
grows, its pages fault in; on a GPU, kernels load and autotune)."""


def device_name(device: torch.device) -> str:
    """What a probe cache tells devices apart by: the card's name, or the CPU's core count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}"


def cache_path(cache_dir: Path | None, how: dict, devices: list[str], dtype: torch.dtype,
               threads: int) -> Path | None:
    """The probe cache file of a group: its model structure and probe sizes (``how``), every rank's device
    (``device_name``; their number is how many probed at once), dtype, threads per rank and torch version."""
    if not cache_dir:
        return None
    raw = json.dumps([how, devices, str(dtype), threads, torch.__version__], sort_keys=True, default=str)
    return Path(cache_dir) / f"probe-{hashlib.sha256(raw.encode()).hexdigest()[:16]}.json"


def read_cached(path: Path | None) -> dict | None:
    """A probe cache file's JSON (its "blocks": {kind: BlockCost fields}, "outside": seconds), or None (none
    there, or unreadable: logged, probed again)."""
    if path is None or not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        for v in raw["blocks"].values():
            BlockCost(**v)  # the fields and their signs
        float(raw["outside"])
        return raw
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("probe cache %s unreadable (%s): probing again", path, exc)
        return None


def write_cached(path: Path | None, raw: dict) -> None:
    """Keep a group's probe in ``path``; a folder that cannot be written is logged, not raised (the probe is
    still good for this job, and the next probes again)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(raw))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("probe cache %s not written (%s): the next job of this size probes again", path, exc)


def fit(samples: list[tuple[int, float]], width: int) -> BlockCost:
    """Least squares of t = c + a (n + n^2 / (6 width)) over (n tokens, seconds): the attention term keeps
    its counted share of the FLOPs (4 d per pair against 24 d^2 per token), so that three noisy sizes fit
    two numbers, not three. A negative overhead is dropped and the slope refitted through the origin."""
    ns = torch.tensor([float(n) for n, _ in samples], dtype=torch.float64)
    ts = torch.tensor([t for _, t in samples], dtype=torch.float64)
    work = ns + ns * ns / (6 * width)
    a = torch.stack([torch.ones_like(ns), work], 1)
    c, slope = torch.linalg.lstsq(a, ts[:, None]).solution[:, 0].tolist()
    if c < 0 or slope <= 0:
        c, slope = 0.0, float((work * ts).sum() / (work * work).sum())
    return BlockCost(per_token=slope, per_pair=slope / (6 * width), per_call=c)


def _timed(fn, device: torch.device, timed: bool = True) -> float:
    """The fastest of REPEATS runs of ``fn`` (one, untimed, when not ``timed``: a warm-up)."""
    best = float("inf")
    for _ in range(REPEATS if timed else 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def probe_blocks(fam, config: dict, device: torch.device, dtype: torch.dtype, n_txt: int,
                 grids: tuple[tuple[int, int], ...]) -> tuple[dict[str, BlockCost], float]:
    """({block kind: cost}, seconds per evaluation outside the blocks) on ``device``."""
    model = fam.build_meta(config)
    blocks = fam.blocks_of(model)
    one = {}
    for b in blocks:
        one.setdefault(b.kind, b)
    names = [n for n in (*fam.SHARED_MODULES, *fam.FIRST_MODULES, *fam.LAST_MODULES) if family.holds(model, n)]
    fam.materialize(model, names + [b.prefix for b in one.values()], device, dtype, 0)
    model.eval().requires_grad_(False)
    sizes = []  # per probe size: (tokens, its runtime, span, embedded image), built once for every sweep
    times: dict[tuple, list[float]] = {}  # (kind or "outside", tokens) -> each sweep's fastest run
    with torch.inference_mode():
        for rows, cols in grids:
            spec = SampleSpec(height=rows * 16, width=cols * 16, steps=1, dtype=str(dtype).removeprefix("torch."))
            problem = synthetic_problem(fam, config, spec, n_txt)
            rt = JobRuntime(model, problem, dtype, device, first=True, last=True)
            span = full_span(problem.n_span_txt, problem.n_img)
            sizes.append((problem.n_span_txt + problem.n_img, rt, span, rt.embed_image(rt.x, span, 0)))
        for sweep in range(SWEEPS_UNTIMED + SWEEPS):
            timed = sweep >= SWEEPS_UNTIMED
            for n, rt, span, img in sizes:
                for kind, b in one.items():
                    kvs = rt.kv_buffers([b])
                    t = _timed(lambda: rt.run_blocks([b], kvs, span, rt.span_txt(span), img, 0), device, timed)
                    times.setdefault((kind, n), []).append(t)
                x, n_img = rt.x.clone(), rt.problem.n_img
                t = _timed(lambda: (rt.embed_image(x, span, 0), rt.update(0, 0, n_img, img)), device, timed)
                times.setdefault(("outside", n), []).append(t / n_img)
    typical = {key: statistics.median(ts[SWEEPS_UNTIMED:]) for key, ts in times.items()}
    samples = {kind: [(n, t) for (k, n), t in typical.items() if k == kind] for kind in one}
    outside = [t for (k, _), t in typical.items() if k == "outside"]
    heads, head_dim = family.attention_shape(model)
    return {k: fit(v, heads * head_dim) for k, v in samples.items()}, min(outside)


PACE_SPREAD = 1.15
"""How much slower the slowest rank's device must be than the fastest's before the group predicts each
PipeFusion stage at its own device's pace and auto also considers stages sized to the devices
(``planner.paced``); below it every rank keeps the slowest's (ranks of one machine read a few % apart)."""


def slowest(readings: list[tuple[dict[str, BlockCost], float]], n: int) -> tuple[dict[str, BlockCost], float,
                                                                               dict[str, int]]:
    """The group's pace from each rank's reading (its block costs, seconds per token outside the blocks): per
    block kind, the costs of the rank slowest at ``n`` tokens (the job's sequence), since the ranks of every
    parallel plan meet at least once an evaluation and wait for the last; outside, the slowest too. Returns
    (block costs, outside, {kind: the rank whose costs they are})."""
    kinds = readings[0][0]
    if any(r.keys() != kinds.keys() for r, _ in readings):
        raise ValueError(f"the ranks probed different block kinds: {[sorted(r) for r, _ in readings]}")
    who = {k: max(range(len(readings)), key=lambda i: (readings[i][0][k].time(n, n), -i)) for k in kinds}
    return {k: readings[i][0][k] for k, i in who.items()}, max(o for _, o in readings), who


def pace_of(probed: dict, kinds, n: int) -> tuple[float, ...]:
    """``Costs.pace`` of a group from its probe (``probed["ranks"]``: every rank's reading, ``{"blocks":
    {kind: BlockCost fields}, ...}``): each rank's time for the blocks ``kinds`` (one entry per block) at ``n``
    tokens as a fraction of the group's (``slowest``'s per kind), where the slowest rank is PACE_SPREAD
    slower than the fastest; else (or without the readings: a cache from before them) empty, every rank at
    the slowest's pace."""
    if not probed.get("ranks") or not kinds:
        return ()
    costs = [{k: BlockCost(**v) for k, v in r["blocks"].items()} for r in probed["ranks"]]
    group = sum(max(c[k].time(n, n) for c in costs) for k in kinds)
    pace = tuple(sum(c[k].time(n, n) for k in kinds) / group for c in costs)
    return pace if max(pace) >= PACE_SPREAD * min(pace) else ()


def _ping_pong(comm, peer: int, nbytes: int, rounds: int) -> float:
    """The fastest of ``rounds`` one-way times of ``nbytes`` between rank 0 and ``peer`` (half a round trip)."""
    buf = torch.zeros(nbytes, dtype=torch.uint8, device=comm.device)
    best = float("inf")
    for _ in range(rounds):
        comm.barrier()
        start = time.perf_counter()
        if comm.rank == 0:
            comm.isend(buf, peer).wait()
            comm.irecv(buf, peer).wait()
        elif comm.rank == peer:
            comm.irecv(buf, 0).wait()
            comm.isend(buf, 0).wait()
        best = min(best, (time.perf_counter() - start) / 2)
    return best


def _gather_train(comm, nbytes: int, count: int, trains: int = 2) -> tuple[float, float]:
    """``count`` all-gathers of ``nbytes`` per rank issued at once and waited for together, as DistriFusion
    issues its layers' gathers while it computes (each rank sends ``nbytes`` and receives as many at every
    step of its ring: both directions of every link are loaded); the fastest of ``trains`` trains. Returns
    its seconds per gather step and the process's CPU seconds (every thread, user and system) per byte it sent
    or received."""
    mine = torch.zeros((1, nbytes), dtype=torch.uint8, device=comm.device)
    outs = [torch.empty((comm.world_size, nbytes), dtype=torch.uint8, device=comm.device) for _ in range(count)]
    comm.all_gather_into(outs[0], mine)  # untimed: the transport's buffers and connections set up
    best, cpu = float("inf"), []
    for _ in range(trains):
        comm.barrier()
        start, used = time.perf_counter(), time.process_time()
        for pending in [comm.all_gather_into(out, mine, async_op=True) for out in outs]:
            pending.wait()
        best = min(best, time.perf_counter() - start)
        cpu.append(time.process_time() - used)
    steps = comm.world_size - 1
    return best / (count * steps), statistics.median(cpu) / (2 * count * steps * nbytes)


def _exchange_train(comm, nbytes: int, count: int, trains: int = 2) -> float:
    """``count`` all-to-alls of ``nbytes`` to every peer, each waited for before the next (Ulysses' pattern);
    the fastest of ``trains`` trains' seconds per message each way."""
    send = torch.zeros((comm.world_size, nbytes), dtype=torch.uint8, device=comm.device)
    recv = torch.empty_like(send)
    comm.all_to_all(recv, send)  # untimed
    best = float("inf")
    for _ in range(trains):
        comm.barrier()
        start = time.perf_counter()
        for _ in range(count):
            comm.all_to_all(recv, send)
        best = min(best, time.perf_counter() - start)
    return best / (count * (comm.world_size - 1))


def _lockstep(comm, rounds: int = 16, segment: float = 0.02) -> float:
    """The group's ``straggle``: every rank runs the same compute (matmuls, ``segment`` seconds on rank 0),
    then a one-number all-reduce, ``rounds`` times; the mean over rounds of the slowest rank's compute over the
    ranks' mean, less 1 (0 where they keep pace; a rank of a slower card shows as a lasting excess)."""
    a = torch.ones((256, 512), device=comm.device)
    b = torch.ones((512, 512), device=comm.device)

    def work(reps: int) -> float:
        if comm.device.type == "cuda":
            torch.cuda.synchronize(comm.device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        if comm.device.type == "cuda":
            torch.cuda.synchronize(comm.device)
        return time.perf_counter() - start

    work(4)  # untimed: the kernels and the allocator's first blocks
    one = min(work(4) for _ in range(3)) / 4
    reps = comm.broadcast_object(max(1, min(100_000, round(segment / max(one, 1e-9)))))
    beat = torch.zeros(1, device=comm.device)
    mine = []
    comm.barrier()
    for _ in range(rounds):
        mine.append(work(reps))
        comm.all_reduce(beat)
    every = comm.gather_object(mine)
    return statistics.mean(max(col) / statistics.mean(col) - 1 for col in zip(*every))


def probe_link(comm, small: int = 16, large: int = 1 << 20, rounds: int = 5, long_s: float = 0.05,
               most: int = 64 << 20, train: int = 8) -> Link:
    """The slowest link from rank 0 to another rank: a ping-pong of ``small`` bytes (latency), then of
    ``large`` bytes, four times larger while one takes less than ``long_s`` (up to ``most``; rank 0 decides
    for both): a shaped link lets a burst through at the wire's speed (tbf: a few ms' worth), which a 1 MiB
    message mostly is at 1 Gbit/s, and the bandwidth would read nearly twice the rate. Then, every link loaded
    both ways at once, as the collectives load it: ``train`` all-gathers of that size in flight together
    (``duplex``), with the CPU time the transport took per byte on a CPU device (``cpu_per_byte``), and
    ``train`` all-to-alls one after the other (``exchange``); both at most ``most`` bytes in all. Last, the
    ranks' pace at a collective (``straggle``, ``_lockstep``).
    Every rank calls it (rank 0 talks to each other rank in turn). One rank: a free link."""
    if comm.world_size == 1:
        return Link(bandwidth=1e12, latency=0.0)
    worst = (0.0, 0.0)
    for peer in range(1, comm.world_size):
        latency = _ping_pong(comm, peer, small, rounds)
        size = large
        while True:
            took = _ping_pong(comm, peer, size, rounds)
            if not comm.broadcast_object(took < long_s and size * 4 <= most):
                break
            size *= 4
        per_byte = max(took - latency, 1e-12) / (size - small)
        if latency + large * per_byte > worst[0] + large * worst[1]:
            worst = (latency, per_byte)
    # both ways: at least the one-way time per byte (a faster reading is the probe's own noise)
    size = max(small, min(size, most // (comm.world_size * train)))
    step, cpu = _gather_train(comm, size, train)
    duplex = max(worst[1], (step - worst[0]) / size)
    exchange = max(worst[1], (_exchange_train(comm, size, train) - worst[0]) / size)
    if comm.device.type != "cpu":
        cpu = 0.0  # NCCL moves the bytes with the GPU's own engines; the host's CPU time is not compute's
    straggle = _lockstep(comm)
    got = comm.broadcast_object([worst[0], worst[1], duplex, exchange, cpu, straggle])  # rank 0's, on every rank
    return Link(bandwidth=1.0 / got[1], latency=got[0], duplex=1.0 / got[2], exchange=1.0 / got[3],
                cpu_per_byte=got[4], straggle=got[5])


def machine_costs(blocks: dict[str, BlockCost], outside_per_token: float, link: Link, n_img: int,
                  pace: tuple[float, ...] = ()) -> Costs:
    return Costs(blocks=blocks, link=link, per_eval=outside_per_token * n_img, pace=pace)
