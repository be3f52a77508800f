"""The one schedule every strategy iterates (parallel/schedule.py): items, boundaries, warm-up."""
from __future__ import annotations

import pytest

from comfy_pipefusion.parallel.schedule import make_schedule
from comfy_pipefusion.patches import Span, full_span, pipefusion_spans

WHOLE = full_span(8, 64)
BANDS = pipefusion_spans(8, 8, 8, 4, "last_patch")  # 4 bands of 8 rows x 8 cols, text on the last


def test_schedule_one_item_per_evaluation_without_patches():
    sched = make_schedule([0, 1, 2, 3], 0, WHOLE)
    assert len(sched) == 4 and sched.evals == 4 and sched.warmup_evals == 0 and sched.max_patches == 1
    assert [it.eval for it in sched] == [0, 1, 2, 3] and [it.index for it in sched] == [0, 1, 2, 3]
    assert all(it.span == WHOLE and it.opens_eval and it.closes_eval and it.opens_step and it.closes_step
               for it in sched)
    assert [it.step_boundary for it in sched] == [False, True, True, True]
    assert not any(it.warmup for it in sched)


def test_schedule_warmup_items_are_whole_and_synchronous():
    sched = make_schedule([0, 1, 2, 3, 4], 2, WHOLE, BANDS)
    assert sched.warmup_evals == 2 and sched.max_patches == 4
    assert len(sched) == 2 + 3 * 4
    warm = [it for it in sched if it.warmup]
    assert [it.eval for it in warm] == [0, 1] and all(it.span == WHOLE and it.patches == 1 for it in warm)
    banded = [it for it in sched if not it.warmup]
    assert [it.span for it in banded] == list(BANDS) * 3
    assert [it.patch for it in banded] == [0, 1, 2, 3] * 3
    assert all(it.patches == 4 for it in banded)
    # The band that carries the text (last_patch) is the last item of each banded evaluation.
    assert [it.span.n_txt > 0 for it in banded[:4]] == [False, False, False, True]


def test_schedule_boundaries_of_banded_steps():
    sched = make_schedule([0, 1, 2], 1, WHOLE, BANDS)
    opens = [it.index for it in sched if it.opens_eval]
    closes = [it.index for it in sched if it.closes_eval]
    assert opens == [0, 1, 5] and closes == [0, 4, 8]
    assert [it.index for it in sched if it.opens_step] == opens  # one evaluation per step
    assert [it.index for it in sched if it.closes_step] == closes
    assert [it.index for it in sched if it.eval_boundary] == [1, 5]
    assert [it.index for it in sched if it.step_boundary] == [1, 5]
    assert [it.index for it in sched.rest_of_eval(sched[1])] == [2, 3, 4]
    assert sched.rest_of_eval(sched[4]) == ()


def test_schedule_multistep_sampler_two_evaluations_per_step():
    # heun-like: 3 steps, two evaluations each except the last (one): evals 0,1 | 2,3 | 4
    steps_of = [0, 0, 1, 1, 2]
    sched = make_schedule(steps_of, 1, WHOLE, BANDS[:2])
    assert sched.evals == 5 and sched.warmup_evals == 2  # both evaluations of warm-up step 0
    assert len(sched) == 2 + 3 * 2
    assert [it.evals_in_step for it in sched if it.opens_eval] == [2, 2, 2, 2, 1]
    # A step opens at its first evaluation's first item and closes at its last evaluation's last item.
    assert [(it.eval, it.patch) for it in sched if it.opens_step] == [(0, 0), (2, 0), (4, 0)]
    assert [(it.eval, it.patch) for it in sched if it.closes_step] == [(1, 0), (3, 1), (4, 1)]
    # Cancel checks: lockstep strategies at steps, a pipeline at every evaluation.
    assert [it.eval for it in sched if it.step_boundary] == [2, 4]
    assert [it.eval for it in sched if it.eval_boundary] == [1, 2, 3, 4]


def test_schedule_every_step_warm_and_empty():
    sched = make_schedule([0, 1, 2], 5, WHOLE, BANDS)
    assert len(sched) == 3 and sched.warmup_evals == 3 and sched.max_patches == 1
    empty = make_schedule([], 1, WHOLE, BANDS)
    assert len(empty) == 0 and empty.evals == 0 and empty.max_patches == 1


def test_schedule_refuses_bad_input_with_the_numbers():
    with pytest.raises(ValueError, match=r"warmup_steps=-1"):
        make_schedule([0, 1], -1, WHOLE)
    with pytest.raises(ValueError, match=r"\[0, 2, 1\] must not decrease"):
        make_schedule([0, 2, 1], 0, WHOLE)
    with pytest.raises(ValueError, match="patches is empty"):
        make_schedule([0, 1], 0, WHOLE, [])


def test_schedule_items_are_frozen():
    item = make_schedule([0], 0, Span(0, 0, 0, 4))[0]
    with pytest.raises(AttributeError):
        item.eval = 3


def test_schedule_send_cap_is_above_the_unposted_sends():
    # parallel/pipefusion.send_cap: at most M sends of a stage wait for a receive not yet posted, so a
    # queue capped below M would wait on one of them (a deadlock under NCCL's in-order streams). M is the
    # schedule's largest evaluation, not its average (warm-up evaluations are one item each).
    from comfy_pipefusion.parallel.pipefusion import send_cap
    sched = make_schedule(list(range(20)), 19, WHOLE, pipefusion_spans(16, 8, 8, 16, "last_patch"))
    assert sched.max_patches == 16 and len(sched) // sched.evals == 1
    for stages in (2, 3, 4, 8):
        assert send_cap(sched.max_patches, stages) >= sched.max_patches
    assert all(send_cap(m, n) >= m for m in range(1, 65) for n in range(2, 9))
