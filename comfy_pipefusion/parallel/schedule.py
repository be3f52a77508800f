"""One job's work on one rank, in the order it is done: the one schedule every strategy iterates.

A sampler evaluates the model K times (``evals``), one or more evaluations per sampling step (``step_of``).
Each evaluation is cut into *items*: a warm-up evaluation (one of the first ``warmup_steps`` steps) is one
synchronous item over ``whole`` (exact: the whole image, or a rank's band with its exchange waited for);
every later evaluation is one item per span of ``patches`` (PipeFusion's bands; one span for the strategies
that compute their band whole). An item knows where it sits: which evaluation, step and patch, whether it
opens or closes its evaluation and its step, and how many evaluations its step has. Strategies check for
cancel where ``step_boundary`` (or ``eval_boundary``) says and report progress where ``closes_step`` says,
instead of comparing steps of neighbouring evaluations themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from ..patches import Span


@dataclass(frozen=True)
class Item:
    """One unit of work: this span of evaluation ``eval``."""

    index: int
    """Position in the schedule (0 .. len - 1)."""
    eval: int
    """The model evaluation it belongs to (0 .. evals - 1)."""
    step: int
    """The sampling step of that evaluation."""
    span: Span
    """The tokens it computes: a patch, a rank's band, or the whole image."""
    patch: int
    """Which item of its evaluation it is (0 .. patches - 1)."""
    patches: int
    """How many items its evaluation is cut into (1 for a warm-up evaluation)."""
    warmup: bool
    """A synchronous warm-up item: exact, fills every stale buffer."""
    opens_step: bool
    """The first item of its sampling step."""
    closes_step: bool
    """The last item of its sampling step: the step is done once it is."""
    evals_in_step: int
    """How many evaluations its step has (2 for heun, dpm_2, dpmpp_sde; 1 for single-evaluation samplers)."""

    @property
    def opens_eval(self) -> bool:
        return self.patch == 0

    @property
    def closes_eval(self) -> bool:
        return self.patch == self.patches - 1

    @property
    def step_boundary(self) -> bool:
        """Opens a step after the first: where lockstep strategies agree on cancel."""
        return self.opens_step and self.eval > 0

    @property
    def eval_boundary(self) -> bool:
        """Opens an evaluation after the first: where a pipeline hears stage 0's cancel decision."""
        return self.opens_eval and self.eval > 0


@dataclass(frozen=True)
class Schedule:
    """Every item of one job, in order, with the counts strategies size their buffers and queues by."""

    items: tuple[Item, ...]
    evals: int
    """Model evaluations of the job."""
    warmup_evals: int
    """How many leading evaluations are warm-up (one synchronous item each)."""

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]

    @property
    def max_patches(self) -> int:
        """The most items one evaluation is cut into (PipeFusion's M; 1 with no banded evaluation)."""
        return max((it.patches for it in self.items), default=1)

    def rest_of_eval(self, item: Item) -> tuple[Item, ...]:
        """The items of ``item``'s evaluation after it."""
        return self.items[item.index + 1:item.index + item.patches - item.patch]


def make_schedule(steps_of: Sequence[int], warmup_steps: int, whole: Span,
                  patches: Sequence[Span] | None = None) -> Schedule:
    """The schedule of a job whose evaluation k belongs to sampling step ``steps_of[k]``: evaluations of
    the first ``warmup_steps`` steps are one warm-up item over ``whole``, the others one item per span of
    ``patches`` (default: ``whole``)."""
    steps_of = [int(s) for s in steps_of]
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be 0 or more")
    if any(b < a for a, b in zip(steps_of, steps_of[1:])):
        raise ValueError(f"evaluation steps {steps_of} must not decrease: a sampler's evaluations run in order")
    patches = tuple(patches) if patches is not None else (whole,)
    if not patches:
        raise ValueError("patches is empty: give at least one span per evaluation (or None for the whole span)")
    per_step: dict[int, int] = {}
    for s in steps_of:
        per_step[s] = per_step.get(s, 0) + 1
    items: list[Item] = []
    for k, step in enumerate(steps_of):
        warm = step < warmup_steps
        spans = (whole,) if warm else patches
        first_of_step = k == 0 or steps_of[k - 1] != step
        last_of_step = k + 1 == len(steps_of) or steps_of[k + 1] != step
        for p, span in enumerate(spans):
            items.append(Item(len(items), k, step, span, p, len(spans), warm,
                              opens_step=first_of_step and p == 0, closes_step=last_of_step and p == len(spans) - 1,
                              evals_in_step=per_step[step]))
    return Schedule(tuple(items), len(steps_of), sum(1 for s in steps_of if s < warmup_steps))
