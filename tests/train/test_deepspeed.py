"""The GPU path: the ZeRO config generated from the job, registered before the model is loaded.

The config and its registration are checked on CPU; a real ZeRO-3 stage needs a GPU.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest

from llava_c_ray.config import TrainingConfig
from llava_c_ray.train.spec import StageSpec
from llava_c_ray.train.worker import deepspeed_config, training_arguments


def gpu_spec(**training) -> StageSpec:
    settings = {"strategy": "deepspeed", "per_device_batch": 2, "global_batch": 16, **training}
    return StageSpec(
        name="t",
        init=Path("."),
        out=Path("."),
        train_files=(),
        training=TrainingConfig(**settings),
        num_workers=2,
        use_gpu=True,
    )


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_config_follows_the_job(stage: int) -> None:
    config = deepspeed_config(gpu_spec(zero_stage=stage, grad_clip=0.5))
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4  # 16 / (2 per device × 2 workers)
    assert config["train_batch_size"] == 16
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    gathers = config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save")
    assert gathers is (True if stage == 3 else None)  # θ_t is saved whole from ZeRO-3


def test_zero3_is_registered_when_the_arguments_are_built(tmp_path: Path) -> None:
    """transformers partitions `from_pretrained` across ranks only if the ZeRO-3 config is
    registered first; the worker builds its TrainingArguments before loading the model."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    # bf16 needs a GPU to validate; the registration is the same in fp32.
    spec = gpu_spec(zero_stage=3, precision="fp32")
    assert not is_deepspeed_zero3_enabled()
    args = training_arguments(spec, tmp_path, rank=0, steps=10)
    assert is_deepspeed_zero3_enabled()
    assert args.hf_deepspeed_config.config["train_batch_size"] == 16
    del args
    gc.collect()
    assert not is_deepspeed_zero3_enabled()


@pytest.mark.gpu
@pytest.mark.integration
def test_zero3_stage_trains_on_gpus(ray_cluster, tiny_benchmark, tiny_checkpoint, tmp_path) -> None:
    from transformers import LlavaForConditionalGeneration

    from llava_c_ray.train.stage import run_stage
    from tests.train.test_stage import spec_for, stage_job

    job = stage_job(tiny_benchmark, strategy="deepspeed", zero_stage=3, precision="bf16")
    spec = dataclasses.replace(
        spec_for(job, tiny_checkpoint, tmp_path / "out"), num_workers=1, use_gpu=True
    )
    result = run_stage(spec)
    assert result.steps == 6
    LlavaForConditionalGeneration.from_pretrained(result.model_dir)
