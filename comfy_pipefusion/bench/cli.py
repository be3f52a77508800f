"""Benchmark: the strategies side by side on one model, seed, size and step count.

    python -m comfy_pipefusion.bench --preset small --json bench.json
    python -m comfy_pipefusion.bench --checkpoint flux1-dev.safetensors --height 1024 --width 1024 --steps 28
    python -m comfy_pipefusion.bench --preset mid --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT  # per machine

Serial runs in a process of its own with 1 thread, the parallel strategies in one torchrun group of
--world-size ranks, one after another. Both start together, so their imports overlap, but the timed runs
are taken in turns (turns.py): a serial run, one strategy's --repeats runs (the first time, after
--warmup-runs untimed ones), a serial run, the next strategy's runs, ..., a serial run, each turn with the
machine to itself (the other process sleeps; no rank waits in a collective); --rounds R takes that sequence
R times over (the group probing afresh each round), so on a machine whose speed drifts over minutes every
strategy has runs from every stretch of it. wall_s is the median of a job's runs over all rounds
(wall_s_min is also written), predicted_s the median of its rounds' predictions; a strategy's speedup is
against the serial runs around its turns, so a drifting machine compares like with like. Errors are measured
against serial on the returned LATENT; bytes sent are counted per rank and compared with the analytic formulas
of parallel/costs.py; wait_s_per_rank is each rank's time waiting for the others' data, transfer_s_per_rank its
time sending its own. --timeline PNG draws each job's last run from the ranks' own timings (timeline.py).
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import threading
from dataclasses import replace
from pathlib import Path


from .. import memory
from ..config import STRATEGIES, TEXT_STREAMS, ParallelConfig, SampleSpec
from ..job import evaluation_plan, sampling_kind
from ..jobspec import Job
from ..models import family
from ..oneshot import end_children, owned_tempdir, run_jobs
from ..parallel.costs import expected_bytes
from ..parallel.plan import ModelSource, stage_layers
from ..sampling.samplers import load_samplers
from ..peers import PEERS
from .turns import TurnAborted, conduct
from ..linkns import LINKS
from ..multinode import Nodes
from .machines import nodes_of, run_other_node
from .timing import combine, pool

ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m comfy_pipefusion.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None,
                    help="a built-in model with random weights (default: small): "
                         + ", ".join(n for f in family.FAMILIES for n in family.get(f).PRESETS))
    ap.add_argument("--checkpoint", default=None, help="a checkpoint file instead of a preset (any supported "
                    "family and layout; text conditioning is synthetic)")
    ap.add_argument("--text-tokens", type=int, default=None, help="text tokens (default: the preset's, or 256)")
    ap.add_argument("--strategies", default="serial,pipefusion,distrifusion,naive_patch",
                    help=f"comma-separated, of: {', '.join(STRATEGIES)}")
    ap.add_argument("--cfg", type=float, default=1.0,
                    help="guidance scale of the job: != 1 is true CFG, with a negative conditioning (needed by "
                         "the cfg strategies)")
    ap.add_argument("--peers", default="", help=f"other tools' methods run by the group in the same turns, "
                                                f"comma-separated: {', '.join(PEERS)}")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--patches", default="0",
                    help="PipeFusion's M (default 0: world size); a comma-separated list runs one job per M")
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="default: the preset's")
    ap.add_argument("--height", type=int, default=None, help="default: the preset's")
    ap.add_argument("--width", type=int, default=None, help="default: the preset's")
    ap.add_argument("--sampler", default="euler", help="a ComfyUI sampler name (see config.SAMPLERS)")
    # tests and tools/gpu_check.py only: a Python file of test samplers --sampler may name (samplers.load_samplers)
    ap.add_argument("--test-samplers", help=argparse.SUPPRESS)
    ap.add_argument("--scheduler", default="simple", help="a ComfyUI scheduler name (see config.SCHEDULERS)")
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-streams", default="last_patch",
                    help=f"PipeFusion text schemes to run, comma-separated: {', '.join(TEXT_STREAMS)}")
    ap.add_argument("--balance", default="compute", choices=("compute", "memory"))
    ap.add_argument("--repeats", type=int, default=3, help="runs of a job per turn (default 3)")
    ap.add_argument("--warmup-runs", type=int, default=1,
                    help="untimed runs of each plan before its first timed run (default 1: a process's first "
                         "run of a plan was up to 40%% slower than its next ones here)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="take every job's turn this many times over, in order (default 1): on a noisy machine, "
                         "e.g. --rounds 3 --repeats 1 compares the strategies better than --repeats 3")
    ap.add_argument("--dtype", default="float32", choices=sorted(ELEM))
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--link", default=None, choices=sorted(LINKS),
                    help="run the group across two network namespaces joined by a link shaped to this speed "
                         "(half the ranks on each side; root only: see linkns.py)")
    ap.add_argument("--nnodes", type=int, default=1,
                    help="machines the group spans, with torchrun's c10d rendezvous: run the same command on each, "
                         "only --node-rank differs (see README, Two machines)")
    ap.add_argument("--node-rank", type=int, default=0,
                    help="this machine's: 0 hosts the rendezvous, runs serial, takes the turns and writes the report")
    ap.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                    help="with --nnodes > 1: node rank 0's address and a free port on it, the same on every machine")
    ap.add_argument("--rdzv-id", default="pipefusion-bench", help="the rendezvous' name, the same on every machine")
    ap.add_argument("--local-addr", default=None,
                    help="this machine's address toward the others (default: the source of the route to the endpoint)")
    ap.add_argument("--rdzv-timeout", type=float, default=600.0,
                    help="seconds to wait for the other machines to join (default 600)")
    ap.add_argument("--no-predict", dest="predict", action="store_false",
                    help="skip the simulator's prediction beside each measured time (its probes take seconds)")
    ap.add_argument("--timeline", default=None, metavar="PNG",
                    help="draw each job's last run here: per rank, each item's compute and waiting (timeline.py)")
    return ap.parse_args(argv)


def model_of(args) -> tuple[dict, object, dict, dict]:
    """(worker model source, family, config, defaults) for --preset / --checkpoint."""
    if args.preset and args.checkpoint:
        raise ValueError("give either --preset or --checkpoint, not both")
    if args.checkpoint:
        source = {"checkpoint": args.checkpoint, "seed": args.seed}
        defaults = dict(height=512, width=512, steps=8, text_tokens=256)
    else:
        source = {"preset": args.preset or "small", "seed": args.seed}
        defaults = family.find_preset(source["preset"])[1]
    fam, config = ModelSource(**source).describe()
    if args.text_tokens:
        defaults = {**defaults, "text_tokens": args.text_tokens}
    return source, fam, config, defaults


def plan_jobs(args) -> tuple[SampleSpec, list[Job], list[Job]]:
    """Validate everything before any process starts; returns (spec, serial jobs, parallel jobs)."""
    source, fam, config, preset = model_of(args)
    spec = SampleSpec(height=args.height or preset["height"], width=args.width or preset["width"],
                      steps=args.steps or preset["steps"], seed=args.seed, dtype=args.dtype,
                      sampler=(load_samplers(args.test_samplers) or {}).get(args.sampler, args.sampler),
                      scheduler=args.scheduler, cfg=args.cfg)
    if args.rounds < 1 or args.repeats < 1 or args.warmup_runs < 0:
        raise ValueError(f"--rounds and --repeats must be >= 1 and --warmup-runs >= 0, got {args.rounds}, "
                         f"{args.repeats} and {args.warmup_runs}")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r} in --strategies: choose from {', '.join(STRATEGIES)}")
    streams = [s.strip() for s in args.text_streams.split(",") if s.strip()]
    try:
        patches = [int(m) for m in str(args.patches).split(",") if m.strip()] or [0]
    except ValueError:
        raise ValueError(f"--patches takes whole numbers separated by commas, got {args.patches!r}") from None
    peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    for s in peers:
        if s not in PEERS:
            raise ValueError(f"unknown peer {s!r} in --peers: choose from {', '.join(PEERS)}")
    num_blocks = family.num_blocks(config)  # without building the model
    heads = config.get("num_attention_heads")
    # a test sampler's class travels by its name and is resolved again by the workers (Job.to_wire)
    extra = {"model": ModelSource(**source), "sample": spec, "repeats": args.repeats, "warmup_runs": args.warmup_runs,
             "text_tokens": preset["text_tokens"], "predict": args.predict}  # predict: the simulator's time
    serial = [Job(parallel=ParallelConfig("serial", 1), name="serial", **extra)]
    par = []
    for s in strategies:
        if s == "serial":
            continue
        if s == "auto":  # the group picks the plan per job (parallel/planner.py), with this warm-up
            par.append(Job(parallel=ParallelConfig("auto", args.world_size, warmup_steps=args.warmup_steps,
                                                   text_stream=streams[0], balance=args.balance),
                           name="auto", **extra))
            continue
        pf = s == "pipefusion"
        for stream, m in [(t, m) for t in streams for m in patches] if pf else [("last_patch", 0)]:
            cfg = ParallelConfig(s, args.world_size, patches=m, warmup_steps=args.warmup_steps,
                                 text_stream=stream, balance=args.balance)
            cfg.check_model(num_blocks, heads)
            cfg.check_image(spec.token_rows, spec.token_cols)
            cfg.check_job(spec.cfg)
            name = s + (f"-{stream}" if pf and len(streams) > 1 else "") + \
                (f"-M{m}" if pf and len(patches) > 1 else "")
            par.append(Job(parallel=cfg, name=name, **extra))
    for peer in peers:  # the whole model on every rank, as our ulysses
        cfg = ParallelConfig("ulysses", args.world_size, warmup_steps=args.warmup_steps)
        cfg.check_model(num_blocks, heads)
        par.append(Job(parallel=cfg, name=peer, peer=peer, **extra))
    admit(args, fam, config, spec, serial, par)
    return spec, serial, par


def ref_tokens(preset: dict, patched: bool = False) -> int:
    """Tokens of a preset's reference latents (Kontext, Flux.2): they ride with the text stream. A ``patched``
    latent (Flux.2's, ``LatentFormat.patched``) holds one token per latent pixel, the others one per 2x2."""
    if patched:
        return sum(h * w for h, w in preset.get("references", ()))
    return sum(((h + 1) // 2) * ((w + 1) // 2) for h, w in preset.get("references", ()))


def admit(args, fam, config: dict, spec: SampleSpec, serial: list[Job], par: list[Job]) -> None:
    """Refuse, before any process starts, a benchmark whose serial process and group cannot both fit in
    this machine's RAM (they run side by side; the group holds one job's memory at a time)."""
    meta = fam.build_meta(config)
    n_ref = ref_tokens(model_of(args)[3], fam.latent_format(config).patched)
    txt_dim = fam.conditioning_dims(config)[0]
    size = memory.JobSize(spec.token_rows, spec.token_cols, serial[0].text_tokens, txt_dim, dtype=spec.dtype,
                          channels=4 * fam.latent_format(config).channels, cfg=abs(spec.cfg - 1) > 1e-9, n_ref=n_ref)
    fp8 = memory.stored_fp8(args.checkpoint)
    ram = memory.available_ram()
    first = memory.admit(fam, meta, ParallelConfig("serial", 1), size, memory.Budget("cpu", (ram,)), fp8)
    left = max(0, ram - memory.CPU_PROCESS_BYTES - first[0].total) if par else ram
    for job in par:
        if job.parallel.strategy == "auto":  # checked per plan in the group, before it loads
            continue
        try:
            memory.admit(fam, meta, job.parallel, size, memory.Budget("cpu", (left,)), fp8)
        except memory.AdmissionError as exc:
            raise memory.AdmissionError(f"{exc} (beside the serial process, which needs "
                                        f"{memory.gib(first[0].total + memory.CPU_PROCESS_BYTES)})") from None


def summarise(args, spec, serial, results) -> dict:
    source, fam, cfg_model, preset = model_of(args)
    layers = serial[1]["attention_layers"]  # counted by the worker, which has the model's structure
    width = serial[1]["width"]
    # as the sequence holds them (Z-Image pads), with a preset's reference tokens (Kontext) after the text
    refs = ref_tokens(preset, fam.latent_format(cfg_model).patched) if fam.JOINT_TEXT else 0
    n_txt = family.sequence_text(fam, preset["text_tokens"], refs)
    ref, ref_m = serial
    evals, step_of = evaluation_plan(spec, sampling_kind(fam, cfg_model))
    meta = fam.build_meta(cfg_model)
    heads = family.attention_shape(meta)[0]
    rows = []
    jobs = len(results) - 1
    for k, (name, (x, m), job) in enumerate(results):
        # the serial runs taken just before and after this job's turns (all of them for the serial row)
        beside = sorted({r * jobs + k + d for r in range(args.rounds) for d in (-1, 0)}) if k else []
        beside = [ref_m["wall_s_runs"][i] for i in beside] if k else ref_m["wall_s_runs"]
        cfg = job.parallel
        if cfg.strategy == "auto":  # what the group chose
            pf = m["plan"]["strategy"].endswith("pipefusion")
            cfg = ParallelConfig(m["plan"]["strategy"], cfg.world_size, warmup_steps=m["plan"]["warmup_steps"],
                                 patches=m["plan"]["patches"] if pf else 0, ulysses=m["plan"].get("ulysses", 0),
                                 stage_split=tuple(m["plan"]["stage_split"]) if m["plan"].get("stage_split") else None)
        n = cfg.world_size
        err = (x - ref).float()
        dims = dict(world=n, batch=spec.branches, images=1, width=width,
                    n_txt=n_txt, rows=spec.token_rows, cols=spec.token_cols, steps=evals,
                    warmup=sum(1 for k in range(evals) if step_of(k) < cfg.warmup_steps),
                    patches=cfg.num_patches, elem=ELEM[spec.dtype],
                    layers=layers["joint"], image_layers=layers["image"], text_stream=cfg.text_stream,
                    channels=4 * fam.latent_format(cfg_model).channels, ulysses=cfg.ulysses_degree, heads=heads,
                    stage_layers=stage_layers(fam, meta, cfg.branch())
                    if "ulysses+pipefusion" in cfg.strategy else None)
        rows.append({"strategy": job.peer or cfg.strategy, "name": name, "text_stream": cfg.text_stream,
                     "world_size": n, "patches": cfg.num_patches, "warmup_steps": cfg.warmup_steps,
                     "ulysses_degree": cfg.ulysses_degree if "ulysses" in cfg.strategy else 0,
                     "stage_split": cfg.stage_split,
                     "threads_per_rank": args.threads_per_rank,
                     "wall_s": m["wall_s_median"], "wall_s_min": m["wall_s_min"], "wall_s_runs": m["wall_s_runs"],
                     "run_spans": m["run_spans"], "warmup_spans": m["warmup_spans"],
                     "speedup_vs_serial": statistics.median(beside) / m["wall_s_median"],
                     "speedup_vs_serial_min": min(beside) / m["wall_s_min"],
                     "serial_wall_s_beside": beside,
                     "max_abs_err_vs_serial": float(err.abs().max()),
                     "rel_l2_err_vs_serial": float(err.norm() / ref.float().norm()),
                     "param_bytes_per_rank": m["param_bytes_per_rank"],
                     "bytes_sent_per_step_per_rank": [b / spec.steps for b in m["bytes_sent_per_rank"]],
                     "wait_s_per_rank": m["wait_s_per_rank"],
                     "transfer_s_per_rank": m["transfer_s_per_rank"],
                     "timeline": m["timeline"], "plan": m["plan"]["plan"],
                     "predicted_s": m["plan"]["predicted_s"], "auto": m["plan"]["auto"],
                     "probed_link": m["plan"]["link"],
                     "probes": m["plan"].get("probes"),  # the prediction's inputs (bench/repredict.py)
                     "rounds": m["plan"].get("rounds"),  # --rounds > 1: each round's plan, times and probes
                     "expected_bytes_per_step_per_rank": None if job.peer else [  # a peer's traffic is its own
                         expected_bytes(cfg.strategy, rank=r, **dims) / spec.steps for r in range(n)]})
    name = source.get("preset") or source["checkpoint"]
    return {"model": {"name": f"{fam.NAME}-{name}" if "preset" in source else name, "family": fam.NAME,
                      "params": ref_m["params"]}, "steps": spec.steps, "evaluations": evals,
            "sampler": args.sampler, "scheduler": spec.scheduler, "cfg": spec.cfg, "dtype": spec.dtype,
            "height": spec.height, "width": spec.width, "seed": spec.seed,
            "timing": "median of repeats" + (f" over {args.rounds} rounds" if args.rounds > 1 else ""),
            "timing_note": "serial and the parallel strategies timed in turns (serial, one strategy's "
                           "runs, serial, the next's, ..., serial; --rounds times over); a strategy's speedup "
                           "is against the serial runs around its turns (median/median; speedup_vs_serial_min: "
                           "min/min)",
            "repeats": args.repeats, "rounds": args.rounds, "warmup_runs": args.warmup_runs, "results": rows}


def run_side_by_side(args, source: dict, serial_jobs: list[Job], par_jobs: list[Job], link=None,
                     nodes: Nodes | None = None):
    """Serial in a process of its own (1 thread) and the parallel jobs in one group, started together so
    their start-ups overlap, then timed in turns (turns.py): a serial run, a parallel job's --repeats runs,
    a serial run, the next job's runs, ..., a serial run, all that --rounds times over (a serial run between
    rounds, not two). Nothing is ever timed beside another process's work, and each parallel job is compared
    with the serial runs around its turns, taken in the state the machine was in then. With ``nodes`` the group
    spans machines (this one is node rank 0): serial and the turns stay on this machine. Returns (serial result
    with every serial run, {name: result}, turn spans)."""
    test_args = ["--test-samplers", args.test_samplers] if args.test_samplers else []
    if not par_jobs:
        return run_jobs(None, args.seed, [j.to_wire() for j in serial_jobs], world_size=1, threads=1, model=source,
                        worker_args=test_args, rounds=args.rounds)["serial"], {}, []
    turns = len(par_jobs) * args.rounds
    # one serial job per turn, probed again at each of the group's rounds (its first turn of each; the last round
    # has the closing turn too): serial's prediction follows the machine's drift as the group's does
    serial_jobs = [replace(serial_jobs[0], name=f"serial-{i}", repeats=1) for i in range(turns + 1)]
    starts = [len(par_jobs) * r for r in range(args.rounds)]
    order = ["serial", "group"] * turns + ["serial"]
    with owned_tempdir("pipefusion-bench-") as tmp:
        results: dict = {}

        def start(tag: str, jobs: list[Job], world_size: int, threads: int) -> threading.Thread:
            def body() -> None:
                try:
                    wires = [j.to_wire() for j in jobs]
                    results[tag] = run_jobs(None, args.seed, wires, world_size=world_size, threads=threads,
                                            link=link if tag == "group" else None, model=source,
                                            rounds=args.rounds if tag == "group" else 1,
                                            probe_at=starts[1:] if tag == "serial" else None,
                                            nodes=nodes if tag == "group" else None,
                                            worker_args=["--turns", tmp, "--turn-tag", tag, "--probe-dir",
                                                         str(Path(tmp) / "probes"), *test_args])
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    results[tag] = exc

            thread = threading.Thread(target=body, name=f"pipefusion-bench-{tag}")
            thread.start()
            return thread

        threads = {"serial": start("serial", serial_jobs, 1, 1),
                   "group": start("group", par_jobs, args.world_size, args.threads_per_rank)}
        aborted = None
        try:
            here = args.world_size // (nodes.nnodes if nodes else 1)  # the group's ranks on this machine
            spans = conduct(Path(tmp), order, {"serial": 1, "group": here},
                            alive=lambda tag: threads[tag].is_alive())
        except TurnAborted as exc:
            aborted = exc
        for t in threads.values():
            t.join()
        failed = [r for r in results.values() if isinstance(r, BaseException)]
        if failed or aborted:  # the process that failed says why better than the conductor can
            raise (failed[0] if failed else aborted) from None
        runs = [results["serial"][j.name] for j in serial_jobs]
        # the serial turns between two probes as one round of the serial row (its prediction their median)
        rounds = [pool([m for _, m in runs[a:b]]) for a, b in zip(starts, [*starts[1:], len(runs)])]
        return (runs[0][0], combine(rounds)), results["group"], spans


def print_table(report: dict) -> None:
    print(f"model {report['model']['name']} ({report['model']['params'] / 1e6:.1f}M params), "
          f"{report['width']}x{report['height']}, {report['steps']} steps, wall = {report['timing']}")
    head = f"{'strategy':<26}{'N':>3}{'M':>4}{'W':>3}{'wall_s':>9}{'pred_s':>9}{'speedup':>9}{'max_abs':>10}{'rel_l2':>10}" \
           f"{'MB/rank (max)':>15}{'KB sent/step/rank (max)':>25}"
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        pred = f"{r['predicted_s']:>9.3f}" if r.get("predicted_s") is not None else f"{'-':>9}"
        print(f"{r['name']:<26}{r['world_size']:>3}{r['patches']:>4}{r['warmup_steps']:>3}{r['wall_s']:>9.3f}{pred}"
              f"{r['speedup_vs_serial']:>8.2f}x{r['max_abs_err_vs_serial']:>10.2e}{r['rel_l2_err_vs_serial']:>10.2e}"
              f"{max(r['param_bytes_per_rank']) / 2**20:>15.1f}{max(r['bytes_sent_per_step_per_rank']) / 1024:>25.1f}")


def _end_with_signal(signum, frame) -> None:
    """SIGTERM/SIGINT: end every process the bench started, then unwind (its temp directories go)."""
    end_children()
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _end_with_signal)
    args = parse_args(argv)
    try:
        spec, serial_jobs, par_jobs = plan_jobs(args)
        nodes = nodes_of(args)
        if nodes is not None and not par_jobs:
            raise ValueError("--nnodes > 1 needs a parallel strategy in --strategies (serial runs on one machine)")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source = model_of(args)[0]
    if nodes is not None and nodes.node_rank != 0:
        return run_other_node(args, source, par_jobs, nodes)
    link = None
    if args.link:
        from .. import linkns

        try:
            linkns.sweep()
            link = linkns.make(args.link)
        except (linkns.LinkUnavailable, ValueError) as exc:
            print(f"error: --link {args.link}: {exc}", file=sys.stderr)
            return 2
    try:
        serial, out, spans = run_side_by_side(args, source, serial_jobs, par_jobs, link, nodes)
    finally:
        if link is not None:
            link.close()
    results = [("serial", serial, serial_jobs[0])] + [(j.name, out[j.name], j) for j in par_jobs]
    report = summarise(args, spec, serial, results)
    report["turns"] = spans
    report["link"] = None if link is None else {"speed": link.speed, "bits_per_s": link.bits_per_s,
                                                "latency_s": link.latency_s, "qdisc": link.qdisc}
    report["nodes"] = None if nodes is None else {
        "nnodes": nodes.nnodes, "node_rank": 0, "rdzv_endpoint": nodes.endpoint, "address": nodes.address(),
        "group_ranks_here": out[par_jobs[0].name][1].get("group_ranks_here")}  # c10d's numbering
    print_table(report)
    if args.timeline:
        from ..timeline import render

        render([(f"{r['name']}: {r['world_size']} rank(s), M={r['patches']}, warm-up {r['warmup_steps']}, "
                 f"{r['wall_s_runs'][-1]:.2f} s", r["timeline"]) for r in report["results"]], args.timeline,
               f"{report['model']['name']}, {report['width']}x{report['height']}, {report['steps']} steps: "
               "each rank's last run, from its own timings")
        print(f"timeline: {Path(args.timeline).resolve()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {args.json}")
    return 0
