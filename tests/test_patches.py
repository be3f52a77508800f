from __future__ import annotations

import pytest
import torch

from comfy_pipefusion.patches import Span, displaced_spans, image_bands, pipefusion_spans, split_even


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
