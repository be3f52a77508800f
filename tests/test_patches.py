from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.patches import Span, displaced_spans, image_bands, lane_spans, pipefusion_spans, split_even


def test_split_even_covers_and_differs_by_at_most_one():
    for n in range(1, 20):
        for parts in range(1, n + 1):
            ranges = split_even(n, parts)
            sizes = [b - a for a, b in ranges]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(parts - 1))
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_split_even_refuses_empty_bands():
    with pytest.raises(ValueError, match="cannot split 3 rows into 4"):
        split_even(3, 4)


def test_image_bands_are_whole_rows():
    assert image_bands(5, 4, 2) == [(0, 12), (12, 20)]


def test_pipefusion_text_rides_with_one_patch():
    last = pipefusion_spans(4, 2, 6, 3, "last_patch")
    assert [s.n_txt for s in last] == [0, 0, 6]
    assert [s.n_txt for s in pipefusion_spans(4, 2, 6, 3, "first_patch")] == [6, 0, 0]
    assert [s.n_txt for s in pipefusion_spans(4, 2, 6, 3, "every_patch")] == [6, 6, 6]
    assert [(s.i0, s.i1) for s in last] == [(0, 4), (4, 6), (6, 8)]


def test_displaced_spans_split_text_too():
    spans = displaced_spans(4, 2, 5, 2)
    assert [(s.t0, s.t1, s.i0, s.i1) for s in spans] == [(0, 3, 0, 4), (3, 5, 4, 8)]
    few = displaced_spans(4, 2, 1, 2)  # fewer text tokens than ranks: some own none
    assert [s.n_txt for s in few] == [1, 0]


def test_joint_index_puts_text_first():
    assert Span(1, 3, 2, 4).joint_index(5).tolist() == [1, 2, 7, 8]
    assert torch.equal(Span(0, 0, 0, 2).joint_index(3), torch.tensor([3, 4]))


def test_pipefusion_bands_balance_tokens_with_the_text():
    spans = pipefusion_spans(32, 32, 256, 2, "last_patch")
    assert [s.n_txt + s.n_img for s in spans] == [640, 640]  # the text patch gets 12 rows, the other 20
    first = pipefusion_spans(8, 8, 8, 3, "first_patch")
    assert first[0].n_txt == 8 and first[0].n_img < first[1].n_img
    assert [(s.i0, s.i1) for s in first][-1][1] == 64
    many = pipefusion_spans(8, 8, 64, 8, "last_patch")  # text as large as the image: still a row each
    assert [s.n_img for s in many] == [8] * 8


def test_balanced_rows_refuses_too_many_bands():
    from comfy_pipefusion.patches import balanced_rows
    with pytest.raises(ValueError, match="cannot split 3 rows into 4"):
        balanced_rows(3, 4, [0, 0, 0, 1])


def test_ulysses_lane_spans_cut_a_span_in_order():
    """Ulysses inside a patch method: each lane a consecutive part of the span's text and of its image
    tokens; every lane's text, then every lane's image, is the span's own [text; image] order; text shorter
    than the lanes goes to lane 0; a patch with fewer image tokens than lanes is refused with the numbers."""
    span = Span(0, 8, 24, 40)
    parts = lane_spans(span, 3)
    assert [(p.t0, p.t1, p.i0, p.i1) for p in parts] == [(0, 3, 24, 30), (3, 6, 30, 35), (6, 8, 35, 40)]
    joined = torch.cat([p.joint_index(64)[:p.n_txt] for p in parts] + [p.joint_index(64)[p.n_txt:] for p in parts])
    assert torch.equal(joined, span.joint_index(64))
    assert [(p.n_txt, p.n_img) for p in lane_spans(Span(0, 1, 0, 4), 2)] == [(1, 2), (0, 2)]
    with pytest.raises(ValueError, match="patch of 3 image tokens cannot be split over 4 Ulysses ranks"):
        lane_spans(Span(0, 0, 5, 8), 4)
