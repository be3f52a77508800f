"""Per-rank, per-job state shared by every strategy: device copies, time embeddings, K/V buffers, the
sampler, and the last layer's update of one patch."""
from __future__ import annotations

import torch

from ..attention import StaleKV
from ..patches import Span
from ..models import family
from ..sampling.noise import SamplerNoise
from ..sampling.samplers import make_sampler
from .schedule import Schedule, make_schedule


class JobRuntime:
    """What one rank holds while it samples one job.

    ``model`` may hold only some modules (the rest on the meta device): ``first`` says whether this rank
    embeds the image (and, for joint-text families, the text), ``last`` whether it owns the sampler and
    the latent. Work is counted in model *evaluations* (a sampler may evaluate the model more than once
    per step); ``rt.x`` holds, per token, the input of the next evaluation.
    """

    def __init__(self, model, problem, dtype: torch.dtype, device: torch.device, first: bool, last: bool,
                 preview=None) -> None:
        self.model, self.problem, self.dtype, self.device = model, problem, dtype, device
        self.preview = preview if last else None  # a PreviewWriter (preview.py) when the job wants previews
        if self.preview is not None:
            self.preview.register()
        self.fam = family.get(problem.family)
        self.first, self.last = first, last
        self.ms = problem.model_sampling()
        fmt = problem.latent  # per-step noise drawn over ComfyUI's LATENT, as its samplers draw it
        noise = SamplerNoise(fmt.comfy_shape((problem.batch, fmt.channels, problem.rows * 2, problem.cols * 2)),
                             problem.spec.seed, fmt.pack_comfy, device)
        # Every rank builds the sampler for its schedule (evaluations, steps); only the last stage steps it.
        self.sampler = make_sampler(problem.spec.sampler, problem.sigmas, self.ms, noise)
        self.evals = [float(s) for s in self.sampler.evals]
        mb = problem.model_batch
        self.pooled = problem.pooled.to(device, dtype) if problem.pooled is not None else None
        self.guidance = problem.guidance.to(device) if problem.guidance is not None else None
        wants_txt = first or not self.fam.JOINT_TEXT
        self.emb = self.fam.embeddings(model, problem.txt if wants_txt else None, problem.n_txt, problem.rows,
                                       problem.cols, device, dtype, **reference_inputs(problem))
        self.x = problem.x0.to(device).clone() if last else None  # [B, S_img, C] float32
        self._temb: dict[int, object] = {}
        self._pos: dict = {}  # per span: positions (RoPE) on the device, computed once per job
        self._t = [self.ms.timestep(torch.full((mb,), s, device=device)) for s in self.evals]

    @property
    def width(self) -> int:
        heads, head_dim = family.attention_shape(self.model)
        return heads * head_dim

    def step_of(self, k: int) -> int:
        """The sampling step evaluation ``k`` belongs to."""
        return self.sampler.step_of(k)

    def schedule(self, whole: Span, patches=None, warmup_steps: int = 0) -> Schedule:
        """This job's items (``schedule.make_schedule``): warm-up evaluations whole, the rest per patch."""
        return make_schedule([self.step_of(k) for k in range(len(self.evals))], warmup_steps, whole, patches)

    def timestep(self, k: int) -> torch.Tensor:
        """Evaluation k's timestep as the model takes it, [MB]."""
        return self._t[k]

    def temb(self, k: int):
        """Evaluation k's conditioning for every block's AdaLN (computed once per evaluation)."""
        if k not in self._temb:
            self._temb = {k: self.fam.time_embedding(self.model, self.emb, self._t[k], self.pooled,
                                                     self.guidance, self.dtype)}
        return self._temb[k]

    def kv_buffers(self, blocks: list, cls=StaleKV, n_img: int | None = None, **kw) -> list:
        p = self.problem
        heads, head_dim = family.attention_shape(self.model)
        n_img = p.n_img if n_img is None else n_img

        def make(kind: str):
            n_txt, extra = (p.n_span_txt, kw) if kind == "joint" else (0, _image_only(kw))
            return cls(p.model_batch, heads, n_txt, n_img, head_dim,
                       self.dtype, self.device, **extra)
        return [self.fam.kv_buffers(self.model, b, make) for b in blocks]

    def embed_image(self, x_patch: torch.Tensor, span, k: int) -> torch.Tensor:
        """Evaluation k's model input for a patch of the latent: scaled as the model sampling wants,
        repeated for every branch ([positive; negative] under cfg), embedded. [B, L, C] -> [MB, L, D]"""
        if self.problem.inpaint is not None:
            x_patch = self.problem.inpaint.model_input(self.ms, self.evals[k], x_patch, slice(span.i0, span.i1))
        x = self.ms.calculate_input(self.evals[k], x_patch)
        if self.problem.cfg:
            x = torch.cat([x] * self.problem.branches)
        return self.fam.embed_image(self.model, self.emb, x.to(self.dtype), span)

    def run_blocks(self, blocks: list, kvs: list, span, txt, img, k: int, pos_span=None):
        key = pos_span or span
        if key not in self._pos:
            self._pos[key] = self.emb.for_span(key)
        pos = self._pos[key]
        return self.fam.run_blocks(self.model, blocks, kvs, span, txt, img, self.temb(k), pos)

    def span_txt(self, span):
        """The embedded text tokens a span carries into the blocks (first stage of joint-text families)."""
        return self.emb.txt[:, span.t0:span.t1] if span.n_txt and self.emb.txt is not None else None

    def update(self, k: int, i0: int, i1: int, img: torch.Tensor) -> torch.Tensor:
        """Last layer + sampler step on image tokens [i0, i1); returns the patch's next input."""
        return self.step(k, i0, i1, self.output(k, img))

    def output(self, k: int, img: torch.Tensor) -> torch.Tensor:
        """The last layer on some image tokens: the model's output [MB, L, C], float32."""
        return self.fam.final_layer(self.model, img, self.temb(k)).float()

    def step(self, k: int, i0: int, i1: int, out: torch.Tensor) -> torch.Tensor:
        """The sampler step on image tokens [i0, i1) from the model's output for them; their next input."""
        x = self.x[:, i0:i1]
        new = self.sampler.step(k, slice(i0, i1), x, self.denoised(k, x, out, slice(i0, i1)))
        self.x[:, i0:i1] = new
        return new

    def denoised(self, k: int, x: torch.Tensor, out: torch.Tensor, sl: slice) -> torch.Tensor:
        """The model's prediction for tokens ``sl`` as a denoised latent, with classifier-free guidance
        applied as ComfyUI does (``guide``, on the denoised predictions) and the noise mask's clean image where
        the mask is 0. ``x`` is the sampler's latent of the patch."""
        inpaint = self.problem.inpaint
        if inpaint is not None:
            x = inpaint.model_input(self.ms, self.evals[k], x, sl)  # what the model saw (before its scaling)
        if self.problem.branch is not None:  # CFG parallelism: with the other branch's output, [pos; neg]
            out = self.problem.branch.both(out)
        if self.problem.cfg or self.problem.branch is not None:
            den = guide(self.problem.spec, [self.ms.calculate_denoised(self.evals[k], o, x)
                                            for o in out.chunk(self.problem.spec.branches)])
        else:
            den = self.ms.calculate_denoised(self.evals[k], out, x)
        den = den if inpaint is None else inpaint.denoised(den, sl)
        if self.preview is not None:
            self.preview.put(sl, den)
        return den


def guide(spec, den: list[torch.Tensor]) -> torch.Tensor:
    """ComfyUI's guidance of the branches' denoised predictions [positive, negative(, middle)]: CFGGuider's
    ``negative + (positive - negative) * cfg``; DualCFGGuider's (Guider_DualCFG, ``cfg`` its cfg_conds,
    ``cfg_middle`` its cfg_cond2_negative) regular ``negative + (middle - negative) * cfg_middle + (positive -
    middle) * cfg`` or nested ``negative + cfg_middle * (middle + (positive - middle) * cfg - negative)``, in
    ComfyUI's order of operations."""
    if len(den) == 2:
        pos, neg = den
        return neg + (pos - neg) * spec.cfg
    pos, neg, mid = den
    if spec.cfg_style == "nested":
        return neg + spec.cfg_middle * ((mid + (pos - mid) * spec.cfg) - neg)
    return (neg + (mid - neg) * spec.cfg_middle) + (pos - mid) * spec.cfg


def reference_inputs(problem) -> dict:
    """The reference latents of a job as the family's ``embeddings`` and ``forward`` take them (only when there
    are any: families without references never see the arguments)."""
    return {"refs": problem.refs, "ref_method": problem.ref_method} if problem.refs else {}


def _image_only(kw: dict) -> dict:
    """Buffer arguments for an image-only attention: spans (DistriFusion's bands) without their text."""
    if "spans" not in kw:
        return kw
    return {**kw, "spans": [Span(0, 0, s.i0, s.i1) for s in kw["spans"]]}


def gather_bands(comm, x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor | None:
    """Collect every rank's image-token range of ``x`` on rank 0; returns the full latent there."""
    if comm.rank != 0:
        i0, i1 = ranges[comm.rank]
        comm.isend(x[:, i0:i1].clone(), 0).wait()
        return None
    for r, (i0, i1) in enumerate(ranges[1:], start=1):
        x[:, i0:i1] = comm.irecv(torch.empty_like(x[:, i0:i1]), r).wait()
    return x


class Control:
    """A job's hooks on one rank: progress (and the preview's x0) after each step, and the cancel decision.

    Only rank 0 hears the user; ``cancelled`` is its flag. Strategies whose ranks run in lockstep share it
    with ``agree_stop`` (a one-byte broadcast per step on the control plane, never queued behind data);
    PipeFusion's stage 0 sends its decision ahead to the other stages instead (``pipefusion._Decisions``),
    so the pipeline never drains at a step boundary.
    """

    def __init__(self, on_step=None, cancelled=None, preview=None, trace=None) -> None:
        self._on_step = on_step
        self._cancelled = cancelled
        self.preview = preview  # a PreviewWriter, or None: no preview wanted
        self.trace = trace  # a trace.Trace recording this run's items (the bench's timeline), or None

    def track(self, schedule):
        """The strategy's loop over its schedule: the items, timed when a trace records this run."""
        return schedule if self.trace is None else self.trace.track(schedule)

    def step_done(self, t: int) -> None:
        if self.preview is not None:
            self.preview.publish(t)
        if self._on_step is not None:
            self._on_step(t)

    def cancelled(self) -> bool:
        return bool(self._cancelled and self._cancelled())

    def agree_stop(self, comm) -> bool:
        return comm.agree(self.cancelled() if comm.rank == 0 else False)
