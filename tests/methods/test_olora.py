"""`olora`: the term equals a numpy computation over real saved adapters, and a large λ1 drives
the new A orthogonal to the earlier ones (METHODS.md § olora)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llava_c_ray.config import TrainingConfig, job_from_dict
from llava_c_ray.methods import StageContext, TrainedStage, bind
from llava_c_ray.methods.olora import STATE, OLoRATerm, keep_subspace
from llava_c_ray.train.hooks import ModelSetup

TASKS = ["a", "b"]


def context(state: Path, index: int) -> StageContext:
    data = {
        "tasks": [{"name": t, "train": "x", "test": "y"} for t in TASKS],
        "method": {"name": "olora"},
    }
    job = job_from_dict(data, check_files=False)
    bound = bind(job)
    stages = tuple(bound.stages(TASKS))
    return StageContext(job, bound.params, stages[index - 1], stages, Path("s"), state, state)


def lora_model(tiny_checkpoint: Path, seed: int) -> torch.nn.Module:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    return ModelSetup()(model, TrainingConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0))


def first_stage_subspace(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """Stage 1 trained (random A), its adapter saved by peft, its subspace kept."""
    model = lora_model(tiny_checkpoint, seed=1)
    model.save_pretrained(tmp_path / "adapter")
    ctx = context(tmp_path / "method", 1)
    keep_subspace(ctx, TrainedStage(tmp_path / "m", tmp_path / "adapter"))
    return ctx.state_file(STATE)


def a_matrices(model) -> dict[str, torch.nn.Parameter]:
    return {n.split(".lora_A.")[0]: p for n, p in model.named_parameters() if ".lora_A." in n}


def test_term_equals_numpy(tiny_checkpoint: Path, tmp_path: Path) -> None:
    earlier_file = first_stage_subspace(tiny_checkpoint, tmp_path)
    earlier = a_matrices(lora_model(tiny_checkpoint, seed=1))
    model = lora_model(tiny_checkpoint, seed=2)
    term = OLoRATerm(earlier_file, lambda1=0.5, lambda2=0.1)
    term.setup(model)
    current = a_matrices(model)
    assert set(current) == set(earlier) and len(current) >= 12
    expected = sum(
        0.5 * np.abs(earlier[k].detach().numpy() @ current[k].detach().numpy().T).sum()
        + 0.1 * (current[k].detach().numpy() ** 2).sum()
        for k in current
    )
    assert np.isclose(term(None).item(), expected, rtol=1e-5)


def test_large_lambda1_makes_the_new_subspace_orthogonal(tiny_checkpoint: Path, tmp_path) -> None:
    earlier_file = first_stage_subspace(tiny_checkpoint, tmp_path)
    model = lora_model(tiny_checkpoint, seed=2)
    term = OLoRATerm(earlier_file, lambda1=100.0, lambda2=0.0)
    term.setup(model)
    pairs = [(a, e) for a, e in term.pairs if e is not None]

    def split(a: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
        basis = torch.linalg.qr(e.T).Q  # in × r: the span of the earlier rows
        inside = a @ basis @ basis.T
        return inside.norm().item(), (a - inside).norm().item()

    before = [split(a.detach(), e) for a, e in pairs]
    optimizer = torch.optim.SGD([a for a, _ in pairs], lr=1e-5)
    for _ in range(300):
        optimizer.zero_grad()
        term(None).backward()
        optimizer.step()
    after = [split(a.detach(), e) for a, e in pairs]
    for (inside0, outside0), (inside1, outside1) in zip(before, after, strict=True):
        assert inside1 < 0.1 * inside0
        assert abs(outside1 - outside0) < 1e-4 * max(outside0, 1.0)
