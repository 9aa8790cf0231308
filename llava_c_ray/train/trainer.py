"""transformers' Trainer with the UIR term in `compute_loss` (SPEC.md §2.1).

L = L_llava + λ·L_uir. L_llava needs the LM head's logits only where the next token is an answer
token (a few percent of a LLaVA sequence), so only those positions reach the vocabulary projection
(`loss_positions`): the same loss as the full logits, without their time and memory. The inquiry rows are the last `uir_rows` rows of each micro-batch (text only,
labels -100), so they share the one gradient-carrying forward with the training rows; the reference
hidden states come from a no-grad forward of the same rows with the LoRA adapters disabled — the
stage-start model, without a second copy of it.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from llava_c_ray.data.template import IGNORE_INDEX
from llava_c_ray.errors import LlavaCError
from llava_c_ray.train.uir import uir_loss


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DeepSpeed wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@torch.no_grad()
def reference_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Final hidden states of the stage-start model: the peft model with its adapters disabled.

    Only the language model runs (the inquiries are text): its `last_hidden_state` is the
    full model's `hidden_states[-1]`, without the LM head's logits over the vocabulary."""
    inner = unwrap(model)
    disabled = (
        inner.disable_adapter() if hasattr(inner, "disable_adapter") else contextlib.nullcontext()
    )
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    with disabled:
        return base.model.language_model(input_ids=input_ids, attention_mask=mask).last_hidden_state


class StageTrainer(Trainer):
    """Trainer that adds λ·L_uir, refuses non-finite losses and logs both loss terms and tokens/s."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean

    def __init__(self, *args: Any, uir_weight: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.uir_weight = uir_weight
        self.sums = {"llava_loss": 0.0, "uir_loss": 0.0, "micro_batches": 0, "tokens": 0}
        self.window_start = time.perf_counter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        uir_rows = int(inputs.pop("uir_rows", 0))
        use_uir = uir_rows > 0 and self.uir_weight > 0
        keep, targets = loss_positions(inputs["labels"])
        outputs = model(
            **inputs, logits_to_keep=keep, shift_labels=targets, output_hidden_states=use_uir
        )
        loss = outputs.loss
        self.sums["llava_loss"] += loss.item()
        if use_uir:
            ids, mask = inputs["input_ids"][-uir_rows:], inputs["attention_mask"][-uir_rows:]
            reference = reference_hidden(model, ids, mask)
            term = uir_loss(outputs.hidden_states[-1][-uir_rows:], reference, mask)
            self.sums["uir_loss"] += term.item()
            loss = loss + self.uir_weight * term
        if any_rank_non_finite(loss):
            raise NonFiniteLoss(loss.item(), self.state.global_step + 1)
        self.sums["micro_batches"] += 1
        self.sums["tokens"] += int(inputs["attention_mask"].sum())
        return (loss, outputs) if return_outputs else loss

    def get_train_dataloader(self) -> DataLoader:
        """The stream's own micro-batches: Ray Data already split the data between workers, so
        no sampler or accelerate sharding on top."""
        return DataLoader(self.train_dataset, batch_size=None)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        n = self.sums["micro_batches"]
        if n and "loss" in logs:
            elapsed = time.perf_counter() - self.window_start
            logs["llava_loss"] = self.sums["llava_loss"] / n
            logs["uir_loss"] = self.sums["uir_loss"] / n
            logs["tokens_per_s"] = self.sums["tokens"] / max(elapsed, 1e-9)
            self.sums = dict.fromkeys(self.sums, 0)
            self.sums["llava_loss"] = self.sums["uir_loss"] = 0.0
            self.window_start = time.perf_counter()
        super().log(logs, *args, **kwargs)


class LogFinalStep(TrainerCallback):
    """Logs the last optimizer step's window too when `log_every` does not divide the step count,
    so the stage's last loss is always on record. Runs on every rank: logging gathers the loss."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
