"""`fkl`: UIR with the hidden-state MSE replaced by a KL of next-token distributions (LLaVA-c §5.2).

On the unlabeled inquiry rows of every micro-batch, L_fkl = mean over valid inquiry tokens of
KL(p_ref ‖ p_θ), p = softmax of the LM head's logits, the reference being the stage-start model
(the peft model with its adapters disabled, as for UIR). L = L_llava + λ·L_fkl.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from llava_c_ray.methods.base import Method, Params, StageContext, TrainingParts, register
from llava_c_ray.methods.distill import distillation_kl
from llava_c_ray.methods.uir import inquiry_states
from llava_c_ray.train.hooks import ForwardPass, LossTerm, unwrap


class FKLParams(Params):
    weight: float = Field(default=1.0, gt=0)
    """λ of L = L_llava + λ·L_fkl (as UIR's λ = 1 [src LLaVA-c §5.2 compares them at equal weight])."""


def lm_head(model: torch.nn.Module) -> torch.nn.Module:
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return base.lm_head


@dataclass
class FKLTerm(LossTerm):
    """KL(p_ref ‖ p_θ) over the valid tokens of the micro-batch's inquiry rows."""

    weight: float = 1.0
    name = "fkl_loss"
    needs_inquiries = True
    needs_hidden_states = True

    def __call__(self, forward: ForwardPass) -> torch.Tensor | None:
        if forward.inquiry_rows == 0:
            return None
        hidden, reference, mask = inquiry_states(forward)
        valid = mask.bool()
        head = lm_head(forward.model)
        with torch.no_grad():
            teacher = head(reference[valid])
        return distillation_kl(head(hidden[valid]), teacher)


def fkl_training(ctx: StageContext) -> TrainingParts:
    return TrainingParts(losses=(FKLTerm(ctx.params.weight),))


METHOD = register(
    Method(
        name="fkl",
        summary="sequential LoRA + KL to the stage-start model on unlabeled inquiries",
        adds="λ·KL(p_ref ‖ p_θ) of next-token distributions on inquiries",
        source="LLaVA-c paper §5.2 (baseline to UIR)",
        params=FKLParams,
        training=fkl_training,
    )
)
