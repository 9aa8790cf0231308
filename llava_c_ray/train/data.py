"""Inquiry rows of a stage: unlabeled prompts packed into rows and appended to every micro-batch."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from llava_c_ray.data.collate import LlavaCollator
from llava_c_ray.data.records import load_records
from llava_c_ray.data.template import IGNORE_INDEX, Template, prompt_text
from llava_c_ray.train.uir import pack_row


class InquiryRows:
    """Unlabeled text-only inquiries as prompts, packed several to a row, handed out cyclically."""

    def __init__(
        self, path: Path, processor: Any, template: Template, per_row: int, seed: int | str
    ):
        records = load_records(path, None, require_answers=False, check_images=False)
        prompts = [prompt_text(r.question, template) for r in records]
        random.Random(seed).shuffle(prompts)
        self.sequences = processor.tokenizer(prompts)["input_ids"]
        self.per_row = per_row
        self.position = 0

    def take(self, count: int, budget: int) -> list[list[int]]:
        """`count` packed rows of at most `budget` tokens each."""
        rows = []
        for _ in range(count):
            row, taken = pack_row(self.sequences, self.position, budget, self.per_row)
            self.position = (self.position + taken) % len(self.sequences)
            rows.append(row)
        return rows


class StageCollator:
    """Pads a micro-batch and appends `rows` inquiry rows (labels -100), counted by `inquiry_rows`.

    The inquiry rows ride in the same forward pass as the training rows: DDP and ZeRO allow one
    gradient-carrying forward per step.
    """

    def __init__(self, pad_token_id: int, inquiries: InquiryRows | None, rows: int):
        self.collate = LlavaCollator(pad_token_id)
        self.inquiries, self.rows = inquiries, rows

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        extra = []
        if self.inquiries is not None:
            extra = [
                {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "pixel_values": None}
                for ids in self.inquiries.take(
                    self.rows, max(len(e["input_ids"]) for e in examples)
                )
            ]
        batch = self.collate(examples + extra)
        batch["inquiry_rows"] = torch.tensor(len(extra))
        return batch
