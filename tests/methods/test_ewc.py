"""`ewc`: the Fisher equals a per-row reference loop, the penalty is 0 at the stage start, equals
(1/2)·Σ F·(W − W*)² of the merged weights, and its gradient pulls toward θ* (METHODS.md § ewc)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava_c_ray.config import TrainingConfig, job_from_dict
from llava_c_ray.methods.ewc import (
    EWCTerm,
    diagonal_fisher,
    encoded_batches,
    fisher_rows,
    penalised,
)
from llava_c_ray.train.hooks import ModelSetup
from llava_c_ray.train.spec import TrainFile


def start_model(tiny_checkpoint: Path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)


def rows(tiny_benchmark: Path, count: int):
    task = job_from_dict({"benchmark": {"path": str(tiny_benchmark)}}).tasks[0]
    return fisher_rows([TrainFile(task.train, task.image_folder, task.instruction)], count, 0)


def batches(tiny_checkpoint: Path, tiny_benchmark: Path, count: int) -> list[dict]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    return list(encoded_batches(rows(tiny_benchmark, count), processor, "vicuna_v1", 512))


def test_fisher_equals_a_per_row_reference_loop(tiny_checkpoint, tiny_benchmark) -> None:
    model = start_model(tiny_checkpoint)
    names = penalised(model)
    assert any("q_proj" in n for n in names) and any("multi_modal_projector" in n for n in names)
    data = batches(tiny_checkpoint, tiny_benchmark, 3)
    assert any("pixel_values" in b for b in data)
    fisher = diagonal_fisher(model, data, names)
    params = dict(start_model(tiny_checkpoint).named_parameters())
    expected = {n: torch.zeros_like(params[n]) for n in names}
    for batch in data:
        model_ref = start_model(tiny_checkpoint)
        ref = dict(model_ref.named_parameters())
        grads = torch.autograd.grad(model_ref(**batch).loss, [ref[n] for n in names])
        for name, grad in zip(names, grads, strict=True):
            expected[name] += grad**2 / len(data)
    for name in names:
        assert torch.allclose(fisher[name], expected[name], rtol=1e-4, atol=1e-12), name
    assert sum(float(f.sum()) for f in fisher.values()) > 0


def peft_model(tiny_checkpoint: Path, moved: bool):
    torch.manual_seed(0)
    model = ModelSetup()(
        start_model(tiny_checkpoint), TrainingConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    )
    if moved:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture
def fisher(tiny_checkpoint: Path, tmp_path: Path) -> tuple[Path, dict]:
    gen = torch.Generator().manual_seed(3)
    model = start_model(tiny_checkpoint)
    params = dict(model.named_parameters())
    values = {n: torch.rand(params[n].shape, generator=gen) for n in penalised(model)}
    save_file(values, str(tmp_path / "fisher.safetensors"))
    return tmp_path / "fisher.safetensors", values


def test_penalty_is_zero_at_the_stage_start(tiny_checkpoint: Path, fisher) -> None:
    term = EWCTerm(fisher[0], weight=1e4)
    term.setup(peft_model(tiny_checkpoint, moved=False))
    assert term(None).item() == 0.0


def test_penalty_is_half_the_fisher_weighted_change_of_the_merged_weights(
    tiny_checkpoint: Path, fisher
) -> None:
    model = peft_model(tiny_checkpoint, moved=True)
    term = EWCTerm(fisher[0], weight=1e4)
    term.setup(model)
    value = term(None)
    start = dict(start_model(tiny_checkpoint).named_parameters())
    with torch.no_grad():
        merged = dict(model.merge_and_unload().named_parameters())
    expected = 0.5 * sum((f * (merged[n] - start[n]) ** 2).sum() for n, f in fisher[1].items())
    assert torch.allclose(value, expected, rtol=1e-4)


def test_gradient_pulls_toward_the_stage_start(tiny_checkpoint: Path, fisher) -> None:
    model = peft_model(tiny_checkpoint, moved=True)
    term = EWCTerm(fisher[0], weight=1e4)
    term.setup(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    before = term(None)
    before.backward()
    for current, start, fisher_value in term.full:
        assert torch.allclose(current.grad, fisher_value * (current - start).detach(), atol=1e-6)
    with torch.no_grad():
        for param in trained:
            param -= 0.01 * param.grad
    assert term(None) < before
