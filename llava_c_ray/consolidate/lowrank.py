"""Exact SVDs of weight changes: from LoRA factors in O((M+N)·r²), or dense; and their rebuild.

For Δ = s·B·A (B: M×r, A: r×N): B = Q_B R_B, Aᵀ = Q_A R_A, and the r×r core C = s·R_B·R_Aᵀ = U_c Σ V_cᵀ
give Δ = (Q_B U_c) Σ (Q_A V_c)ᵀ — the exact SVD of Δ with at most r non-zero singular values.
The spectrum rule then runs on Σ zero-padded to R = min(M, N) (SPEC.md §2.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava_c_ray.consolidate.spectral import Boundary, sac_spectrum

DENSE_FP64_LIMIT = 1 << 22  # dense SVDs up to 4M elements run in float64 on CPU, larger in float32


@dataclass(frozen=True)
class Factors:
    """Δ = U·diag(S)·Vh of one weight matrix (reshaped to 2-D), with R = min(M, N) and its shape."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    shape: tuple[int, ...]

    @property
    def full_rank(self) -> int:
        return min(self.shape[0], _columns(self.shape))

    def padded_spectrum(self) -> torch.Tensor:
        """σ_1..σ_R: the computed singular values followed by zeros up to R."""
        padded = self.S.new_zeros(self.full_rank)
        padded[: self.S.shape[0]] = self.S
        return padded


def _columns(shape: tuple[int, ...]) -> int:
    columns = 1
    for size in shape[1:]:
        columns *= size
    return columns


def lowrank_factors(
    B: torch.Tensor, A: torch.Tensor, scale: float, shape: tuple[int, ...] | None = None
) -> Factors:
    """Exact SVD of s·B·A from the factors (QR of B and Aᵀ, SVD of the small core), in float64."""
    B64, A64 = B.double().reshape(B.shape[0], -1), A.double().reshape(A.shape[0], -1)
    q_b, r_b = torch.linalg.qr(B64)
    q_a, r_a = torch.linalg.qr(A64.T)
    u_c, s, vh_c = torch.linalg.svd(scale * r_b @ r_a.T, full_matrices=False)
    return Factors(q_b @ u_c, s, vh_c @ q_a.T, shape or (B.shape[0], A64.shape[1]))


def dense_factors(delta: torch.Tensor) -> Factors:
    """SVD of a full-rank change (conv kernels reshaped to out × rest)."""
    matrix = delta.reshape(delta.shape[0], -1)
    small = matrix.numel() <= DENSE_FP64_LIMIT
    dtype = torch.float64 if small and not matrix.is_cuda else torch.float32
    u, s, vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    return Factors(u, s, vh, tuple(delta.shape))


def consolidated_spectrum(
    factors: Factors, alpha: float, boundary: Boundary
) -> tuple[torch.Tensor, int]:
    """σ̃ for the computed directions (the rest are 0 in both boundary modes) and the window k."""
    sigma_tilde, k = sac_spectrum(factors.padded_spectrum(), alpha, boundary)
    return sigma_tilde[: factors.S.shape[0]], k


def rebuild(factors: Factors, sigma: torch.Tensor) -> torch.Tensor:
    """U·diag(σ)·Vh reshaped to the parameter's shape, in the factors' dtype."""
    return ((factors.U * sigma.to(factors.U.dtype)) @ factors.Vh).reshape(factors.shape)


def add_rebuilt(weight: torch.Tensor, factors: Factors, sigma: torch.Tensor) -> torch.Tensor:
    """W + U·diag(σ)·Vh (eq. 6's W̃) as one float32 addmm, returned in W's dtype: no separate
    dense Δ is materialised and added. Float32 keeps ~1e-7 relative error on an r-term sum at half
    the time and memory of float64, and this product dominates a low-rank consolidation."""
    scaled = factors.U.float() * sigma.float()
    flat = weight.float().reshape(scaled.shape[0], -1)
    return torch.addmm(flat, scaled, factors.Vh.float()).reshape(weight.shape).to(weight.dtype)
