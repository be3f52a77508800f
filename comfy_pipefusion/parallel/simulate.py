"""A simulator of parallel plans: the predicted wall time of one job under each strategy.

Inputs are measured or assumed costs, never a run of the model:

- ``BlockCost`` per block kind: seconds per query token (the linear layers), per query x context token
  pair (attention), and per call (launch and Python overhead). A span of ``nq`` query tokens attending
  over ``nctx`` tokens costs ``per_call + nq * (per_token + per_pair * nctx)`` per image of the model batch.
- ``Link``: bandwidth (bytes/s) and latency (s) of the link between two ranks; a link carries one message
  at a time in each direction, and sends overlap compute (receives are posted ahead in the engine). The
  collectives (all-gather, all-to-all) load both directions at once, at the link's ``duplex`` rate (Ulysses'
  trains of all-to-alls, each waited for before the next, at its ``exchange`` rate). On a CPU rank the
  transport's own work (``cpu_per_byte``) is lost from the compute it overlaps. At a collective every rank
  waits for the slowest (``straggle``).

What is simulated (see parallel/pipefusion.py and distrifusion.py for the schedules themselves):

- ``serial``: every evaluation runs every block over the whole sequence.
- ``pipefusion``: an event simulation of the ring. Items are the engine's own schedule (schedule.py): the
  warm-up evaluations one whole-image item each, the rest M bands each. Stage s starts an item when it
  is free and the item has arrived: from s - 1 (its activations, one hop) or, on stage 0, the same band's
  new latent from the last stage (the ring). Warm-up, fill and drain fall out of the schedule.
- ``distrifusion``: each rank computes its band over the whole context; at each attention layer its K/V
  band goes to every other rank (a ring all-gather: N - 1 hops). Warm-up evaluations wait for every
  gather; the others overlap the gather with the next evaluation's compute.
- ``naive_patch``: each rank its band alone; no exchange but the final latent.
- ``ulysses``: each rank computes 1/N of the tokens through the linear layers and 1/N of the heads over
  the whole sequence (where N does not divide the heads, the largest share, ceil(H / N), paces, and the
  exchange's chunks are padded to it); every attention layer waits for two all-to-alls (q, k, v out; the
  outputs back).
- ``ulysses+pipefusion``, ``ulysses+distrifusion``: the patch method on N / u stages (bands), each item
  run by u lanes as Ulysses runs it (1/u of the tokens, 1/u of the heads over the context, two
  all-to-alls per attention layer over the lanes); each lane sends its part on its own link.
- ``cfg`` and ``cfg+X``: the positive and negative branches on two halves, each running X (serial on one
  rank) on half the model batch; each evaluation the halves swap their outputs (latent-sized) once.

Everything here is pure arithmetic on frozen values: no torch, no process group.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..patches import displaced_spans, full_span, pipefusion_spans, split_even
from .schedule import make_schedule

SIMULATED = ("serial", "pipefusion", "distrifusion", "naive_patch", "ulysses", "ulysses+pipefusion",
             "ulysses+distrifusion", "cfg", "cfg+X")


@dataclass(frozen=True)
class BlockCost:
    """Compute time of one block kind on one device, per image of the model batch."""

    per_token: float
    """Seconds per query token (the block's linear layers, norms, MLP)."""
    per_pair: float = 0.0
    """Seconds per (query token, context token) pair: attention scores and their weighted sum."""
    per_call: float = 0.0
    """Seconds per call, whatever its size (kernel launches, Python)."""

    def __post_init__(self) -> None:
        if min(self.per_token, self.per_pair, self.per_call) < 0:
            raise ValueError(f"block costs must be >= 0, got per_token {self.per_token}, per_pair "
                             f"{self.per_pair}, per_call {self.per_call}")

    def time(self, nq: int, nctx: int, batch: int = 1) -> float:
        return self.per_call + batch * nq * (self.per_token + self.per_pair * nctx)


@dataclass(frozen=True)
class Link:
    """One link between two ranks (both directions alike, each direction one message at a time)."""

    bandwidth: float
    """Bytes per second."""
    latency: float = 0.0
    """Seconds from a send's start to its first byte's arrival."""
    duplex: float = 0.0
    """Bytes per second each way while both directions carry a message at once, as in a collective (each rank
    sends and receives); 0: ``bandwidth``. A shaped or shared link gives less than one way alone (TCP's
    acknowledgements queue behind the other direction's data)."""
    exchange: float = 0.0
    """Bytes per second each way in a train of synchronous exchanges, each waited for before the next starts
    (Ulysses' all-to-alls, two per attention layer); 0: ``duplex``. Over a link with a deep queue such a train
    gets less than a lone collective: the directions take turns rather than overlap (measured over a tbf-shaped
    100 Mbit/s veth: 6.6 MB/s each way against 12 for a lone all-gather)."""
    cpu_per_byte: float = 0.0
    """Seconds of the rank's compute lost per byte it sends or receives while computing: a CPU rank's transport
    (gloo's threads, the kernel's TCP) runs on the cores that compute; 0 where it does not (NCCL on a GPU)."""
    straggle: float = 0.0
    """How far the slowest rank's compute between two collectives runs past the ranks' mean, as a fraction of it
    (the same work on every rank, timed in lockstep by the link probe): at a collective every rank waits for the
    slowest, so a plan that meets at every attention layer (Ulysses, its lanes) or every evaluation (the CFG
    halves, synchronous DistriFusion) runs at (1 + straggle) x its compute. A machine's own jitter (this 2-core
    VM: 2-6% over 20-80 ms of work), or a slower card beside a faster one."""

    def __post_init__(self) -> None:
        if self.bandwidth <= 0 or min(self.latency, self.duplex, self.exchange, self.cpu_per_byte, self.straggle) < 0:
            raise ValueError(f"a link needs bandwidth > 0 B/s and latency, duplex, exchange, cpu_per_byte, straggle "
                             f">= 0, got {self.bandwidth} B/s, {self.latency} s, {self.duplex} B/s, {self.exchange} "
                             f"B/s, {self.cpu_per_byte} s/B, {self.straggle}")

    def time(self, nbytes: float) -> float:
        """One message one way, the other direction idle (a pipeline hop)."""
        return self.latency + nbytes / self.bandwidth

    def both(self, nbytes: float) -> float:
        """One message each way at once (every step of an all-gather or all-to-all)."""
        return self.latency + nbytes / (self.duplex or self.bandwidth)

    def exchanged(self, nbytes: float) -> float:
        """One message each way at once, in a train of such exchanges waited for one by one (all-to-alls)."""
        return self.latency + nbytes / (self.exchange or self.duplex or self.bandwidth)


@dataclass(frozen=True)
class Costs:
    """What the simulator knows about the machine: compute per block kind, the links, fixed overheads."""

    blocks: dict[str, BlockCost]
    """Per block kind (``Block.kind``: "double", "single", "joint", ...)."""
    link: Link
    """Every rank pair's link (a uniform machine; two machines: the link between them)."""
    per_eval: float = 0.0
    """Seconds per model evaluation on every rank besides the blocks (embeddings, final layer, sampler)."""
    pace: tuple[float, ...] = ()
    """Per rank, the time its device takes for the job's blocks as a fraction of ``blocks``' (the slowest
    rank's per kind: at most 1; a faster card less); empty: every rank at ``blocks``' pace. PipeFusion's
    stages compute each at their own rank's (a stage of lanes at its slowest lane's); the plans whose ranks
    meet at every layer or evaluation keep the slowest's."""

    def stage_pace(self, stage: int, lanes: int = 1) -> float:
        return max(self.pace[stage * lanes:(stage + 1) * lanes]) if self.pace else 1.0


@dataclass(frozen=True)
class Workload:
    """One job's shape as the schedule sees it."""

    kinds: tuple[str, ...]
    """Block kind of every block, in execution order."""
    width: int
    """Model width D (hidden size)."""
    rows: int
    """Token rows of the image (height / 16)."""
    cols: int
    """Tokens per row (width / 16)."""
    n_txt: int
    """Text tokens in the attention sequence (0 for cross-attention families such as PixArt)."""
    evals: int
    """Model evaluations (steps, or more for samplers that evaluate twice per step)."""
    warmup_evals: int
    """Leading evaluations that run synchronously (the warm-up steps' evaluations)."""
    batch: int = 1
    """Images in the latent batch."""
    cfg: bool = False
    """True CFG: the model batch holds positive and negative (twice the images)."""
    middle: bool = False
    """DualCFGGuider's middle too (with ``cfg``): the model batch is three times the images; no CFG halves."""
    elem: int = 4
    """Bytes per activation element (4 float32, 2 bfloat16)."""
    channels: int = 64
    """Packed latent channels per image token (sent as float32)."""
    kv_layers: dict[str, int] = field(default_factory=dict)
    """Attention layers per block kind that DistriFusion exchanges (default: one per block)."""
    heads: int = 0
    """Attention heads (Ulysses needs at least its degree; a degree that does not divide them paces the
    ranks by the largest share, ``head_share``; 0: not checked, an even split)."""

    def __post_init__(self) -> None:
        if not self.kinds or self.rows < 1 or self.cols < 1 or self.evals < 1 or self.n_txt < 0:
            raise ValueError(f"a workload needs blocks, rows/cols/evals >= 1 and n_txt >= 0, got "
                             f"{len(self.kinds)} blocks, {self.rows}x{self.cols}, {self.evals} evals, "
                             f"{self.n_txt} text tokens")

    @property
    def model_batch(self) -> int:
        return self.batch * (1 + self.cfg + (self.cfg and self.middle))

    @property
    def n_img(self) -> int:
        return self.rows * self.cols

    @property
    def n_ctx(self) -> int:
        return self.n_txt + self.n_img


@dataclass(frozen=True)
class Prediction:
    """The simulator's answer for one plan."""

    strategy: str
    world: int
    patches: int
    wall_s: float
    compute_s: float
    """The busiest rank's compute time."""
    comm_s: float
    """The busiest link's (or rank's) transfer time, overlapped or not."""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("strategy", "world", "patches", "wall_s", "compute_s", "comm_s")}


def blocks_time(costs: Costs, kinds, nq: int, nctx: int, batch: int) -> float:
    total = 0.0
    for kind in kinds:
        if kind not in costs.blocks:
            raise ValueError(f"no cost for block kind {kind!r}: the costs know {', '.join(sorted(costs.blocks))}")
        total += costs.blocks[kind].time(nq, nctx, batch)
    return total


def stage_sizes(work: Workload, costs: Costs, world: int, split: tuple[int, ...] | None = None,
                pace: tuple[float, ...] = ()) -> tuple[int, ...]:
    """Blocks per stage: ``split`` as given, else the contiguous split with the cheapest slowest stage (each
    stage's blocks weighted by its ``pace``: the engine's own split has none)."""
    if split is not None:
        if sum(split) != len(work.kinds) or len(split) != world:
            raise ValueError(f"stage split {list(split)} does not give {len(work.kinds)} blocks to {world} stages")
        return split
    from .plan import balanced_split  # the engine's own split (imported here: plan.py loads the models)

    per_block = [blocks_time(costs, [k], work.n_ctx, work.n_ctx, 1) for k in work.kinds]
    return balanced_split(per_block, world, pace)


def simulate(strategy: str, world: int, work: Workload, costs: Costs, patches: int = 0,
             text_stream: str = "last_patch", stage_split: tuple[int, ...] | None = None,
             ulysses: int = 2) -> Prediction:
    """Predicted wall time of one job (see the module docstring); ``ulysses``: the lanes of a stage (band)
    of ``ulysses+pipefusion`` / ``ulysses+distrifusion``."""
    if strategy.startswith("cfg"):
        return _cfg(strategy, world, work, costs, patches, text_stream, stage_split, ulysses)
    if strategy == "ulysses":
        return _ulysses(world, work, costs)
    if strategy in ("ulysses+pipefusion", "ulysses+distrifusion"):
        if ulysses < 2 or world % ulysses or work.heads and work.heads < ulysses:
            raise ValueError(f"{strategy} on {world} ranks with {ulysses} lanes per stage: the lanes must divide "
                             f"the ranks and be at most the {work.heads} heads")
        n = world // ulysses
        p = (_pipefusion(n, work, costs, patches or n, text_stream, stage_split, ulysses)
             if strategy.endswith("pipefusion") else _distrifusion(n, work, costs, ulysses))
        return replace(p, strategy=strategy, world=world)
    if strategy == "serial" or world == 1:
        t = work.evals * (blocks_time(costs, work.kinds, work.n_ctx, work.n_ctx, work.model_batch) + costs.per_eval)
        return Prediction("serial", 1, 1, t, t, 0.0)
    if strategy == "pipefusion":
        return _pipefusion(world, work, costs, patches or world, text_stream, stage_split)
    if strategy == "distrifusion":
        return _distrifusion(world, work, costs)
    if strategy == "naive_patch":
        return _naive(world, work, costs)
    raise ValueError(f"the simulator has no model of strategy {strategy!r}: it knows {', '.join(SIMULATED)}")


def _pipefusion(world: int, work: Workload, costs: Costs, patches: int, text_stream: str,
                split: tuple[int, ...] | None, lanes: int = 1) -> Prediction:
    sizes = stage_sizes(work, costs, world, split)
    stages, start = [], 0
    for n in sizes:
        stages.append(work.kinds[start:start + n])
        start += n
    bands = pipefusion_spans(work.rows, work.cols, work.n_txt, patches, text_stream)
    sched = make_schedule(range(work.evals), work.warmup_evals, full_span(work.n_txt, work.n_img), bands)
    items = [(it.eval, (it.span.n_txt, it.span.n_img), None if it.warmup else it.patch) for it in sched]
    sync = sched.warmup_evals
    free = [0.0] * world
    link_free = [0.0] * world  # hop s carries s -> s + 1 (the last one: the ring back to stage 0)
    busy = [0.0] * world
    sent = [0.0] * world
    received = [0.0] * world  # bytes arrived since the stage's last item (charged to its next one)
    ring_at: dict = {}  # (band or None) -> when the band's latent is back at stage 0
    last_full = 0.0
    for t, (nt, ni), band in items:
        ready = ring_at.get(band, last_full) if t >= sync else last_full
        for s, kinds in enumerate(stages):
            c = _lanes_time(costs, work, kinds, nt + ni, lanes) * costs.stage_pace(s, lanes)
            if s in (0, world - 1):  # embedding on the first stage; final layer and sampler on the last
                c += costs.per_eval * ni / work.n_img / 2
            nbytes = (work.elem * work.model_batch * work.width * (nt + ni) if s < world - 1
                      else 4 * work.channels * ni * work.batch) / lanes  # each lane its part, on its link
            c += (nbytes + received[s]) * costs.link.cpu_per_byte  # the transport's work for what it moves
            received[s] = 0.0
            begin = max(free[s], ready)
            free[s] = begin + c
            busy[s] += c
            go = max(free[s], link_free[s])
            dt = costs.link.time(nbytes)
            link_free[s] = go + nbytes / costs.link.bandwidth
            sent[s] += dt
            ready = go + dt
            received[(s + 1) % world] += nbytes
        if band is None:
            last_full = ready
        else:
            ring_at[band] = ready
    final_send = costs.link.time(4 * work.channels * work.n_img * work.batch)
    wall = free[world - 1] + final_send
    return Prediction("pipefusion", world, patches, wall, max(busy), max(sent))


def _kv_tokens(work: Workload, world: int) -> tuple[int, int]:
    spans = displaced_spans(work.rows, work.cols, work.n_txt, world)
    return max(s.n_txt + s.n_img for s in spans), max(s.n_img for s in spans)


def _distrifusion(world: int, work: Workload, costs: Costs, lanes: int = 1) -> Prediction:
    spans = displaced_spans(work.rows, work.cols, work.n_txt, world)
    compute = max(_lanes_time(costs, work, work.kinds, s.n_txt + s.n_img, lanes) for s in spans)
    compute += costs.per_eval / world
    joint, _ = _kv_tokens(work, world)
    layers = [work.kv_layers.get(k, 1) for k in work.kinds]
    # a lane gathers its heads' K/V (the largest share paces)
    per_layer = 2 * work.elem * work.model_batch * work.width * joint / lanes * head_share(work.heads, lanes)
    gather = sum(layers) * (world - 1) * costs.link.both(per_layer)  # a ring all-gather per attention layer
    sync = min(work.warmup_evals, work.evals)
    rest = work.evals - sync
    # warm-up: every layer waits for its gather; later: evaluation t's gathers overlap evaluation t + 1's
    # compute, which loses the transport's own work on a CPU (sent and received bytes), and are waited for
    # there; the last evaluation exchanges nothing
    moved = sum(layers) * 2 * (world - 1) * per_layer * costs.link.cpu_per_byte
    # a synchronous evaluation meets the other bands at every layer (its lanes' meeting is in ``compute``)
    paced = compute * (1 + costs.link.straggle) if lanes == 1 else compute
    wall = sync * (paced + gather) + (max(0, rest - 1) * max(compute + moved, gather) + compute if rest else 0.0)
    wall += costs.link.time(4 * work.channels * work.n_img * work.batch / world)
    exchanging = work.evals if not rest else work.evals - 1
    return Prediction("distrifusion", world, world, wall, compute * work.evals, gather * exchanging)


def _naive(world: int, work: Workload, costs: Costs) -> Prediction:
    bands = split_even(work.rows, world)
    compute = 0.0
    for r0, r1 in bands:
        n = (r1 - r0) * work.cols + work.n_txt
        compute = max(compute, blocks_time(costs, work.kinds, n, n, work.model_batch))
    compute = work.evals * (compute + costs.per_eval / world)
    wall = compute + costs.link.time(4 * work.channels * work.n_img / world)
    return Prediction("naive_patch", world, world, wall, compute, 0.0)


def head_share(heads: int, ranks: int) -> float:
    """The largest share of ``heads`` split over ``ranks`` (Ulysses), as a multiple of an even split: 1 when
    ``ranks`` divides them (or ``heads`` is 0, unknown), else ceil(H / N) * N / H (38 heads over 4: 40 / 38)."""
    return -(-heads // ranks) * ranks / heads if heads else 1.0


def _all_to_all(costs: Costs, world: int, nbytes_per_rank: float) -> float:
    """An all-to-all where each rank holds ``nbytes_per_rank``: N - 1 messages of 1/N of it each way, one of a
    train (Ulysses waits for each before its next)."""
    return (world - 1) * costs.link.exchanged(nbytes_per_rank / world)


def _lanes_time(costs: Costs, work: Workload, kinds, nq: int, lanes: int) -> float:
    """``kinds`` over ``nq`` query tokens attending over the whole context, on ``lanes`` Ulysses lanes: each
    lane 1/u of the tokens through the linear layers and 1/u of the heads over the context (what its
    per-token and per-pair costs both scale with), and two all-to-alls per attention layer."""
    if lanes == 1:
        return blocks_time(costs, kinds, nq, work.n_ctx, work.model_batch)
    local = -(-nq // lanes)
    share = head_share(work.heads, lanes)
    band = work.elem * work.model_batch * local * work.width * share
    layers = sum(work.kv_layers.get(k, 1) for k in kinds)
    return (blocks_time(costs, kinds, local, work.n_ctx * share, work.model_batch) * (1 + costs.link.straggle)
            + layers * (_all_to_all(costs, lanes, 3 * band) + _all_to_all(costs, lanes, band)))


def _ulysses(world: int, work: Workload, costs: Costs) -> Prediction:
    if work.heads and work.heads < world:
        raise ValueError(f"ulysses splits {work.heads} heads over {world} ranks: fewer heads than ranks")
    n, mb, share = work.n_ctx, work.model_batch, head_share(work.heads, world)
    local = -(-n // world)  # the largest band of the joint sequence; the largest share of the heads
    compute = sum(costs.blocks[k].per_call + mb * local * (costs.blocks[k].per_token +
                                                           costs.blocks[k].per_pair * n * share)
                  for k in work.kinds) + costs.per_eval / world
    layers = sum(work.kv_layers.get(k, 1) for k in work.kinds)
    band = work.elem * mb * local * work.width * share  # the exchange's chunks padded to the largest share
    comm = layers * (_all_to_all(costs, world, 3 * band) + _all_to_all(costs, world, band))
    paced = compute * (1 + costs.link.straggle)  # every attention layer waits for the slowest rank
    wall = work.evals * (paced + comm) + costs.link.time(4 * work.channels * work.n_img * work.batch / world)
    return Prediction("ulysses", world, 1, wall, work.evals * compute, work.evals * comm)


def _cfg(strategy: str, world: int, work: Workload, costs: Costs, patches: int, text_stream: str,
         stage_split, ulysses: int = 2) -> Prediction:
    if not work.cfg or work.middle:
        raise ValueError(f"{strategy} needs a true-CFG job of two branches (cfg != 1): this one has "
                         f"{1 + work.cfg + (work.cfg and work.middle)}")
    if world % 2:
        raise ValueError(f"{strategy} needs an even world size, got {world}")
    inner = strategy.partition("+")[2] or "serial"
    half = replace(work, cfg=False)  # each half: one branch, half the model batch
    costs = replace(costs, pace=())  # the halves meet at every evaluation: the slowest rank paces both
    p = simulate(inner, world // 2, half, costs, patches, text_stream, stage_split, ulysses)
    swap = work.evals * costs.link.both(4 * work.channels * work.n_img * work.batch / max(1, world // 2))
    # each evaluation's swap waits for the slower half: where the halves meet nowhere else (straggle counts once,
    # at a plan's finest meeting: Ulysses' layers where it runs inside)
    wait = costs.link.straggle * p.compute_s if inner == "serial" else 0.0
    return Prediction(strategy, world, p.patches, p.wall_s + swap + wait, p.compute_s, p.comm_s + swap)
