"""The scorer of SPEC.md §3: normalised exact match, option letters, box IoU, token F1."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llava_c_ray.data.scoring import SCORERS, box_iou, extract_letter, parse_box, score
from llava_c_ray.errors import LlavaCError

words = st.text(alphabet="abcdefghij ", min_size=1, max_size=30).filter(lambda s: s.strip())


@pytest.mark.parametrize(
    ("prediction", "reference", "rule", "expected"),
    [
        ("The Cat.", "cat", "exact", 1.0),
        ("two", "2", "exact", 1.0),
        ("a red circle", "red circle", "exact", 1.0),
        ("red square", "red circle", "exact", 0.0),
        ("B", "B", "choice", 1.0),
        ("(B)", "B", "choice", 1.0),
        ("The answer is B.", "B", "choice", 1.0),
        ("B. red", "B", "choice", 1.0),
        ("A red circle", "B", "choice", 0.0),
        ("the correct option is B", "B", "choice", 1.0),
        ("C", "B", "choice", 0.0),
        ("[0.00, 0.00, 0.50, 0.50]", "[0.0, 0.0, 0.5, 0.5]", "bbox", 1.0),
        ("[0.00, 0.00, 0.50, 0.50]", "[0.50, 0.50, 1.00, 1.00]", "bbox", 0.0),
        ("no box here", "[0.0, 0.0, 0.5, 0.5]", "bbox", 0.0),
        ("The red sign says cat.", "The red sign says cat.", "f1", 1.0),
    ],
)
def test_examples(prediction: str, reference: str, rule: str, expected: float) -> None:
    assert score(prediction, reference, rule) == expected


def test_f1_partial_credit() -> None:
    assert score("red circle", "red square", "f1") == pytest.approx(0.5)


@given(words)
def test_identity_scores_one(text: str) -> None:
    assert score(text, text, "exact") == 1.0
    assert score(text, text, "f1") == 1.0


@given(words, words, st.sampled_from(sorted(SCORERS)))
def test_scores_in_unit_interval(a: str, b: str, rule: str) -> None:
    assert 0.0 <= score(a, b, rule) <= 1.0


boxes = st.builds(
    lambda x, y, w, h: (x, y, x + w, y + h),
    st.floats(0, 0.9),
    st.floats(0, 0.9),
    st.floats(1e-3, 0.1),
    st.floats(1e-3, 0.1),
)


@given(boxes, boxes)
def test_iou_symmetric_and_bounded(a, b) -> None:
    assert box_iou(a, b) == pytest.approx(box_iou(b, a))
    assert 0.0 <= box_iou(a, b) <= 1.0 + 1e-9
    assert box_iou(a, a) == pytest.approx(1.0)


def test_letter_and_box_parsing() -> None:
    assert extract_letter("I think the answer is: C") == "C"
    assert extract_letter("nothing") is None
    assert parse_box("[0.5, 0.5, 0.2, 0.9]") is None


def test_unknown_rule_lists_known() -> None:
    with pytest.raises(LlavaCError, match="exact"):
        score("a", "a", "bleu")
