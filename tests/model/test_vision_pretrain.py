"""Contrastive pre-training of the vision tower: the loss, its targets, and the written checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_c_ray.model.vision_pretrain import (
    RECORD,
    VisionRecipe,
    contrastive_loss,
    contrastive_targets,
    pretrain_vision_tower,
)


def test_targets_are_uniform_over_rows_with_the_same_caption() -> None:
    targets = contrastive_targets(["a", "b", "a", "c"])
    expected = torch.tensor(
        [[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]], dtype=torch.float
    )
    assert torch.equal(targets, expected)


def test_loss_equals_clip_cross_entropy_when_captions_are_distinct() -> None:
    torch.manual_seed(0)
    image, text = torch.randn(5, 8), torch.randn(5, 8)
    scale = torch.tensor(7.0)
    logits = (
        scale
        * torch.nn.functional.normalize(image, dim=-1)
        @ torch.nn.functional.normalize(text, dim=-1).T
    )
    labels = torch.arange(5)
    clip = (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    ) / 2
    ours = contrastive_loss(image, text, scale, contrastive_targets(list("abcde")))
    assert torch.allclose(ours, clip)


def test_loss_is_low_when_pairs_match_and_high_when_they_do_not() -> None:
    emb = torch.eye(4)
    targets = contrastive_targets(list("abcd"))
    scale = torch.tensor(50.0)
    assert contrastive_loss(emb, emb, scale, targets) < 0.01
    assert contrastive_loss(emb, emb.roll(1, 0), scale, targets) > 10


@pytest.mark.integration
def test_pretraining_changes_only_the_vision_tower_and_lowers_the_loss(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    recipe = replace(VisionRecipe(), groups=64, steps=60, batch_groups=16, warmup_steps=5)
    out = pretrain_vision_tower(tiny_checkpoint, tmp_path / "vision", recipe)
    before = load_file(tiny_checkpoint / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("vision_tower" in k for k in changed)
    record = json.loads((out / RECORD).read_text())
    losses = record["loss_every_50_steps"]
    assert losses[-1] < 0.7 * losses[0]
    files = {p.name for p in tiny_checkpoint.iterdir()}
    assert {p.name for p in out.iterdir()} == files | {RECORD}
