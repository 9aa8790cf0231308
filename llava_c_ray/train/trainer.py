"""transformers' Trainer with a method's loss terms in `compute_loss` and its step hooks.

L = L_llava + Σ_i w_i·term_i (e.g. λ·L_uir, SPEC.md §2.1). L_llava needs the LM head's logits only
where the next token is an answer token (a few percent of a LLaVA sequence), so only those
positions reach the vocabulary projection (`loss_positions`): the same loss as the full logits,
without their time and memory. Inquiry rows, when a term asked for them, are the last
`inquiry_rows` rows of each micro-batch (text only, labels -100), so they share the one
gradient-carrying forward with the training rows.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from llava_c_ray.data.template import IGNORE_INDEX
from llava_c_ray.errors import LlavaCError
from llava_c_ray.model.keys import parameter_names
from llava_c_ray.model.safetensors_io import LazyCheckpoint
from llava_c_ray.train.hooks import (
    ForwardPass,
    LossTerm,
    StepHook,
    final_hidden_states,
    unwrap,
)


class NonFiniteLoss(LlavaCError):
    """A loss that is NaN or infinite on some rank; raised on every rank at the same step."""

    def __init__(self, value: float, step: int):
        super().__init__(
            f"non-finite loss ({value}) at optimizer step {step}",
            fix="lower training.lr or check the data; the last good checkpoint is kept",
        )
        self.step = step


def any_rank_non_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is non-finite on this or any other rank (one scalar all-reduce), so that
    every rank stops at the same micro-batch instead of leaving the others in a collective."""
    flag = torch.tensor(0.0 if math.isfinite(loss.item()) else 1.0, device=loss.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag)
    return bool(flag.item())


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): the positions whose next token is labelled, and those next tokens.

    Passed as transformers' `logits_to_keep` (boolean mask) and `shift_labels`, the model's own
    causal-LM loss averages over exactly the tokens it averages over with full logits."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


class StageTrainer(Trainer):
    """Trainer that adds the method's loss terms to L_llava, refuses non-finite losses, and logs
    every term, the tokens/s and what the step hooks report."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean

    def __init__(
        self,
        *args: Any,
        losses: tuple[LossTerm, ...] = (),
        step_hooks: tuple[StepHook, ...] = (),
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.losses = losses
        self.step_hooks = step_hooks
        self.hidden_states = any(term.needs_hidden_states for term in losses)
        self.names = ["llava_loss", *(term.name for term in losses)]
        self.reset_window()

    def reset_window(self) -> None:
        self.sums = dict.fromkeys(self.names, 0.0) | {"micro_batches": 0, "tokens": 0}
        self.step_logs: dict[str, float] = {}
        self.window_start = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inquiry_rows = int(inputs.pop("inquiry_rows", 0))
        keep, targets = loss_positions(inputs["labels"])
        recording = final_hidden_states(model) if self.hidden_states else contextlib.nullcontext([])
        with recording as hidden:
            outputs = model(**inputs, logits_to_keep=keep, shift_labels=targets)
        loss = outputs.loss
        self.sums["llava_loss"] += loss.item()
        forward = ForwardPass(
            model, inputs, outputs, keep, inquiry_rows, hidden[0] if hidden else None
        )
        for term in self.losses:
            value = term(forward)
            if value is not None:
                self.sums[term.name] += value.item()
                loss = loss + term.weight * value
        if any_rank_non_finite(loss):
            raise NonFiniteLoss(loss.item(), self.state.global_step + 1)
        self.sums["micro_batches"] += 1
        self.sums["tokens"] += int(inputs["attention_mask"].sum())
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """A restarted worker's weights. peft models load their adapters by name (transformers'
        own path); a fully trained model is read through its checkpoint keys, which
        `save_pretrained` writes renamed (transformers' own path would match none and load
        nothing, silently)."""
        model = unwrap(model or self.model)
        if hasattr(model, "peft_config"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_saved_weights(model, Path(resume_from_checkpoint))

    def get_train_dataloader(self) -> DataLoader:
        """The stream's own micro-batches: Ray Data already split the data between workers, so
        no sampler or accelerate sharding on top."""
        return DataLoader(self.train_dataset, batch_size=None)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        n = self.sums["micro_batches"]
        if n and "loss" in logs:
            elapsed = time.perf_counter() - self.window_start
            logs |= {name: self.sums[name] / n for name in self.names}
            logs |= self.step_logs
            logs["tokens_per_s"] = self.sums["tokens"] / max(elapsed, 1e-9)
            self.reset_window()
        super().log(logs, *args, **kwargs)


class LogFinalStep(TrainerCallback):
    """Logs the last optimizer step's window too when `log_every` does not divide the step count,
    so the stage's last loss is always on record. Runs on every rank: logging gathers the loss."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


def load_saved_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Every parameter of `model` from a `save_pretrained` directory, through the checkpoint-key
    renaming; a parameter the checkpoint lacks is an error, not a silent skip."""
    saved = LazyCheckpoint(checkpoint)
    names = parameter_names(model, saved.keys())
    state = {names[key]: saved.get(key) for key in saved.keys()}
    missing = {name for name, _ in model.named_parameters()} - set(state)
    if missing:
        raise LlavaCError(
            f"the checkpoint lacks {len(missing)} parameters of the model, e.g. {sorted(missing)[:3]}",
            path=checkpoint,
            fix="resume from a checkpoint this stage wrote",
        )
    model.load_state_dict(state, strict=False)


def hook_state_file(checkpoint: Path, rank: int) -> Path:
    """Where a rank's step-hook state lives inside a Trainer checkpoint (per rank: under ZeRO a
    hook's state is sharded like the optimizer's)."""
    return Path(checkpoint) / f"step_hooks-rank{rank}.safetensors"


class StepHookRunner(TrainerCallback):
    """Calls the method's step hooks after every optimizer step (transformers calls
    `on_optimizer_step` right after `optimizer.step()`, before the gradients are zeroed — under
    DDP; DeepSpeed steps and frees them inside the backward pass) and saves their state into every
    checkpoint the Trainer writes, before Ray Train reports it."""

    def __init__(self, trainer: StageTrainer, rank: int):
        self.trainer, self.rank = trainer, rank

    def on_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.model
        for hook in self.trainer.step_hooks:
            for key, value in hook.on_optimizer_step(model).items():
                self.trainer.step_logs[f"{hook.name}_{key}"] = value

    def on_save(self, args, state, control, **kwargs):
        if not self.trainer.step_hooks:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        tensors = {
            f"{hook.name}.{key}": value.detach().contiguous().cpu()
            for hook in self.trainer.step_hooks
            for key, value in hook.state_dict().items()
        }
        save_file(tensors, str(hook_state_file(checkpoint, self.rank)))


def restore_step_hooks(hooks: tuple[StepHook, ...], checkpoint: Path, rank: int, model) -> None:
    """Give every hook the state it saved in `checkpoint` (a restarted worker)."""
    if not hooks:
        return
    saved = load_file(str(hook_state_file(checkpoint, rank)))
    for hook in hooks:
        prefix = f"{hook.name}."
        hook.load_state_dict(
            {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}, model
        )
