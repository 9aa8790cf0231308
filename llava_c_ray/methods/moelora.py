"""`moelora`: CoIN's MoELoRA — LoRA experts on every language-model linear, mixed per token by a
router (Chen et al., CoIN, NeurIPS 2024 Datasets & Benchmarks; METHODS.md § moelora).

    y = W·x + b + Σ_e g_e(x) · s · B_e·A_e·drop(x),   g(x) = softmax_e(R·x),   per token,

R a linear without bias on the layer's input (not dropped out) [src CoIN/peft/tuners/
coinmoelora.py:321, :385-395]. The job's LoRA settings mean what they mean in CoIN: `training.lora_r`
is the experts' total rank, split evenly (r = 128 over E = 8 experts of rank 16 [src :416-417;
scripts/LLaVA/Train_MOE/*.sh `--lora_r 128 --expert_num 8`]); s = lora_alpha / lora_r, α over the
total rank (256/128 = 2 [src :284]); A_e ~ N(0, 0.01²), B_e = 0 [src :293-294]; R starts as a
default nn.Linear (Kaiming-uniform; never re-initialised [src :321]). Experts and routers are kept
and computed in float32 whatever the model's dtype, as there (created in float32, moved only to
the device [src :287]; the input cast to their dtype [src :385]). [choice] One dropout mask shared
by the experts (CoIN draws one per expert [src :392], which costs E copies of the activations).

Never merged: the mixing depends on the input. Across stages the experts, the routers and the
projector are carried over and all keep training; W stays the initial model's [src ETrain/Train/
LLaVA/llava_trainer.py:255-279 loads the previous task's `lora_` weights (routers included) and
non-LoRA trainables (the projector) onto the base model; Train_MOE/2_TextVQA.sh
`--previous_task_model_path`; every stage's `--model_name_or_path` is the base model]. Here the
previous stage's `model/` is that: W as loaded, the trained projector, the experts beside it — so
each stage starts from its stage-start model and carries the experts found there.

peft cannot do this (its LoRA layers add adapters with fixed weights; none mixes several softly per
token by a learned router), so `MoELoRALinear` is a small module of ours wrapping the frozen linear.

A stage's `model/` is a standard HF LLaVA checkpoint (W, the trained projector) plus
`moelora.safetensors` (per wrapped linear `<name>.router` E×in, `<name>.lora_A` E×r×in,
`<name>.lora_B` E×out×r, names as in the loaded model) and `moelora.json` (E, r, s); `load_model`
rebuilds the routed model. No `adapter/`: consolidation and the α search do not apply.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from llava_c_ray.config import TrainingConfig
from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate.evaluator import load_hf_model
from llava_c_ray.files import write_json_atomic
from llava_c_ray.methods.base import Method, Params, StageContext, TrainingParts, register
from llava_c_ray.methods.wrapping import unwrapped, wrap_linears
from llava_c_ray.model.keys import language_model_linears
from llava_c_ray.train.hooks import ModelSetup

SIDECAR = "moelora.safetensors"
SIDECAR_CONFIG = "moelora.json"
EXPERT_TENSORS = ("router", "lora_A", "lora_B")
PROJECTOR = "multi_modal_projector"


class MoELoRAParams(Params):
    experts: int = Field(default=8, gt=0)
    """E, LoRA experts per linear; `training.lora_r` is their total rank [src CoIN Train_MOE: 8]."""


@dataclass(frozen=True)
class ExpertShape:
    """The experts of one wrapped linear: how many, the rank of each, the scale s."""

    experts: int
    rank: int
    scale: float

    @classmethod
    def from_training(cls, experts: int, t: TrainingConfig) -> ExpertShape:
        """CoIN's reading of the LoRA settings: lora_r split among the experts, s = α / lora_r."""
        return cls(experts, t.lora_r // experts, t.lora_alpha / t.lora_r)


class MoELoRALinear(nn.Module):
    """A frozen nn.Linear plus E LoRA experts mixed per token by a bias-free router:
    y = base(x) + Σ_e softmax(R·x)_e · s · B_e·A_e·drop(x) (CoIN's MoELoRA layer).

    Ours, not peft: peft's LoRA layers add adapters with fixed weights, none mixes several by
    input-dependent weights. The router R (E×in), A (E×r×in) and B (E×out×r) are float32."""

    def __init__(self, base: nn.Linear, shape: ExpertShape, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.experts, self.rank, self.scale = shape.experts, shape.rank, shape.scale
        like = {"device": base.weight.device, "dtype": torch.float32}
        e, r = shape.experts, shape.rank
        self.router = nn.Parameter(torch.zeros(e, base.in_features, **like))
        self.lora_A = nn.Parameter(torch.zeros(e, r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(e, base.out_features, r, **like))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def shape(self) -> ExpertShape:
        return ExpertShape(self.experts, self.rank, self.scale)

    def reset_experts(self, generator: torch.Generator) -> None:
        """CoIN's initialisation: R as a default nn.Linear, A_e ~ N(0, 0.01²), B_e = 0."""
        router = torch.empty(self.router.shape)
        nn.init.kaiming_uniform_(router, a=math.sqrt(5), generator=generator)
        a = torch.empty(self.lora_A.shape).normal_(0.0, 0.01, generator=generator)
        with torch.no_grad():
            self.router.copy_(router)
            self.lora_A.copy_(a)
            self.lora_B.zero_()

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(R·x) over the experts, per token: (..., E)."""
        return torch.softmax(F.linear(x.to(self.router.dtype), self.router), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = x.to(self.lora_A.dtype)
        # Σ_e g_e·B_e·A_e·x = [B_1 … B_E]·(g ⊗ 1_r ⊙ [A_1; …; A_E]·x): two matmuls for all experts.
        z = F.linear(self.dropout(h), self.lora_A.flatten(0, 1)).unflatten(-1, (self.experts, -1))
        z = (z * self.gates(h).unsqueeze(-1)).flatten(-2)
        delta = F.linear(z, self.lora_B.transpose(0, 1).flatten(1))
        return out + (self.scale * delta).to(out.dtype)


def routed_layers(model: nn.Module) -> dict[str, MoELoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELoRALinear)}


def target_linears(model: nn.Module, t: TrainingConfig) -> list[str]:
    """The language model's linears the job adapts (`training.target_modules` picks among them)."""
    names = language_model_linears(model)
    if t.target_modules != "all-linear":
        names = [n for n in names if n.rsplit(".", 1)[-1] in t.target_modules]
    return names


def wrap_moelora(
    model: nn.Module, names: list[str], shape: ExpertShape, dropout: float = 0.0
) -> dict[str, MoELoRALinear]:
    """Replace each named nn.Linear of `model` by a MoELoRALinear around it (experts all zero)."""
    return wrap_linears(model, names, lambda base: MoELoRALinear(base, shape, dropout), "MoELoRA")


def base_linears(model: nn.Module):
    """`model` with every MoELoRALinear swapped back for its frozen linear (a standard HF model)."""
    return unwrapped(model, routed_layers(model))


def write_experts(model: nn.Module, out: Path) -> None:
    """`moelora.safetensors` (every layer's router, A, B) and `moelora.json` (E, r, s) in `out`."""
    layers = routed_layers(model)
    shapes = {layer.shape for layer in layers.values()}
    if len(shapes) != 1:
        raise ValueError(f"expected one expert shape across the routed layers, found {shapes}")
    tensors = {
        f"{name}.{key}": getattr(layer, key).detach().cpu().contiguous()
        for name, layer in layers.items()
        for key in EXPERT_TENSORS
    }
    tmp = out / f".{SIDECAR}.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    tmp.replace(out / SIDECAR)
    write_json_atomic(out / SIDECAR_CONFIG, asdict(shapes.pop()))


def saved_shape(model_dir: Path) -> ExpertShape:
    config, sidecar = model_dir / SIDECAR_CONFIG, model_dir / SIDECAR
    if not (config.is_file() and sidecar.is_file()):
        raise LlavaCError(
            f"not a MoELoRA checkpoint (no {SIDECAR} and {SIDECAR_CONFIG} beside the weights)",
            path=model_dir,
            fix="load a stage model written by the `moelora` method",
        )
    return ExpertShape(**json.loads(config.read_text()))


def attach_experts(
    model: nn.Module, model_dir: Path, dropout: float = 0.0
) -> dict[str, MoELoRALinear]:
    """Wrap the linears named in `model_dir`'s sidecar and load their experts and routers."""
    shape = saved_shape(model_dir)
    tensors = load_file(str(model_dir / SIDECAR))
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    layers = wrap_moelora(model, names, shape, dropout)
    with torch.no_grad():
        for name, layer in layers.items():
            for key in EXPERT_TENSORS:
                param, saved = getattr(layer, key), tensors.get(f"{name}.{key}")
                if saved is None or saved.shape != param.shape:
                    raise LlavaCError(
                        f"{SIDECAR}: {name}.{key} is missing or does not fit the layer "
                        f"({None if saved is None else tuple(saved.shape)} vs {tuple(param.shape)})",
                        path=model_dir,
                        fix="load the experts onto the base model they were trained with",
                    )
                param.copy_(saved)
    return layers


def load_moelora_model(model_dir: str, dtype: Any) -> nn.Module:
    """A stage's routed model: the HF checkpoint in `model_dir` with its experts (the evaluator's
    and the α-search actors' `ModelLoader`)."""
    model = load_hf_model(model_dir, dtype)
    attach_experts(model, Path(model_dir))
    return model


class MoELoRASetup(ModelSetup):
    """Wrap the language model's linears with E experts — fresh (CoIN's init, drawn with
    `training.seed`), or those of `carried` (the stage-start model's) — train them, the routers
    and the projector; the rest frozen. Saved as the HF checkpoint plus the experts' sidecar."""

    def __init__(self, experts: int, carried: Path | None = None):
        self.experts, self.carried = experts, carried

    def __call__(self, model: nn.Module, training: TrainingConfig) -> nn.Module:
        shape = ExpertShape.from_training(self.experts, training)
        targets = target_linears(model, training)
        if self.carried is None:
            layers = wrap_moelora(model, targets, shape, training.lora_dropout)
            generator = torch.Generator().manual_seed(training.seed)
            for layer in layers.values():
                layer.reset_experts(generator)
        else:
            self.check_carried(shape)
            layers = attach_experts(model, self.carried, training.lora_dropout)
            if sorted(layers) != sorted(targets):
                raise LlavaCError(
                    "the stage-start experts adapt other linears than this stage's "
                    "training.target_modules",
                    path=self.carried,
                    fix="keep training.target_modules the same in every stage",
                )
        model.requires_grad_(False)
        for layer in layers.values():
            for key in EXPERT_TENSORS:
                getattr(layer, key).requires_grad_(True)
        if training.train_projector:
            for name, param in model.named_parameters():
                if PROJECTOR in name:
                    param.requires_grad_(True)
        return model

    def check_carried(self, shape: ExpertShape) -> None:
        saved = saved_shape(self.carried)
        if saved != shape:
            raise LlavaCError(
                f"the stage-start experts are {saved}, this stage's settings give {shape}",
                path=self.carried,
                fix="keep training.lora_r, training.lora_alpha and method.params.experts the same "
                "in every stage",
            )

    def save(self, model: nn.Module, final: Path) -> None:
        out = final / "model"
        with base_linears(model) as plain:
            plain.save_pretrained(out, max_shard_size="2GB")
        write_experts(model, out)


def moelora_training(ctx: StageContext) -> TrainingParts:
    params: MoELoRAParams = ctx.params
    t = ctx.job.training
    if t.full_finetune:
        raise LlavaCError(
            "moelora trains LoRA experts, not the whole model",
            fix="set training.full_finetune=false",
        )
    if t.lora_r % params.experts:
        raise LlavaCError(
            f"training.lora_r = {t.lora_r} (the experts' total rank) does not split evenly among "
            f"method.params.experts = {params.experts} experts",
            fix="make training.lora_r a multiple of method.params.experts (CoIN: 128 and 8)",
        )
    carried = ctx.start_model if (ctx.start_model / SIDECAR).is_file() else None
    if carried is None and ctx.stage.index > 1:
        raise LlavaCError(
            f"stage {ctx.stage.index} starts from a model without MoELoRA experts",
            path=ctx.start_model,
            fix="start from the previous moelora stage's model (rerun the job from its first stage)",
        )
    return TrainingParts(setup=MoELoRASetup(params.experts, carried))


METHOD = register(
    Method(
        name="moelora",
        summary="LoRA experts on every LM linear, mixed per token by a softmax router (never merged)",
        adds="Σ_e softmax(R·x)_e·s·B_e·A_e·x per token; experts and router carried across tasks",
        source="Chen et al., CoIN (NeurIPS 2024 D&B), zackschen/CoIN coinmoelora.py",
        params=MoELoRAParams,
        training=moelora_training,
        consolidation="none",
        consolidable=False,
        load_model=load_moelora_model,
    )
)
