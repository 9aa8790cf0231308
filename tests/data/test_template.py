"""Tokenisation through the real processor: only answers and their </s> are supervised."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_c_ray.data.collate import LlavaCollator
from llava_c_ray.data.records import Record, Turn, load_records
from llava_c_ray.data.template import (
    IGNORE_INDEX,
    encode_example,
    encode_prompts,
    prompt_text,
    with_instruction,
)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_checkpoint)


def two_turns() -> Record:
    return Record(
        "r1",
        "x.png",
        (
            Turn("human", "<image>\nWhat color is it?"),
            Turn("gpt", "red"),
            Turn("human", "And the shape?"),
            Turn("gpt", "a circle"),
        ),
    )


def test_labels_cover_exactly_the_answers(processor) -> None:
    example = encode_example(two_turns(), processor, Image.new("RGB", (96, 96), "red"))
    ids, labels = example["input_ids"], example["labels"]
    supervised = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised) == " red</s> a circle</s>"
    for token, label in zip(ids, labels, strict=True):
        assert label in (IGNORE_INDEX, token)
    text = processor.tokenizer.decode(ids)
    assert text.count("<image>") == 16
    assert "USER: " in text and text.count("ASSISTANT:") == 2
    assert example["pixel_values"].shape == (3, 96, 96)


def test_prompt_is_the_training_prefix(processor) -> None:
    record = Record("r", None, (Turn("human", "What is 2 plus 2?"), Turn("gpt", "4")))
    example = encode_example(record, processor, None)
    prompt = processor.tokenizer(prompt_text("What is 2 plus 2?"))["input_ids"]
    assert example["input_ids"][: len(prompt)] == prompt
    assert example["pixel_values"] is None


def test_instruction_appended_once() -> None:
    assert with_instruction("Q?", "Answer briefly.") == "Q?\nAnswer briefly."
    assert with_instruction("Q?\nAnswer briefly.", "Answer briefly.") == "Q?\nAnswer briefly."


def test_collator_mixes_image_and_text_rows(processor, tiny_checkpoint: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    image_row = encode_example(two_turns(), processor, Image.new("RGB", (96, 96), "blue"))
    text_row = encode_example(
        Record("t", None, (Turn("human", "Hi?"), Turn("gpt", "hello"))), processor, None
    )
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([text_row, image_row])
    assert batch["pixel_values"].shape[0] == 1
    assert batch["labels"][0, len(text_row["input_ids"]) :].eq(IGNORE_INDEX).all()
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert torch.isfinite(model(**batch).loss)


def test_generation_prompts_left_padded(processor, tiny_benchmark: Path) -> None:
    records = load_records(tiny_benchmark / "text_qa" / "test.json")[:3]
    batch = encode_prompts([r.question for r in records], processor, None)
    assert (batch["attention_mask"][:, -1] == 1).all()
