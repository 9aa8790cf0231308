"""The SAC spectrum rule and ModelMix (SPEC.md §2.2), pure torch, no Ray, no files.

With singular values σ_1 ≥ … ≥ σ_R of Δ = W_t − W̃_{t-1} (R = min(M, N), zeros included):

- window size (eq. 5): k = argmin_{k ∈ 1..R} ((1/k)·Σ_{j=1}^{k+1} σ_j − α·σ_1)², ties → smallest k;
- new spectrum (eq. 6): σ̃_i = (1/k)·Σ_{j=i}^{i+k} σ_j for i = 1..R — k+1 terms over k, exactly as
  the paper writes it. Indices past R are padded with σ_R (`pad`, eq. 6 and its footnote) or
  dropped (`truncate`, Algorithm 1);
- ModelMix: σ̃_i = α·σ_i, i.e. W̃_t = W̃_{t-1} + α·Δ.
"""

from __future__ import annotations

from typing import Literal

import torch

Boundary = Literal["pad", "truncate"]
BOUNDARIES = ("pad", "truncate")


def window_sums(sigma: torch.Tensor, width: int, boundary: Boundary) -> torch.Tensor:
    """S[i] = Σ_{j=i}^{i+width-1} σ_j for i = 1..R (0-based rows), with the boundary rule past R."""
    if boundary not in BOUNDARIES:
        raise ValueError(f"unknown boundary {boundary!r}; use one of {BOUNDARIES}")
    fill = sigma[-1] if boundary == "pad" else sigma.new_zeros(())
    extended = torch.cat([sigma, fill.expand(width)])
    cumulative = torch.cat([sigma.new_zeros(1), extended.cumsum(0)])
    rank = sigma.shape[0]
    start = torch.arange(rank)
    return cumulative[start + width] - cumulative[start]


def window_size(sigma: torch.Tensor, alpha: float, boundary: Boundary = "pad") -> int:
    """k ∈ 1..R minimising ((1/k)·Σ_{j=1}^{k+1} σ_j − α·σ_1)² (eq. 5); the first minimum on ties."""
    rank = sigma.shape[0]
    fill = sigma[-1] if boundary == "pad" else sigma.new_zeros(())
    extended = torch.cat([sigma, fill.reshape(1)])
    k = torch.arange(1, rank + 1, dtype=sigma.dtype)
    prefix = extended.cumsum(0)[1 : rank + 1]  # Σ_{j=1}^{k+1} σ_j for k = 1..R
    objective = (prefix / k - alpha * sigma[0]) ** 2
    return int(torch.argmin(objective)) + 1


def sac_spectrum(
    sigma: torch.Tensor, alpha: float, boundary: Boundary = "pad"
) -> tuple[torch.Tensor, int]:
    """σ̃ of eq. 6 and the window size k, for a non-increasing spectrum σ of length R."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    k = window_size(sigma, alpha, boundary)
    return window_sums(sigma, k + 1, boundary) / k, k


def modelmix(delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """ModelMix: the uniform rule α·Δ (also used for 1-D parameters under SAC)."""
    return alpha * delta
