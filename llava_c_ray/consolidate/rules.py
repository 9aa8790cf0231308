"""The consolidation rules by name: how the change Δ of one tensor becomes W̃_t − W̃_{t-1} for α.

This is the one place that defines "the consolidated change of one tensor for α" (SPEC.md §2.2):

- `sac`: for a matrix, the spectrum σ of Δ = U·diag(σ)·Vᵀ becomes σ̃ of eq. 6 (`sac_spectrum`);
  for 1-D tensors and scalars, ModelMix α·Δ;
- `modelmix`: α·Δ for every tensor (σ̃ = α·σ when the change is given as factors);
- `none`: no consolidation — the stage's merged model is kept as it is.

The engine (`consolidate_checkpoint`), the α-search candidates and the job config derive the
rule names and the rule from `RULES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava_c_ray.consolidate.lowrank import (
    Factors,
    consolidated_spectrum,
    dense_factors,
    lowrank_factors,
    rebuild,
)
from llava_c_ray.consolidate.spectral import Boundary, modelmix
from llava_c_ray.errors import LlavaCError


@dataclass(frozen=True)
class Rule:
    """A consolidation rule: its name, one line, and whether matrices need their SVD."""

    name: str
    summary: str
    consolidates: bool = True
    """False for `none`: the stage's merged model is the consolidated one."""
    spectral: bool = False
    """True when a matrix's change depends on its spectrum (needs the SVD factors)."""

    def spectrum(
        self, factors: Factors, alpha: float, boundary: Boundary
    ) -> tuple[torch.Tensor, int | None]:
        """σ̃ of the computed directions of a matrix given as factors, and SAC's window k."""
        if self.spectral:
            return consolidated_spectrum(factors, alpha, boundary)
        return alpha * factors.S, None

    def dense_change(self, delta: torch.Tensor, alpha: float) -> torch.Tensor:
        """The consolidated change of a tensor the rule treats without an SVD: α·Δ."""
        return modelmix(delta, alpha)

    def uses_factors(self, tensor_dim: int) -> bool:
        """Whether a tensor of this many dimensions goes through its SVD factors."""
        return self.spectral and tensor_dim >= 2

    def change(
        self,
        alpha: float,
        boundary: Boundary = "pad",
        *,
        delta: torch.Tensor | None = None,
        lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> torch.Tensor:
        """W̃_t − W̃_{t-1} of one tensor in float64, given its dense Δ or LoRA (B, A, s).

        Conv kernels are reshaped out × rest for the SVD and back."""
        if (delta is None) == (lora is None):
            raise ValueError("give exactly one of delta or lora")
        if delta is not None and not self.uses_factors(delta.dim()):
            return self.dense_change(delta.double(), alpha)
        factors = lowrank_factors(*lora) if lora is not None else dense_factors(delta)
        return rebuild(factors, self.spectrum(factors, alpha, boundary)[0])


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            "sac", "Spectral-Aware Consolidation: sliding-window spectrum (eq. 5-6)", spectral=True
        ),
        Rule("modelmix", "ModelMix: W̃ = W + α·Δ"),
        Rule("none", "keep the stage's merged model", consolidates=False),
    )
}


def get_rule(name: str, key: str = "consolidation.method") -> Rule:
    """The rule called `name`, or a named error listing the known ones."""
    if name not in RULES:
        raise LlavaCError(
            f"unknown consolidation rule {name!r} ({key})", fix=f"use one of: {', '.join(RULES)}"
        )
    return RULES[name]
