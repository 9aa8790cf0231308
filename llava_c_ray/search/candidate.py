"""Turn one loaded base model θ̃_{t-1} into any candidate θ̃(α) without a dense copy of the model.

With the cached factors Δ = U·diag(σ)·Vᵀ of every changed matrix (SPEC.md §2.2), the candidate
W̃(α) = W̃_{t-1} + U·diag(σ̃(α))·Vᵀ (eq. 6) of a linear layer is applied as a low-rank side path,
y = W̃_{t-1}x + (U·diag(σ̃))·(Vᵀx), like a LoRA adapter: changing α rescales r columns of U. Where
the side path would cost more than the matrix (full-rank deltas, e.g. the projector or a full
fine-tune) or the tensor is not a linear weight, the weights are rebuilt in place from a kept copy
of their base values. 1-D tensors get α·Δ (ModelMix) under both rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava_c_ray.consolidate.lowrank import Factors
from llava_c_ray.consolidate.rules import get_rule
from llava_c_ray.consolidate.spectral import Boundary
from llava_c_ray.errors import LlavaCError


def is_cheaper_lowrank(factors: Factors) -> bool:
    """True when r·(M + N) < M·N: the side path costs less than the dense matrix."""
    m, n = factors.U.shape[0], factors.Vh.shape[1]
    return factors.S.shape[0] * (m + n) < m * n


@dataclass
class SidePath:
    """A forward hook adding (U·diag(σ̃))·(Vᵀx) to a linear layer's output."""

    U: torch.Tensor
    Vh: torch.Tensor
    scaled_U: torch.Tensor

    def __call__(self, module, inputs, output):
        return output + F.linear(F.linear(inputs[0], self.Vh), self.scaled_U)


class CandidateModel:
    """A model whose changed tensors follow the candidate of the last `set_alpha` call.

    Tensors are named by their checkpoint keys (as the factor cache names them).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        matrices: dict[str, Factors],
        vectors: dict[str, torch.Tensor],
    ):
        from llava_c_ray.model.keys import parameter_names

        params = dict(model.named_parameters())
        names = parameter_names(model, [*matrices, *vectors])
        self.params = {key: params[name] for key, name in names.items()}
        self.factors = matrices
        self.paths: dict[str, SidePath] = {}
        self.kept: dict[str, torch.Tensor] = {}
        for key, factors in matrices.items():
            module = model.get_submodule(names[key].removesuffix(".weight"))
            if isinstance(module, torch.nn.Linear) and is_cheaper_lowrank(factors):
                self.paths[key] = self.side_path(module, factors)
            else:
                self.kept[key] = self.params[key].detach().clone()
        self.vectors = vectors
        for key in vectors:
            self.kept[key] = self.params[key].detach().clone()

    def side_path(self, module: torch.nn.Linear, factors: Factors) -> SidePath:
        weight = module.weight
        U = factors.U.to(weight.device, weight.dtype)
        path = SidePath(U, factors.Vh.to(weight.device, weight.dtype), torch.zeros_like(U))
        module.register_forward_hook(path)
        return path

    @torch.no_grad()
    def set_alpha(self, alpha: float, rule: str = "sac", boundary: Boundary = "pad") -> None:
        """Make the model compute θ̃(α): rescale the side paths, rebuild the dense tensors."""
        if not 0 <= alpha <= 1:
            raise LlavaCError(f"α = {alpha} is outside [0, 1]", fix="search α in [0, 1]")
        for name, path in self.paths.items():
            sigma, _ = get_rule(rule).spectrum(self.factors[name], alpha, boundary)
            path.scaled_U = path.U * sigma.to(path.U.device, path.U.dtype)
        for name, base in self.kept.items():
            self.params[name].copy_(base + self.dense_change(name, alpha, rule, boundary))

    def dense_change(self, name: str, alpha: float, rule: str, boundary: Boundary):
        param = self.params[name]
        if name in self.vectors:
            change = get_rule(rule).dense_change(self.vectors[name], alpha)
        else:
            factors = self.factors[name]
            sigma, _ = get_rule(rule).spectrum(factors, alpha, boundary)
            change = (factors.U * sigma) @ factors.Vh
        return change.reshape(param.shape).to(param.device, param.dtype)

    @torch.no_grad()
    def effective_weight(self, name: str) -> torch.Tensor:
        """The weight the model computes with now (for checks against the consolidation engine)."""
        param = self.params[name].detach()
        path = self.paths.get(name)
        if path is None:
            return param.clone()
        return param + path.scaled_U @ path.Vh
