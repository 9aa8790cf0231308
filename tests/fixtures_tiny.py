"""Session fixtures: a small built-in benchmark and a tiny real LLaVA checkpoint built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llava_c_ray.data.synthetic.benchmark import generate_benchmark

    return generate_benchmark(tmp_path_factory.mktemp("bench") / "benchmark", seed=0, scale="test")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_benchmark: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llava_c_ray.builtin import build_tiny

    return build_tiny(tiny_benchmark, tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_tuned_pair(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A peft LoRA adapter with non-zero B (plus a changed projector) and its merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_c_ray.train.worker import language_model_linears

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tuned")
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=language_model_linears(model),
        modules_to_save=["multi_modal_projector"],
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "tuned")
    AutoProcessor.from_pretrained(tiny_checkpoint).save_pretrained(root / "tuned")
    return root / "adapter", root / "tuned"
