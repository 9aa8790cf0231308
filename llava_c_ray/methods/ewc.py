"""`ewc`: Elastic Weight Consolidation (Kirkpatrick et al. 2017; METHODS.md § ewc).

L = L_llava + (λ/2)·Σ_i F_i·(θ_i − θ*_i)², θ* = the model at the stage start, F = the diagonal
Fisher: the mean over `fisher_samples` training rows of each finished task of the squared gradient
of its LM loss, at the weights that task ended with, summed over the finished tasks [choice: sum,
as EWC adds one penalty per task]. With a fresh LoRA per stage, θ − θ* of an adapted matrix is its
dense change s·B·A, so the penalty is (λ/2)·Σ F⊙(s·B·A)²; the projector, trained in full, gets
(λ/2)·Σ F⊙(θ − θ*)² against its stage-start copy. λ = 1e4 and 256 rows are our choices (the
sources give neither for LLaVA).

After every stage a Ray task estimates F_t on the stage's merged model and writes F_1 + … + F_t to
`method/ewc-fisher-NN.safetensors` (named by module parameter, e.g.
`model.language_model.layers.0.self_attn.q_proj.weight`); the next stage's workers read it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from llava_c_ray.data.collate import LlavaCollator
from llava_c_ray.data.records import load_records
from llava_c_ray.data.template import encode_example
from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods.base import (
    Method,
    Params,
    StageContext,
    TrainedStage,
    TrainingParts,
    register,
)
from llava_c_ray.model.keys import language_model_linears
from llava_c_ray.ray_session import ensure_ray, worker_options
from llava_c_ray.train.hooks import ForwardPass, LossTerm, unwrap
from llava_c_ray.train.spec import TrainFile

PROJECTOR = "multi_modal_projector"
PEFT_PREFIX = "base_model.model."
STATE = "ewc-fisher"


class EWCParams(Params):
    weight: float = Field(default=1e4, gt=0)
    """λ of (λ/2)·Σ F·(θ − θ*)² [choice]."""
    fisher_samples: int = Field(default=256, gt=0)
    """Training rows of each finished task the Fisher is averaged over [choice]."""
    seed: int = 0
    """Seed of the choice of those rows."""


def penalised(model: torch.nn.Module) -> list[str]:
    """Parameter names the penalty covers: the language model's linear weights, the projector."""
    names = [f"{name}.weight" for name in language_model_linears(model)]
    return names + [n for n, _ in model.named_parameters() if PROJECTOR in n]


def diagonal_fisher(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], names: list[str]
) -> dict[str, torch.Tensor]:
    """Mean over single-row batches of the squared gradient of the LM loss, for `names`."""
    params = dict(model.named_parameters())
    for param in model.parameters():
        param.requires_grad_(False)
    for name in names:
        params[name].requires_grad_(True)
    sums = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in names}
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for name in names:
            sums[name] += params[name].grad.float() ** 2
        count += 1
    return {name: total / max(count, 1) for name, total in sums.items()}


def fisher_rows(files: list[TrainFile], samples: int, seed: int):
    """`samples` training rows of the files (drawn with `seed`) with their instruction suffix."""
    rows = [
        (record, source)
        for source in files
        for record in load_records(source.path, source.image_folder)
    ]
    random.Random(seed).shuffle(rows)
    return rows[:samples]


def encoded_batches(rows, processor, template: str, max_length: int):
    """Each row as a one-row training batch, encoded as the training workers encode it."""
    from PIL import Image

    collate = LlavaCollator(processor.tokenizer.pad_token_id)
    for record, source in rows:
        image = None
        if record.image is not None:
            image = Image.open(Path(source.image_folder) / record.image).convert("RGB")
        example = encode_example(
            record,
            processor,
            image,
            template,
            instruction=source.instruction,
            max_length=max_length,
        )
        yield collate([example])


def estimate_fisher(
    model_dir: Path,
    files: list[TrainFile],
    samples: int,
    seed: int,
    template: str,
    max_length: int,
    earlier: Path | None,
    out: Path,
) -> None:
    """F_t of the stage's merged model, plus the earlier tasks' sum, written to `out` (a Ray task)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)
    rows = fisher_rows(files, samples, seed)
    fisher = diagonal_fisher(
        model, encoded_batches(rows, processor, template, max_length), penalised(model)
    )
    if earlier is not None:
        fisher = {name: value + load_file(str(earlier))[name] for name, value in fisher.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(tmp))
    tmp.replace(out)


def fisher_after_stage(ctx: StageContext, trained: TrainedStage) -> None:
    """Estimate the finished task's Fisher on a Ray worker and add it to the earlier ones."""
    import ray

    params: EWCParams = ctx.params
    files = [TrainFile(t.train, t.image_folder, t.instruction) for t in ctx.tasks()]
    earlier = ctx.earlier_state(STATE)
    ensure_ray()
    task = ray.remote(**worker_options(ctx.job.cluster))(estimate_fisher)
    ray.get(
        task.remote(
            trained.model,
            files,
            params.fisher_samples,
            params.seed + ctx.stage.index,
            ctx.job.model.template,
            ctx.job.training.max_length,
            earlier,
            ctx.state_file(STATE),
        )
    )


class EWCTerm(LossTerm):
    """½·Σ F⊙(θ − θ*)² over the adapted matrices (θ − θ* = s·B·A) and the projector."""

    name = "ewc_loss"

    def __init__(self, fisher: Path, weight: float):
        self.fisher_file, self.weight = fisher, weight
        self.lora: list[tuple[torch.nn.Module, torch.Tensor]] = []
        self.full: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def setup(self, model: torch.nn.Module) -> None:
        fisher = load_file(str(self.fisher_file))
        inner = unwrap(model)
        modules = dict(inner.named_modules())
        params = dict(inner.named_parameters())
        for name, value in fisher.items():
            module = modules.get(PEFT_PREFIX + name.removesuffix(".weight"))
            if module is not None and hasattr(module, "lora_A"):
                self.lora.append((module, value))
            elif PROJECTOR in name:
                self.full.append(projector_pair(params, name, value))
        if not self.lora:
            raise LlavaCError(
                "no adapted matrix of this stage has a Fisher estimate",
                path=self.fisher_file,
                fix="train LoRA on the language model's linear layers (training.full_finetune=false)",
            )

    def __call__(self, forward: ForwardPass) -> torch.Tensor:
        terms = [
            (fisher.to(m.weight.device) * lora_change(m) ** 2).sum() for m, fisher in self.lora
        ]
        terms += [
            (fisher.to(current.device) * (current - start) ** 2).sum()
            for current, start, fisher in self.full
        ]
        return 0.5 * torch.stack(terms).sum()


def lora_change(module: torch.nn.Module) -> torch.Tensor:
    """s·B·A of a peft LoRA layer's active adapter."""
    (adapter,) = module.active_adapters
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    return module.scaling[adapter] * (b @ a)


def projector_pair(params: dict, name: str, fisher: torch.Tensor):
    """(trained copy, stage-start copy, F) of a projector parameter under peft's modules_to_save."""
    prefix, leaf = name.split(f"{PROJECTOR}.", 1)
    base = f"{PEFT_PREFIX}{prefix}{PROJECTOR}"
    trained = next(
        v
        for k, v in params.items()
        if k.startswith(f"{base}.modules_to_save.") and k.endswith(f".{leaf}")
    )
    start = params[f"{base}.original_module.{leaf}"].detach()
    return trained, start, fisher


def ewc_training(ctx: StageContext) -> TrainingParts:
    fisher = ctx.earlier_state(STATE)
    return TrainingParts(losses=(EWCTerm(fisher, ctx.params.weight),) if fisher else ())


METHOD = register(
    Method(
        name="ewc",
        summary="sequential LoRA + Fisher-weighted pull toward the stage-start weights",
        adds="(λ/2)·Σ F⊙(s·B·A)², F = diagonal Fisher of the finished tasks",
        source="Kirkpatrick et al., EWC (PNAS 2017)",
        params=EWCParams,
        training=ewc_training,
        after_training=fisher_after_stage,
    )
)
