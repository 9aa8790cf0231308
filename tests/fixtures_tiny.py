"""Session fixtures: a small built-in benchmark and a tiny real LLaVA checkpoint built from it."""

from __future__ import annotations

from pathlib import Path

import pytest


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
    from llava_c_ray.model.tiny import random_lora_adapter

    return random_lora_adapter(tiny_checkpoint, tmp_path_factory.mktemp("tuned"))
