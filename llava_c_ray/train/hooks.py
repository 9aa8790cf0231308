"""What a continual-learning method plugs into a training worker.

A method (llava_c_ray/methods) builds these objects on the driver; they travel to the Ray Train
workers inside the `StageSpec` (so they must pickle) and are called there:

- a `ModelSetup` turns the loaded start checkpoint into the model to train (default: LoRA on the
  language model, projector in full, vision tower frozen — SPEC.md §2.3);
- `LossTerm`s are added to L_llava in `StageTrainer.compute_loss`, each weighted and logged under
  its name (console, TensorBoard);
- `StepHook`s run after every optimizer step with the clipped, averaged gradients still in place,
  keep state that is saved with every stage checkpoint (a restarted worker resumes it), and may
  change the model before it is saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_c_ray.config import TrainingConfig
from llava_c_ray.model.keys import language_model_linears


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DeepSpeed wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def llava_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed / peft wrappers."""
    inner = unwrap(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


@contextlib.contextmanager
def stage_start_model(model: nn.Module) -> Iterator[nn.Module]:
    """The stage-start model θ̃_{t-1} without a second copy: the peft model with its adapters
    (and `modules_to_save` copies, e.g. the projector) disabled, in no-grad mode."""
    with torch.no_grad(), adapters_disabled(unwrap(model)):
        yield llava_model(model)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """peft's adapters switched off inside the block (a model without adapters is left as it is).

    The tuner's own `disable_adapter_layers` rather than `PeftModel.disable_adapter()`: that one
    first surveys the model (`get_model_status` counts every parameter and inspects every adapter
    layer), a cost on every micro-step that UIR and LwF pay for the same switch."""
    tuner = getattr(model, "base_model", None)
    if not hasattr(model, "disable_adapter"):
        yield
    elif not hasattr(tuner, "disable_adapter_layers"):  # prompt learning: no layers to switch
        with model.disable_adapter():
            yield
    else:
        tuner.disable_adapter_layers()
        try:
            yield
        finally:
            tuner.enable_adapter_layers()


@contextlib.contextmanager
def final_hidden_states(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The language model's final hidden states (its `last_hidden_state`, which is the full
    model's `hidden_states[-1]`) of every forward inside the block, appended to the yielded list.

    One tensor the forward computes anyway, instead of `output_hidden_states=True`, which keeps
    every layer of both towers (the frozen vision tower's too) until the loss is computed."""
    recorded: list[torch.Tensor] = []
    language_model = llava_model(model).model.language_model
    handle = language_model.register_forward_hook(
        lambda _module, _args, output: recorded.append(output.last_hidden_state)
    )
    try:
        yield recorded
    finally:
        handle.remove()


@dataclass
class ForwardPass:
    """One micro-batch's gradient-carrying forward, as a loss term sees it.

    The last `inquiry_rows` rows of `inputs` are unlabeled text inquiries (when some term asked for
    them); `outputs.logits` holds the LM head's logits only where `keep` is true (the positions
    whose next token is an answer token), flattened in row-major order; `hidden` holds the
    language model's final hidden states when some term asked for them.
    """

    model: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: Any
    keep: torch.Tensor
    inquiry_rows: int
    hidden: torch.Tensor | None = None

    @property
    def final_hidden(self) -> torch.Tensor:
        """Final-layer hidden states (rows, tokens, d): `hidden`, or the last of
        `outputs.hidden_states` when the forward was run with `output_hidden_states=True`."""
        return self.hidden if self.hidden is not None else self.outputs.hidden_states[-1]

    def inquiries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the inquiry rows."""
        rows = self.inquiry_rows
        return self.inputs["input_ids"][-rows:], self.inputs["attention_mask"][-rows:]

    def training_inputs(self) -> dict[str, torch.Tensor]:
        """The micro-batch without its inquiry rows (what the model's labels belong to)."""
        rows = self.inquiry_rows
        if rows == 0:
            return self.inputs
        return {k: v if k == "pixel_values" else v[:-rows] for k, v in self.inputs.items()}


class LossTerm:
    """A weighted term of the stage loss, logged as `name`. Subclasses set the class attributes
    they need and implement `__call__`; `setup` runs once on the worker after the model is built."""

    name: str = "term"
    needs_inquiries: bool = False
    """Append packed unlabeled inquiry rows (the job's `inquiry` set) to every micro-batch."""
    needs_hidden_states: bool = False
    """Record the language model's final hidden states in the forward (`ForwardPass.hidden`)."""
    weight: float = 1.0

    def setup(self, model: nn.Module) -> None:
        """Load what the term needs on the worker (reference tensors, earlier adapters)."""

    def __call__(self, forward: ForwardPass) -> torch.Tensor | None:
        """The unweighted term for this micro-batch (None: nothing to add this time)."""
        raise NotImplementedError


class StepHook:
    """Runs after every optimizer step. Under DDP the gradients are still in place (clipped,
    averaged, not yet zeroed); under DeepSpeed the engine has already stepped and released them
    inside the backward pass, so a hook that needs them there registers itself on DeepSpeed's inner
    optimizer (see `llaca`)."""

    name: str = "hook"

    def on_optimizer_step(self, model: nn.Module) -> dict[str, float]:
        """Update the hook's state; returns numbers to log."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors saved with every stage checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        """Restore the state saved by `state_dict` (a restarted worker)."""

    def finalize(self, model: nn.Module) -> None:
        """Change the trained model before it is saved (e.g. θ ← θ*)."""


class ModelSetup:
    """How the loaded start checkpoint becomes the model a stage trains, and how the trained model
    is saved. Default: a fresh LoRA on the language model's linears, the projector trained in
    full, the vision tower frozen (SPEC.md §2.3) — or the whole language model and the projector
    with `training.full_finetune` (the vision tower too with `training.train_vision_tower`);
    saved as `adapter/` (peft) and `model/` (merged, a standard HF checkpoint)."""

    def __call__(self, model: nn.Module, training: TrainingConfig) -> nn.Module:
        if not training.full_finetune:
            return add_lora(model, training)
        model.model.vision_tower.requires_grad_(training.train_vision_tower)
        return model

    def save(self, model: nn.Module, final: Path) -> None:
        """Write the stage's outputs under `final`: `model/` must be a checkpoint the method's
        `load_model` loads (sidecar files of the method go inside it)."""
        if hasattr(model, "merge_and_unload"):
            model.save_pretrained(final / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(final / "model", max_shard_size="2GB")


def add_lora(model: nn.Module, t: TrainingConfig) -> nn.Module:
    """peft LoRA on the language model's linears (`target_modules` picks among them)."""
    from peft import LoraConfig, get_peft_model

    linears = language_model_linears(model)
    if t.target_modules != "all-linear":
        linears = [n for n in linears if n.rsplit(".", 1)[-1] in t.target_modules]
    config = LoraConfig(
        r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        target_modules=linears,
        modules_to_save=["multi_modal_projector"] if t.train_projector else None,
        task_type=None,
    )
    return get_peft_model(model, config)
