"""Padding encoded examples into a batch; image and text-only rows may be mixed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llava_c_ray.data.template import IGNORE_INDEX


@dataclass
class LlavaCollator:
    """Right-pads input_ids / labels / attention_mask; stacks pixel_values of the rows with images.

    LLaVA scatters image features into the `<image>` positions in batch order, so the stacked
    pixel_values of the rows that have an image line up with the image tokens.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.as_tensor(example["input_ids"])
            labels[row, :n] = torch.as_tensor(example["labels"])
            mask[row, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pixels = [e["pixel_values"] for e in examples if e.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.stack([torch.as_tensor(p) for p in pixels])
        return batch
