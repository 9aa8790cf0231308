"""Scoring a generated answer against a reference (SPEC.md §3), each rule a pure function → [0, 1].

- `exact`: exact match after normalisation (case, punctuation, articles, number words → digits);
- `choice`: the option letter extracted from the answer ("B", "(B)", "The answer is B.", "B. red");
- `bbox`: IoU of the boxes "[x1, y1, x2, y2]" ≥ 0.5 (a malformed box scores 0);
- `f1`: token F1 of the normalised answers (SQuAD style).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

from llava_c_ray.errors import LlavaCError

NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
        ]
    )
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
LETTER_PATTERNS = (  # most explicit first; "A red circle" or "I think" do not commit to A / I
    re.compile(r"answer is:?\s*\(?([A-Z])\b"),
    re.compile(r"^\(?([A-Z])\)?[.):]?$"),
    re.compile(r"^\(?([A-Z])[.):]\s"),
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"\s([A-Z])[.)]?$"),
)
NUMBER = r"[-+]?\d*\.?\d+"
BOX = re.compile(rf"\[\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*\]")


def normalize_tokens(text: str) -> list[str]:
    """Lower-case, strip punctuation and articles, map number words to digits."""
    words = text.lower().translate(PUNCTUATION).split()
    return [NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES]


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_tokens(prediction) == normalize_tokens(reference))


def extract_letter(text: str) -> str | None:
    """The option letter a free-form answer commits to, or None."""
    text = text.strip()
    for pattern in LETTER_PATTERNS:
        found = pattern.search(text)
        if found:
            return found.group(1)
    return None


def choice_match(prediction: str, reference: str) -> float:
    expected = extract_letter(reference)
    return float(expected is not None and extract_letter(prediction) == expected)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    found = BOX.search(text)
    if not found:
        return None
    x1, y1, x2, y2 = (float(v) for v in found.groups())
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def box_match(prediction: str, reference: str) -> float:
    pred, ref = parse_box(prediction), parse_box(reference)
    return float(pred is not None and ref is not None and box_iou(pred, ref) >= 0.5)


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_tokens(prediction), normalize_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact": exact_match,
    "choice": choice_match,
    "bbox": box_match,
    "f1": token_f1,
}


def score(prediction: str, reference: str, rule: str) -> float:
    """Score one answer with the named rule; an unknown rule lists the known ones."""
    if rule not in SCORERS:
        raise LlavaCError(f"unknown scoring rule {rule!r}", fix=f"use one of: {', '.join(SCORERS)}")
    return SCORERS[rule](prediction, reference)
