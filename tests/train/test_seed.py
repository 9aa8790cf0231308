"""`training.seed` fixes the stage's whole start, adapters included (they are drawn before the
Trainer seeds)."""

from __future__ import annotations

from pathlib import Path

import torch

from llava_c_ray.config import TrainingConfig
from llava_c_ray.train.spec import StageSpec
from llava_c_ray.train.worker import load_model


def lora_weights(checkpoint: Path, seed: int) -> dict[str, torch.Tensor]:
    spec = StageSpec(
        name="t",
        init=checkpoint,
        out=Path("."),
        train_files=(),
        training=TrainingConfig(seed=seed, precision="fp32"),
    )
    model = load_model(spec)
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_A" in k}


def test_the_seed_fixes_the_adapters_and_another_seed_changes_them(tiny_checkpoint: Path) -> None:
    torch.manual_seed(123)
    first = lora_weights(tiny_checkpoint, seed=7)
    torch.manual_seed(456)
    again = lora_weights(tiny_checkpoint, seed=7)
    other = lora_weights(tiny_checkpoint, seed=8)
    assert first and first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)
