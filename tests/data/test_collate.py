"""Collator: right padding, masks and labels, pixel_values only for rows with an image."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from llava_c_ray.data.collate import LlavaCollator
from llava_c_ray.data.template import IGNORE_INDEX

PAD = 0


def example(length: int, image: bool) -> dict:
    ids = list(range(1, length + 1))
    return {
        "input_ids": ids,
        "labels": [IGNORE_INDEX] * (length // 2) + ids[length // 2 :],
        "pixel_values": torch.full((3, 4, 4), float(length)) if image else None,
    }


@given(st.lists(st.tuples(st.integers(1, 12), st.booleans()), min_size=1, max_size=6))
def test_right_padding_and_image_rows(rows: list[tuple[int, bool]]) -> None:
    examples = [example(n, image) for n, image in rows]
    batch = LlavaCollator(PAD)(examples)
    width = max(n for n, _ in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(rows), width)
    for row, (n, _) in enumerate(rows):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][row, :n].tolist() == examples[row]["input_ids"]
        assert batch["input_ids"][row, n:].eq(PAD).all()
        assert batch["labels"][row, :n].tolist() == examples[row]["labels"]
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
    image_lengths = [float(n) for n, image in rows if image]
    if image_lengths:
        assert batch["pixel_values"][:, 0, 0, 0].tolist() == image_lengths
    else:
        assert "pixel_values" not in batch
