"""`lwf`: Learning without Forgetting (Li & Hoiem): distil the stage-start model's answers.

L = L_llava + λ·T²·KL(softmax(z_ref/T) ‖ softmax(z_θ/T)) on the answer positions of the training
rows (the positions whose logits L_llava uses). z_ref comes from the stage-start model: the peft
model with its adapters disabled — and with them the trained copy of the projector
(`modules_to_save`), so the teacher uses the stage-start projector too. No second model copy.
T = 2, λ = 1 [src LwF].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from llava_c_ray.methods.base import Method, Params, StageContext, TrainingParts, register
from llava_c_ray.methods.distill import distillation_kl
from llava_c_ray.train.hooks import ForwardPass, LossTerm, stage_start_model


class LwFParams(Params):
    weight: float = Field(default=1.0, gt=0)
    """λ of the distillation term [src LwF: λ_o = 1]."""
    temperature: float = Field(default=2.0, gt=0)
    """Softmax temperature T [src LwF: T = 2]."""


def teacher_logits(forward: ForwardPass) -> torch.Tensor:
    """The stage-start model's logits at the positions the student's logits were kept."""
    inputs = {k: v for k, v in forward.training_inputs().items() if k != "labels"}
    rows = forward.keep.shape[0] - forward.inquiry_rows
    with stage_start_model(forward.model) as base:
        return base(**inputs, logits_to_keep=forward.keep[:rows]).logits


@dataclass
class LwFTerm(LossTerm):
    """T²·KL(teacher ‖ student) at the answer positions."""

    weight: float = 1.0
    temperature: float = 2.0
    name = "lwf_loss"

    def __call__(self, forward: ForwardPass) -> torch.Tensor | None:
        student = forward.outputs.logits
        teacher = teacher_logits(forward)
        return self.temperature**2 * distillation_kl(student, teacher, self.temperature)


def lwf_training(ctx: StageContext) -> TrainingParts:
    return TrainingParts(losses=(LwFTerm(ctx.params.weight, ctx.params.temperature),))


METHOD = register(
    Method(
        name="lwf",
        summary="sequential LoRA + distillation of the stage-start model's answers",
        adds="λ·T²·KL(teacher ‖ student) on answer positions, teacher = stage-start model",
        source="Li & Hoiem, Learning without Forgetting (2016)",
        params=LwFParams,
        training=lwf_training,
    )
)
