"""The per-worker training function that Ray Train runs: model set-up, Trainer, checkpoints, final save."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_c_ray.config import TrainingConfig
from llava_c_ray.train.spec import StageData, StageSpec

FINAL_MARKER = "final"
NON_FINITE_MARKER = "non_finite_loss_step"


def training_arguments(spec: StageSpec, output_dir: Path, rank: int, steps: int):
    """TrainingArguments from the stage spec. Built before the model is loaded: with ZeRO-3 this
    registers the DeepSpeed config so `from_pretrained` partitions weights instead of loading them
    whole on every rank."""
    from transformers import TrainingArguments

    t = spec.training
    bf16, fp16 = precision_flags(t, spec.use_gpu)
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.per_device_batch,
        gradient_accumulation_steps=spec.gradient_accumulation,
        max_steps=steps,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(t.schedule, t.schedule),
        warmup_steps=t.warmup_ratio,
        max_grad_norm=t.grad_clip,
        logging_steps=t.log_every,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.checkpoint_every,
        save_total_limit=2,
        report_to=["tensorboard"] if rank == 0 else [],
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not spec.use_gpu,
        ddp_backend=None if spec.use_gpu else "gloo",
        deepspeed=deepspeed_config(spec) if t.strategy == "deepspeed" else None,
        gradient_checkpointing=t.gradient_checkpointing,
        remove_unused_columns=False,
        # The data stream itself starts at the resumed micro-batch (`ShardStream.start`).
        ignore_data_skip=True,
        disable_tqdm=rank != 0,
        # Training the vision tower reaches its layers past `vision_feature_layer`, which get no
        # gradient.
        ddp_find_unused_parameters=t.full_finetune and t.train_vision_tower,
        # The model's buffers (rotary frequencies, position ids) never change: no per-step broadcast.
        ddp_broadcast_buffers=False,
        # `compute_loss` returns each rank's mean: the label-token count gathered across ranks
        # every step would be unused.
        average_tokens_across_devices=False,
    )


def precision_flags(t: TrainingConfig, use_gpu: bool) -> tuple[bool, bool]:
    precision = t.precision if t.precision != "auto" else ("bf16" if use_gpu else "fp32")
    return precision == "bf16", precision == "fp16"


def deepspeed_config(spec: StageSpec) -> dict[str, Any]:
    """A ZeRO-2/3 config with the job's micro batch, accumulation, clipping and precision."""
    t = spec.training
    bf16, fp16 = precision_flags(t, spec.use_gpu)
    zero: dict[str, Any] = {
        "stage": t.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    if t.zero_stage == 3:
        zero |= {"stage3_gather_16bit_weights_on_model_save": True}
    return {
        "train_micro_batch_size_per_gpu": t.per_device_batch,
        "gradient_accumulation_steps": spec.gradient_accumulation,
        "train_batch_size": t.global_batch,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": fp16},
        "zero_optimization": zero,
    }


def build_optimizer(model: nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW with the projector in its own group at `projector_lr`."""
    projector, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (projector if "multi_modal_projector" in name else rest).append(param)
    groups = [{"params": rest, "lr": t.lr}]
    if projector:
        groups.append({"params": projector, "lr": t.effective_projector_lr})
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def load_model(spec: StageSpec):
    """The stage's model, set up by its method. `training.seed` seeds the set-up too: adapters
    (LoRA's A, experts, pools) are drawn here, before the Trainer seeds, so without it two runs
    of one job started from different initial weights."""
    from transformers import LlavaForConditionalGeneration, set_seed

    bf16, fp16 = precision_flags(spec.training, spec.use_gpu)
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(spec.init, dtype=dtype)
    set_seed(spec.training.seed)
    model = spec.setup(model, spec.training)
    for term in spec.losses:
        term.setup(model)
    return model


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on every Ray Train worker: train, checkpoint through Ray Train, save θ_t on rank 0.

    Returns None, or after a non-finite loss (on every rank at the same step) its step and error.
    The worker's scratch directory (restored checkpoint, Trainer output) goes with it.
    """
    work = Path(tempfile.mkdtemp(prefix="llava-c-train-"))
    try:
        return train_in(work, config)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_in(work: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoProcessor

    from llava_c_ray.train.data import StageCollator
    from llava_c_ray.train.progress import PROGRESS_FILE, ProgressFile
    from llava_c_ray.train.stream import RowEncoder, ShardStream
    from llava_c_ray.train.trainer import (
        LogFinalStep,
        NonFiniteLoss,
        StageTrainer,
        StepHookRunner,
        restore_step_hooks,
    )

    spec: StageSpec = config["spec"]
    data: StageData = config["data"]
    rank = ray.train.get_context().get_world_rank()
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(spec.out / "tensorboard")
    resume, resumed_from = resume_dir(ray.train.get_checkpoint(), work)
    args = training_arguments(spec, work / "trainer", rank, config["steps"])
    processor = AutoProcessor.from_pretrained(spec.init)
    model = load_model(spec)
    if resume is not None:
        restore_step_hooks(spec.step_hooks, Path(resume), rank, model)
    trainer = StageTrainer(
        model=model,
        args=args,
        train_dataset=ShardStream(
            ray.train.get_dataset_shard("train"),
            batch_size=spec.training.per_device_batch,
            encode=RowEncoder(
                processor, spec.template, spec.training.max_length, data.instructions
            ),
            collate=StageCollator(
                processor.tokenizer.pad_token_id,
                inquiry_rows(spec, processor, f"{spec.training.seed}-{rank}-{resumed_from}"),
                spec.inquiry_rows,
            ),
            seed=spec.training.seed,
            start=resumed_from * spec.gradient_accumulation,
            shuffle_buffer=spec.training.shuffle_buffer,
            prefetch_batches=spec.training.prefetch_batches,
            group_by_length=spec.training.group_by_length,
            encode_cache_mb=spec.training.encode_cache_mb,
        ),
        optimizers=(build_optimizer(model, spec.training), None),
        callbacks=[LogFinalStep()]
        + ([ProgressFile(spec.out / PROGRESS_FILE)] if rank == 0 else []),
        losses=spec.losses,
        step_hooks=spec.step_hooks,
    )
    # Hook state goes into each checkpoint before Ray Train reports (uploads) it.
    trainer.add_callback(StepHookRunner(trainer, rank))
    trainer.add_callback(RayTrainReportCallback())
    trainer = prepare_trainer(trainer)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLoss as exc:
        # Returned, not raised: a raised error would be retried from the same checkpoint into
        # the same NaN `max_failures` times. The driver turns rank 0's return value into the error.
        return {NON_FINITE_MARKER: exc.step, "error": str(exc)}
    report_final(trainer, spec, processor, rank, work, resumed_from)
    return None


def inquiry_rows(spec: StageSpec, processor, seed: str):
    """The stage's packed inquiry rows, or None when no loss term needs them. A resumed worker
    draws a fresh order (`seed` names the resumed step): inquiries are regularisation samples,
    not a data position to restore."""
    from llava_c_ray.train.data import InquiryRows

    if spec.inquiry is None:
        return None
    return InquiryRows(spec.inquiry, processor, spec.template, spec.inquiries_per_row, seed)


def resume_dir(checkpoint, work: Path) -> tuple[str | None, int]:
    """The Trainer checkpoint inside the latest Ray Train checkpoint (downloaded) and its step."""
    if checkpoint is None:
        return None, 0
    local = Path(checkpoint.to_directory(str(work / "resume")))
    inner = local / "checkpoint"
    if not inner.is_dir():
        return None, 0
    step = int(json.loads((inner / "trainer_state.json").read_text())["global_step"])
    print(f"[llava-c] resuming stage from checkpoint at step {step}", flush=True)
    return str(inner), step


def report_final(
    trainer, spec: StageSpec, processor, rank: int, work: Path, resumed_from: int
) -> None:
    """Rank 0 saves the adapter and the merged θ_t; every rank reports, rank 0 with the checkpoint."""
    import ray.train

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    metrics = {
        FINAL_MARKER: 1,
        "step": trainer.state.global_step,
        "resumed_from": resumed_from,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
    for hook in spec.step_hooks:
        hook.finalize(trainer.model)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    final = work / "final"
    save_outputs(trainer.model, spec, processor, final)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)))


def save_outputs(model: nn.Module, spec: StageSpec, processor, final: Path) -> None:
    """The method's outputs under `final` (by default `adapter/` and the merged `model/`), with the
    processor and the start checkpoint's other JSON files beside the model — but not its shard
    index: a sharded start checkpoint's `*.index.json` names shards the model written here lacks."""
    from llava_c_ray.train.hooks import unwrap

    spec.setup.save(unwrap(model), final)
    processor.save_pretrained(final / "model")
    for extra in Path(spec.init).glob("*.json"):
        if extra.name.endswith(".index.json"):
            continue
        if not (final / "model" / extra.name).exists():
            shutil.copy2(extra, final / "model" / extra.name)
