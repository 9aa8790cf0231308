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


def pack_row(
    sequences: list[list[int]], start: int, budget: int, per_row: int
) -> tuple[list[int], int]:
    """One row of consecutive sequences (cyclically from `start`): as many as fit in `budget`
    tokens, at most `per_row`, at least one (cut to `budget`). Returns the row and how many
    sequences it took.

    The budget is the longest training row of the micro-batch, so the packed inquiries never
    lengthen the padded batch.
    """
    row: list[int] = []
    taken = 0
    while taken < per_row:
        nxt = sequences[(start + taken) % len(sequences)]
        if row and len(row) + len(nxt) > budget:
            break
        row += nxt
        taken += 1
    return row[:budget], taken
