"""Continual-learning metrics (SPEC.md §3) on hand-computed matrices."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llava_c_ray.evaluate.metrics import continual_metrics

#            t1    t2    t3
MATRIX = [
    [10.0, 20.0, 30.0],  # stage 0 (initial)
    [80.0, 25.0, 30.0],  # after t1
    [60.0, 90.0, 35.0],  # after t2
    [50.0, 70.0, 95.0],  # after t3
]


def test_hand_computed() -> None:
    m = continual_metrics(MATRIX, [50.0, 45.0, 40.0, 25.0])
    assert m["avg"] == pytest.approx((50 + 70 + 95) / 3)
    assert m["last"] == 95.0
    assert m["maa"] == pytest.approx((80 + (60 + 90) / 2 + (50 + 70 + 95) / 3) / 3)
    assert m["bwt"] == pytest.approx(((50 - 80) + (70 - 90)) / 2)
    assert m["forgetting"] == pytest.approx(((80 - 50) + (90 - 70)) / 2)
    assert m["general_retention"] == pytest.approx(0.5)


def test_joint_run_gets_avg_only() -> None:
    m = continual_metrics([[10.0, 20.0], [70.0, 90.0]], [50.0, 40.0])
    assert m["avg"] == 80.0 and m["bwt"] is None and m["general_retention"] == pytest.approx(0.8)


def test_unevaluated_entries_are_skipped() -> None:
    m = continual_metrics([[None, None], [50.0, None], [40.0, 60.0]])
    assert m["avg"] == 50.0 and m["bwt"] == -10.0


scores = st.floats(0, 100)


@given(
    st.integers(1, 5).flatmap(
        lambda t: st.lists(st.lists(scores, min_size=t, max_size=t), min_size=t + 1, max_size=t + 1)
    )
)
def test_properties(matrix) -> None:
    m = continual_metrics(matrix)
    assert 0 <= m["avg"] <= 100 and 0 <= m["maa"] <= 100
    if len(matrix) > 2:
        assert (
            m["forgetting"] >= -m["bwt"] - 1e-9
        )  # max over stages ≥ the score right after training
