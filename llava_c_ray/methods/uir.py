"""`uir`: sequential LoRA with the Unsupervised Inquiry Regularization loss (SPEC.md §2.1).

L = L_llava + λ·L_uir, λ = the job's `uir.weight`. The inquiry rows ride in the training forward;
the reference hidden states come from a no-grad forward of the same rows through the stage-start
model (the peft model with its adapters disabled — no second copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava_c_ray.methods.base import Method, StageContext, TrainingParts, register
from llava_c_ray.train.hooks import ForwardPass, LossTerm, stage_start_model
from llava_c_ray.train.uir import uir_loss


def reference_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Final hidden states of the stage-start model on text rows. Only the language model runs
    (the inquiries are text): its `last_hidden_state` is the full model's `hidden_states[-1]`,
    without the LM head's logits over the vocabulary."""
    with stage_start_model(model) as base:
        outputs = base.model.language_model(
            input_ids=input_ids, attention_mask=mask, use_cache=False
        )
        return outputs.last_hidden_state


@dataclass
class UIRTerm(LossTerm):
    """λ·L_uir on the micro-batch's inquiry rows (SPEC.md §2.1)."""

    weight: float = 1.0
    name = "uir_loss"
    needs_inquiries = True
    needs_hidden_states = True

    def __call__(self, forward: ForwardPass) -> torch.Tensor | None:
        if forward.inquiry_rows == 0:
            return None
        return uir_loss(*inquiry_states(forward))


def inquiry_states(forward: ForwardPass) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(final hidden states of the trained model, of the stage-start model, attention mask) on
    the micro-batch's inquiry rows, up to their last valid token.

    The rows are padded to the longest training row, their packed inquiries are often much
    shorter: the reference pass runs on the valid width only (right padding, causal attention:
    the cut columns change no valid token's state, and the mask excludes them from the loss)."""
    ids, mask = forward.inquiries()
    width = int(mask.any(0).nonzero().max()) + 1
    ids, mask = ids[:, :width], mask[:, :width]
    reference = reference_hidden(forward.model, ids, mask)
    return forward.final_hidden[-forward.inquiry_rows :, :width], reference, mask


def uir_training(ctx: StageContext) -> TrainingParts:
    """The UIR term with λ = `uir.weight` (none at λ = 0)."""
    weight = ctx.job.uir.weight
    return TrainingParts(losses=(UIRTerm(weight),) if weight > 0 else ())


METHOD = register(
    Method(
        name="uir",
        summary="sequential LoRA + UIR loss",
        adds="λ·L_uir: hidden states on unlabeled inquiries stay near the stage-start model",
        source="LLaVA-c paper §3.2",
        training=uir_training,
    )
)
