"""The default model set-up: what a stage trains (LoRA + projector, or the whole model but the tower)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlavaForConditionalGeneration

from llava_c_ray.config import TrainingConfig
from llava_c_ray.train.hooks import ModelSetup


def trainable_parts(model) -> set[str]:
    parts = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            parts.add(
                next(
                    p
                    for p in ("vision_tower", "projector", "language_model", "lm_head")
                    if p in name
                )
            )
    return parts


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ({"full_finetune": True}, {"projector", "language_model", "lm_head"}),
        (
            {"full_finetune": True, "train_vision_tower": True},
            {"vision_tower", "projector", "language_model", "lm_head"},
        ),
        ({"lora_r": 4}, {"projector", "language_model"}),
    ],
)
def test_the_vision_tower_trains_only_when_asked(
    tiny_checkpoint: Path, training: dict, expected: set[str]
) -> None:
    model = ModelSetup()(
        LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint), TrainingConfig(**training)
    )
    assert trainable_parts(model) == expected
