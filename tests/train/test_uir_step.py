"""A UIR training step's loss and gradients are SPEC.md §2.1's formula, computed the plain way.

The trainer's path takes shortcuts for speed (the final hidden states recorded by a hook instead of
`output_hidden_states=True`, the reference pass cut to the inquiries' valid width, the adapters
switched by the tuner's own switch); the reference computation here takes none of them: every
layer's hidden states, peft's `disable_adapter()`, the full padded width, the full LLaVA model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from llava_c_ray.data.template import IGNORE_INDEX
from llava_c_ray.methods.uir import UIRTerm
from llava_c_ray.train.trainer import StageTrainer
from tests.methods.test_distillation import adapted
from tests.train.test_loss_positions import batch

INQUIRY_LENGTHS = (7, 4)  # shorter than the training rows: the rows carry padding past them


def batch_with_inquiries(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    """Three training rows and two right-padded unlabeled inquiry rows, as `StageCollator` lays
    them out."""
    inputs = batch(tiny_checkpoint)
    width = inputs["input_ids"].shape[1]
    rows = len(INQUIRY_LENGTHS)
    ids = torch.zeros((rows, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    generator = torch.Generator().manual_seed(2)
    for row, length in enumerate(INQUIRY_LENGTHS):
        ids[row, :length] = torch.randint(5, 200, (length,), generator=generator)
        mask[row, :length] = 1
    return {
        "input_ids": torch.cat([inputs["input_ids"], ids]),
        "attention_mask": torch.cat([inputs["attention_mask"], mask]),
        "labels": torch.cat([inputs["labels"], torch.full_like(ids, IGNORE_INDEX)]),
        "pixel_values": inputs["pixel_values"],
        "inquiry_rows": torch.tensor(rows),
    }


def spec_loss(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_llava + L_uir, L_uir) by the SPEC formula: mean over valid inquiry tokens and hidden
    dimensions of the squared difference of the final-layer hidden states."""
    rows = int(inputs["inquiry_rows"])
    plain = {k: v for k, v in inputs.items() if k != "inquiry_rows"}
    outputs = model(**plain, output_hidden_states=True)
    ids, mask = plain["input_ids"][-rows:], plain["attention_mask"][-rows:]
    with torch.no_grad(), model.disable_adapter():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    difference = outputs.hidden_states[-1][-rows:] - reference.hidden_states[-1]
    uir = (difference[mask.bool()] ** 2).mean()
    return outputs.loss + uir, uir


def test_uir_step_is_the_spec_formula(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = adapted(tiny_checkpoint, moved=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    inputs = batch_with_inquiries(tiny_checkpoint)
    trainer = StageTrainer(
        model=model,
        args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
        losses=(UIRTerm(1.0),),
    )
    loss = trainer.compute_loss(model, dict(inputs))
    grads = torch.autograd.grad(loss, trained, allow_unused=True)
    # the reference pass switched the adapters back on, with their gradients
    assert [p for p in model.parameters() if p.requires_grad] == trained

    expected, uir = spec_loss(model, inputs)
    expected_grads = torch.autograd.grad(expected, trained, allow_unused=True)
    assert uir.item() > 1e-4  # the model has moved: the term is not trivially zero
    assert trainer.sums["uir_loss"] == pytest.approx(uir.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
