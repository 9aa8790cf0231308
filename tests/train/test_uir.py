"""Properties of the UIR loss and of inquiry packing (pure torch, no Ray)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from llava_c_ray.train.uir import pack_row, uir_loss

sequences = st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=30), min_size=1, max_size=20)


@given(sequences, st.integers(0, 50), st.integers(1, 80), st.integers(1, 8))
def test_packed_row_fits_the_budget_and_takes_whole_sequences(seqs, start, budget, per_row) -> None:
    start %= len(seqs)
    row, taken = pack_row(seqs, start, budget, per_row)
    assert 1 <= len(row) <= budget and 1 <= taken <= per_row
    whole = sum((seqs[(start + i) % len(seqs)] for i in range(taken)), [])
    assert row == whole[:budget]
    assert taken == 1 or len(whole) <= budget  # several only when they fit whole


def test_rows_cycle_through_all_inquiries() -> None:
    seqs = [[i] * 3 for i in range(5)]
    rows, start = [], 0
    for _ in range(5):
        row, taken = pack_row(seqs, start, budget=7, per_row=4)
        start = (start + taken) % len(seqs)
        rows.append(row)
    assert rows[:3] == [[0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3], [4, 4, 4, 0, 0, 0]]
    assert all(len(r) <= 7 for r in rows)


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 8))
def test_uir_loss_is_zero_at_the_reference_and_masks_padding(rows, tokens, dim) -> None:
    torch.manual_seed(0)
    reference = torch.randn(rows, tokens, dim)
    mask = torch.ones(rows, tokens)
    assert uir_loss(reference.clone(), reference, mask) == 0
    moved = reference + 1.0
    assert torch.isclose(uir_loss(moved, reference, mask), torch.tensor(1.0))
    mask[:, -1] = 0
    moved[:, -1] += 100.0  # padding positions do not count
    assert torch.isclose(uir_loss(moved, reference, mask), torch.tensor(1.0)) or tokens == 1
