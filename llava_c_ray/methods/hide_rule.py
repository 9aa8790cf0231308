"""HiDe-LLaVA's rule (Guo et al., ACL 2025; METHODS.md § hide), as pure torch: per-task LoRA experts
on a linear, the fused lower-layer change, and the per-row routing of the top layer.

With experts (A_i, B_i), i = 1..T, the tasks seen so far, and scale s:

    training task t:  y = W·x + b + s·B_t·A_t·drop(x)           (only expert t active)
    lower layers:     ΔW = s·(Σ_i B_i)(Σ_i A_i)   (factor_sum)   or  s·Σ_i B_i·A_i  (product_sum)
    top layer:        y = W·x + b + Σ_i w_i·s·B_i·A_i·x,   w = softmax(s_sim / τ)  per row,
                      s_sim_i = ½[cos(f_img, a_i^img) + cos(f_txt, a_i^txt)]

[src Ghy0501/HiDe-LLaVA HiDe/peft/tuners/clitmoelora.py:407-410 (training: expert `cur_task`
only), :412-415 + :462-474 + :514-528 (every layer but the top: the experts' A summed, their B
summed, then B·A), :416-424 (top layer: Σ_i w_i·s·B_i·A_i·x); llava/model/llava_arch.py:196-215
(s_sim, softmax(s_sim / 0.1))]. `product_sum` is the exact sum of the experts' changes, offered
beside the authors' factor sum (which adds the cross terms B_i·A_j, i ≠ j).

peft cannot do this (its LoRA layers give each adapter one fixed weight for the whole batch; the
top layer mixes the experts with a different weight per row), so `HiDeLinear` is a small module of
ours wrapping the frozen linear, like `moelora`'s.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Fusion = Literal["factor_sum", "product_sum"]
Mode = Literal["single", "fused", "routed"]
A_STD = 0.01
"""A_i ~ N(0, 0.01²), B_i = 0 [src clitmoelora.py:300-302]."""


class RowWeights:
    """The routing weights of the rows of the batch being run, (rows, T); shared by the top-layer
    linears of one model and set by the routed model before each forward."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class HiDeLinear(nn.Module):
    """A frozen nn.Linear with per-task LoRA experts (float32), run in one of three modes:
    `single` (training: the last expert only), `fused` (a lower layer at inference: ΔW of
    `fused_change`), `routed` (the top layer at inference: Σ_i w_i·s·B_i·A_i·x per row)."""

    def __init__(self, base: nn.Linear, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mode: Mode = "single"
        self.fusion: Fusion = "factor_sum"
        self.weights: RowWeights | None = None

    @property
    def experts(self) -> int:
        return len(self.lora_A)

    def add_expert(
        self,
        rank: int,
        a: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Append an expert: the given A (r×in) and B (out×r), or a fresh one (A ~ N(0, 0.01²),
        B = 0)."""
        device = self.base.weight.device
        if a is None:
            a = torch.empty(rank, self.base.in_features).normal_(0.0, A_STD, generator=generator)
            b = torch.zeros(self.base.out_features, rank)
        self.lora_A.append(nn.Parameter(a.to(device, torch.float32).clone()))
        self.lora_B.append(nn.Parameter(b.to(device, torch.float32).clone()))

    def fused_change(self) -> torch.Tensor:
        """ΔW / s (out×in, float32) of a lower layer: (Σ B_i)(Σ A_i) or Σ B_i·A_i."""
        if self.fusion == "factor_sum":
            return torch.stack(list(self.lora_B)).sum(0) @ torch.stack(list(self.lora_A)).sum(0)
        return sum(b @ a for a, b in zip(self.lora_A, self.lora_B, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.experts:
            return out
        h = x.to(self.lora_A[0].dtype)
        if self.mode == "single":
            delta = F.linear(F.linear(self.dropout(h), self.lora_A[-1]), self.lora_B[-1])
        elif self.mode == "fused":
            delta = F.linear(h, self.fused_change())
        else:
            delta = self.routed_change(h)
        return out + (self.scale * delta).to(out.dtype)

    def routed_change(self, h: torch.Tensor) -> torch.Tensor:
        """Σ_i w_i·B_i·A_i·h with each row's own weights: two matmuls for all experts."""
        w = self.weights.value if self.weights is not None else None
        if w is None or w.shape != (h.shape[0], self.experts):
            raise RuntimeError(
                f"a routed HiDe layer needs one weight per expert and row, "
                f"(rows={h.shape[0]}, experts={self.experts}); got "
                f"{None if w is None else tuple(w.shape)} (run it through the routed model)"
            )
        a = torch.stack(list(self.lora_A))  # T×r×in
        z = F.linear(h, a.flatten(0, 1)).unflatten(-1, a.shape[:2])  # …×T×r
        z = z * w.to(h.dtype).view(w.shape[0], *[1] * (h.dim() - 2), w.shape[1], 1)
        b = torch.stack(list(self.lora_B))  # T×out×r
        return F.linear(z.flatten(-2), b.transpose(0, 1).flatten(1))


def similarities(
    anchors_image: torch.Tensor,
    anchors_text: torch.Tensor,
    text: torch.Tensor,
    image: torch.Tensor | None = None,
) -> torch.Tensor:
    """s_i = ½[cos(f_img, a_i^img) + cos(f_txt, a_i^txt)] per row, (rows, T); text-only rows
    (`image` None) get cos(f_txt, a_i^txt) alone [choice: the authors' data always has images]."""
    s_text = F.cosine_similarity(text.unsqueeze(1), anchors_text.unsqueeze(0), dim=-1)
    if image is None:
        return s_text
    s_image = F.cosine_similarity(image.unsqueeze(1), anchors_image.unsqueeze(0), dim=-1)
    return (s_image + s_text) / 2


def routing_weights(sims: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = softmax(s / τ) over the tasks seen so far [src llava_arch.py:212, τ = 0.1]."""
    return torch.softmax(sims / temperature, dim=-1)
