"""`olora`: orthogonal LoRA subspaces (O-LoRA, Wang et al. 2023; METHODS.md § olora).

L = L_llava + λ1·Σ_{i<t} Σ|A_i·A_tᵀ| + λ2·‖A_t‖², summed over the adapted matrices: the new task's
LoRA down-projection A_t is pushed orthogonal to the earlier tasks' A_i, which are frozen buffers
[src O-LoRA code: the sum of absolute entries of A_i·A_tᵀ; λ1 = 0.5, λ2 = 0]. Earlier adapters stay
frozen and summed — here merged into the weights after every stage, which is the same as long as
nothing is consolidated. Σ_{i<t} Σ|A_i·A_tᵀ| = Σ|[A_1; …; A_{t-1}]·A_tᵀ|, so the state is, per
adapted matrix, the earlier A matrices stacked: `method/olora-A-NN.safetensors` after stage NN.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods.base import (
    Method,
    Params,
    StageContext,
    TrainedStage,
    TrainingParts,
    register,
)
from llava_c_ray.train.hooks import ForwardPass, LossTerm, unwrap

LORA_A = ".lora_A.weight"
STATE = "olora-A"


class OLoRAParams(Params):
    lambda1: float = Field(default=0.5, ge=0)
    """Weight of the orthogonality term Σ|A_i·A_tᵀ| [src O-LoRA: 0.5]."""
    lambda2: float = Field(default=0.0, ge=0)
    """Weight of ‖A_t‖² [src O-LoRA: 0]."""


def orthogonality(earlier: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Σ|A_prev·A_tᵀ|: A_prev (Σr_i × in) stacks the earlier tasks' A, A_t is r × in."""
    return (earlier.to(current.dtype) @ current.T).abs().sum()


class OLoRATerm(LossTerm):
    """λ1·Σ|A_prev·A_tᵀ| + λ2·‖A_t‖² over the adapted matrices (the weights are in the value)."""

    name = "olora_loss"

    def __init__(self, earlier: Path | None, lambda1: float, lambda2: float):
        self.earlier_file, self.lambda1, self.lambda2 = earlier, lambda1, lambda2
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor | None]] = []

    def setup(self, model: torch.nn.Module) -> None:
        """Pair every trainable LoRA A with the earlier tasks' stacked A of the same matrix."""
        earlier = load_file(str(self.earlier_file)) if self.earlier_file else {}
        params = dict(unwrap(model).named_parameters())
        for name, param in params.items():
            if ".lora_A." in name and param.requires_grad:
                module = name.split(".lora_A.")[0]
                stacked = earlier.get(module)
                self.pairs.append((param, None if stacked is None else stacked.to(param.device)))
        missing = set(earlier) - {n.split(".lora_A.")[0] for n in params if ".lora_A." in n}
        if missing:
            raise LlavaCError(
                f"{len(missing)} earlier O-LoRA subspaces have no adapter in this stage, "
                f"e.g. {sorted(missing)[:2]}",
                path=self.earlier_file,
                fix="keep training.target_modules the same in every stage",
            )

    def __call__(self, forward: ForwardPass) -> torch.Tensor:
        total = self.pairs[0][0].new_zeros(())
        for current, earlier in self.pairs:
            if earlier is not None and self.lambda1 > 0:
                total = total + self.lambda1 * orthogonality(earlier, current)
            if self.lambda2 > 0:
                total = total + self.lambda2 * current.pow(2).sum()
        return total


def olora_training(ctx: StageContext) -> TrainingParts:
    params: OLoRAParams = ctx.params
    term = OLoRATerm(ctx.earlier_state(STATE), params.lambda1, params.lambda2)
    return TrainingParts(losses=(term,))


def keep_subspace(ctx: StageContext, trained: TrainedStage) -> None:
    """Append the stage's A matrices to the earlier ones (state for the next stage)."""
    if trained.adapter is None:
        raise LlavaCError("olora needs LoRA training", fix="set training.full_finetune=false")
    adapter = load_file(str(trained.adapter / "adapter_model.safetensors"))
    current = {
        key.removesuffix(LORA_A): value for key, value in adapter.items() if key.endswith(LORA_A)
    }
    earlier_file = ctx.earlier_state(STATE)
    earlier = load_file(str(earlier_file)) if earlier_file else {}
    stacked = {k: torch.cat([earlier[k], v]) if k in earlier else v for k, v in current.items()}
    ctx.state_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in stacked.items()},
        str(ctx.state_file(STATE)),
    )


METHOD = register(
    Method(
        name="olora",
        summary="sequential LoRA, each task's subspace orthogonal to the earlier ones",
        adds="λ1·Σ abs(A_i·A_tᵀ) + λ2·‖A_t‖² against the earlier tasks' frozen LoRA A",
        source="Wang et al., O-LoRA (EMNLP 2023 Findings), cmnfriend/O-LoRA",
        params=OLoRAParams,
        training=olora_training,
        after_training=keep_subspace,
    )
)
