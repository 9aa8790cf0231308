"""The Unsupervised Inquiry Regularization loss (SPEC.md §2.1), pure torch.

L_uir = mean over valid (non-pad) tokens of ‖h_θ(x) − h_θ̃(x)‖² / d, where h are final-layer hidden
states on unlabeled text-only inquiries x and θ̃ is the stage-start model.
"""

from __future__ import annotations

import torch


def uir_loss(hidden: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared hidden-state difference per token and dimension over the tokens where mask is 1.

    hidden, reference: (rows, tokens, d); mask: (rows, tokens). The reference carries no gradient.
    """
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    squared = (hidden - reference.detach()) ** 2 * weights
    tokens = weights.sum().clamp_min(1.0)
    return squared.sum() / (tokens * hidden.shape[-1])


def pack_rows(sequences: list[list[int]], per_row: int) -> list[list[int]]:
    """Concatenate consecutive token sequences, `per_row` at a time, into fewer longer rows."""
    return [sum(sequences[i : i + per_row], []) for i in range(0, len(sequences), per_row)]
