"""`fkl` and `lwf`: their terms against hand computations on the tiny model (METHODS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava_c_ray.config import TrainingConfig
from llava_c_ray.methods.distill import distillation_kl
from llava_c_ray.methods.fkl import FKLTerm
from llava_c_ray.methods.lwf import LwFTerm, teacher_logits
from llava_c_ray.train.hooks import ForwardPass, ModelSetup
from llava_c_ray.train.trainer import loss_positions
from tests.train.test_loss_positions import batch


def adapted(tiny_checkpoint: Path, moved: bool) -> torch.nn.Module:
    """The tiny model with the stage's LoRA (fresh: B = 0), optionally moved off the start point
    (LoRA B and the trained projector copy perturbed)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model = ModelSetup()(model, TrainingConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    if moved:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    param.add_(0.3 * torch.randn_like(param))
    return model


def start_model(tiny_checkpoint: Path) -> torch.nn.Module:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)


def inquiry_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return ids, mask


def inquiry_forward(model) -> ForwardPass:
    ids, mask = inquiry_batch()
    outputs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    inputs = {"input_ids": ids, "attention_mask": mask}
    return ForwardPass(model, inputs, outputs, torch.zeros_like(ids, dtype=torch.bool), 2)


def test_distillation_kl_is_the_textbook_sum() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 7, generator=gen), torch.randn(4, 7, generator=gen)
    for t in (1.0, 2.0):
        p, q = torch.softmax(teacher / t, -1), torch.softmax(student / t, -1)
        expected = (p * (p.log() - q.log())).sum(-1).mean()
        assert torch.allclose(distillation_kl(student, teacher, t), expected, atol=1e-6)
    assert distillation_kl(student, student) == pytest.approx(0.0, abs=1e-7)


def test_fkl_is_zero_at_the_stage_start(tiny_checkpoint: Path) -> None:
    model = adapted(tiny_checkpoint, moved=False)
    assert FKLTerm()(inquiry_forward(model)).item() == pytest.approx(0.0, abs=1e-7)


def test_fkl_equals_a_hand_computed_kl_on_two_rows(tiny_checkpoint: Path) -> None:
    model = adapted(tiny_checkpoint, moved=True)
    value = FKLTerm()(inquiry_forward(model))
    ids, mask = inquiry_batch()
    with torch.no_grad():
        student = model(input_ids=ids, attention_mask=mask).logits
        teacher = start_model(tiny_checkpoint)(input_ids=ids, attention_mask=mask).logits
    terms = []
    for row in range(2):
        for pos in range(int(mask[row].sum())):
            p = torch.softmax(teacher[row, pos], -1)
            q = torch.softmax(student[row, pos], -1)
            terms.append((p * (p.log() - q.log())).sum())
    expected = torch.stack(terms).mean()
    assert expected > 1e-4
    assert torch.allclose(value, expected, rtol=1e-4)


def training_forward(model, tiny_checkpoint: Path) -> ForwardPass:
    inputs = batch(tiny_checkpoint)
    keep, targets = loss_positions(inputs["labels"])
    outputs = model(**inputs, logits_to_keep=keep, shift_labels=targets)
    return ForwardPass(model, inputs, outputs, keep, 0)


def test_lwf_teacher_is_the_start_checkpoint(tiny_checkpoint: Path) -> None:
    """The teacher uses the start weights and the start projector, not the trained copies."""
    forward = training_forward(adapted(tiny_checkpoint, moved=True), tiny_checkpoint)
    inputs = {k: v for k, v in batch(tiny_checkpoint).items() if k != "labels"}
    with torch.no_grad():
        expected = start_model(tiny_checkpoint)(**inputs, logits_to_keep=forward.keep).logits
    teacher = teacher_logits(forward)
    assert torch.allclose(teacher, expected, atol=1e-5)
    assert not torch.allclose(forward.outputs.logits, expected, atol=1e-3)


def test_lwf_term_is_t_squared_kl_and_zero_at_the_start(tiny_checkpoint: Path) -> None:
    fresh = training_forward(adapted(tiny_checkpoint, moved=False), tiny_checkpoint)
    assert LwFTerm()(fresh).item() == pytest.approx(0.0, abs=1e-6)
    moved = training_forward(adapted(tiny_checkpoint, moved=True), tiny_checkpoint)
    student, teacher = moved.outputs.logits.detach(), teacher_logits(moved)
    p, q = torch.softmax(teacher / 2, -1), torch.softmax(student / 2, -1)
    expected = 4 * (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(LwFTerm(temperature=2.0)(moved), expected, rtol=1e-4)
