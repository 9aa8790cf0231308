"""Distillation between next-token distributions, pure torch (used by `fkl` and `lwf`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over positions of KL(softmax(z_ref/T) ‖ softmax(z_θ/T)) = Σ_v p_ref (log p_ref − log p_θ).

    student, teacher: (positions, vocabulary) logits; the teacher carries no gradient. 0 when
    there are no positions."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
