"""`hide`: HiDe-LLaVA (Guo et al., ACL 2025; METHODS.md § hide) — one LoRA expert per task on every
language-model linear; at inference the top decoder layer mixes the experts per row by how close
the question's CLIP image and text embeddings are to each task's anchors, and every lower layer
uses the experts fused into one change (the rule: `hide_rule.py`; the anchors: `hide_clip.py`).

Training task t [src Ghy0501/HiDe-LLaVA HiDe/peft/tuners/clitmoelora.py:407-410; scripts/HiDe/
Train_UCIT/Task*.sh `--lora_r 48 --lora_alpha 96 --expert_num 6`, Train_CoIN `64 / 128 / 8`]:
expert t — rank 8 (lora_r / expert_num), scale 2 (lora_alpha / lora_r) — is added to every linear
and is the only one active in the forward; the earlier experts are loaded from the previous stage
and frozen (only expert t gets gradients there too); the projector is carried over and keeps
training; W is the initial model's at every stage [src llava/train/train_MOE.py:776-805,
:1000-1002: `--model_name_or_path` is always the base model, the previous task's LoRA weights and
non-LoRA trainables (projector) are loaded onto it]. Here: `TrainingParts.init` is that base
model (recorded in the sidecar), and the previous stage's `model/` gives the earlier experts (its
sidecar) and the projector (its checkpoint). The experts are float32 like `moelora`'s [choice];
expert t is drawn with `training.seed + t` [choice].

After the stage (`after_training`, on the driver): the stage's anchors, mean CLIP embeddings of its
training rows, computed by Ray actors (`hide_clip.compute_anchors`). CLIP: `method.params.
clip_path`, or — unset — a tiny CLIP with both towers built once under the run's `method/clip`
from the stage model's tokenizer and image processor (`model/tiny_clip.py`; meant for the tiny
built-in model: a 7B job names a real CLIP).

A stage's `model/` is a standard HF LLaVA checkpoint whose lower layers hold W + ΔW (the fused
experts folded in) and whose expanded (top) layers hold W, plus

- `hide.safetensors`: every expert of every adapted linear, `<name>.lora_A` (T×r×in) and
  `<name>.lora_B` (T×out×r), names as in the loaded model — the loader reads only the expanded
  layers'; the next stage reads all (a folded ΔW cannot be split back into experts);
- `hide.json`: rank, scale, fusion, the expanded linears, the base model, the expert count;
- `hide_anchors.safetensors` (`image` T×d_img, `text` T×d_txt) and `hide_router.json` (CLIP
  path, temperature, task names), written by `after_training`.

`load_model` rebuilds the routed model: `RoutedHiDe` wraps the LLaVA model and the CLIP; its
`forward` / `generate` take the evaluator's batch (`input_ids`, `attention_mask`, `pixel_values`),
compute each row's weights from it — the text decoded back from `input_ids`, the image embedded
from the LLaVA `pixel_values` — and keep them in `last_weights` (rows × tasks) for the routing
plot. Rows routed differently in one batch give what each gives alone. No `adapter/`:
consolidation and the α search do not apply.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llava_c_ray.config import TrainingConfig
from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate.evaluator import load_hf_model
from llava_c_ray.files import write_json_atomic
from llava_c_ray.methods.base import (
    Method,
    Params,
    StageContext,
    TrainedStage,
    TrainingParts,
    register,
)
from llava_c_ray.methods.hide_clip import ClipFeatures, compute_anchors, routing_text
from llava_c_ray.methods.hide_rule import (
    Fusion,
    HiDeLinear,
    RowWeights,
    routing_weights,
    similarities,
)
from llava_c_ray.methods.moelora import PROJECTOR, target_linears
from llava_c_ray.methods.wrapping import unwrapped, wrap_linears
from llava_c_ray.model.keys import parameter_names
from llava_c_ray.model.safetensors_io import LazyCheckpoint
from llava_c_ray.model.tiny_clip import ensure_tiny_clip
from llava_c_ray.train.hooks import ModelSetup

SIDECAR = "hide.safetensors"
SIDECAR_CONFIG = "hide.json"
ANCHORS = "hide_anchors.safetensors"
ROUTER = "hide_router.json"
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class HiDeParams(Params):
    rank: int = Field(default=8, gt=0)
    """Rank of each task's expert [src lora_r / expert_num: 48/6, 64/8]."""
    scale: float = Field(default=2.0, gt=0)
    """s of s·B·A [src lora_alpha / lora_r: 96/48, 128/64]."""
    temperature: float = Field(default=0.1, gt=0)
    """τ of w = softmax(s / τ) [src llava_arch.py:212]."""
    expand_layers: tuple[int, ...] = Field(default=(-1,), min_length=1)
    """Decoder layers whose experts are mixed per row (negative: from the top) [src layer 31 of 32]."""
    fusion: Fusion = "factor_sum"
    """Lower layers: s·(ΣB)(ΣA) as the authors' code, or s·ΣB·A (product_sum)."""
    clip_path: Path | None = None
    """A local CLIP checkpoint with both towers; unset: a tiny one built under RUN_DIR/method/clip."""
    anchor_actors: int = Field(default=2, gt=0)
    """Ray actors computing a stage's anchors."""


@dataclass(frozen=True)
class ExpertsConfig:
    """`hide.json`: how the experts in `hide.safetensors` are run."""

    rank: int
    scale: float
    fusion: str
    expanded: list[str]
    base: str
    experts: int


def hide_layers(model: nn.Module) -> dict[str, HiDeLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, HiDeLinear)}


def expanded_linears(model: nn.Module, names: list[str], layers: tuple[int, ...]) -> list[str]:
    """The linears of `names` inside the decoder layers `layers` (negative: from the top)."""
    depth = model.config.text_config.num_hidden_layers
    if any(not -depth <= k < depth for k in layers):
        raise LlavaCError(
            f"method.params.expand_layers = {list(layers)} names layers outside the model's "
            f"{depth} decoder layers",
            fix=f"use indices in [-{depth}, {depth - 1}] (the authors': [-1])",
        )
    picked = {k % depth for k in layers}
    return [n for n in names if (m := LAYER_INDEX.search(n)) and int(m.group(1)) in picked]


def wrap_hide(
    model: nn.Module, names: list[str], scale: float, dropout: float = 0.0
) -> dict[str, HiDeLinear]:
    """Replace each named nn.Linear of `model` by a HiDeLinear around it (no experts yet)."""
    return wrap_linears(model, names, lambda base: HiDeLinear(base, scale, dropout), "HiDe")


@contextlib.contextmanager
def folded(model: nn.Module, expanded: list[str], fusion: Fusion) -> Iterator[nn.Module]:
    """`model` as a standard HF model: every HiDeLinear swapped back for its linear, the lower
    ones' W replaced by W + s·ΔW (the expanded ones keep W); restored exactly afterwards."""
    layers = hide_layers(model)
    kept = {}
    with torch.no_grad():
        for name, layer in layers.items():
            if name not in expanded and layer.experts:
                layer.fusion = fusion
                w = layer.base.weight
                kept[name] = w.data
                w.data = (w.data.float() + layer.scale * layer.fused_change()).to(w.dtype)
    try:
        with unwrapped(model, layers):
            yield model
    finally:
        for name, w in kept.items():
            layers[name].base.weight.data = w


def write_experts(model: nn.Module, out: Path, config: ExpertsConfig) -> None:
    """`hide.safetensors` (every layer's experts) and `hide.json` in `out`."""
    tensors = {
        f"{name}.{key}": torch.stack([p.detach().cpu() for p in getattr(layer, key)]).contiguous()
        for name, layer in hide_layers(model).items()
        for key in ("lora_A", "lora_B")
    }
    tmp = out / f".{SIDECAR}.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    tmp.replace(out / SIDECAR)
    write_json_atomic(out / SIDECAR_CONFIG, asdict(config))


def saved_config(model_dir: Path) -> ExpertsConfig:
    config, sidecar = Path(model_dir) / SIDECAR_CONFIG, Path(model_dir) / SIDECAR
    if not (config.is_file() and sidecar.is_file()):
        raise LlavaCError(
            f"not a HiDe checkpoint (no {SIDECAR} and {SIDECAR_CONFIG} beside the weights)",
            path=model_dir,
            fix="start from / load a stage model written by the `hide` method",
        )
    return ExpertsConfig(**json.loads(config.read_text()))


def attach_experts(
    model: nn.Module, model_dir: Path, names: list[str], dropout: float = 0.0
) -> dict[str, HiDeLinear]:
    """Wrap the linears `names` of `model` and give them the experts saved in `model_dir`."""
    config = saved_config(model_dir)
    layers = wrap_hide(model, names, config.scale, dropout)
    with safe_open(str(Path(model_dir) / SIDECAR), framework="pt") as saved:
        keys = set(saved.keys())
        for name, layer in layers.items():
            if f"{name}.lora_A" not in keys or f"{name}.lora_B" not in keys:
                raise LlavaCError(
                    f"{SIDECAR} has no experts for {name}",
                    path=model_dir,
                    fix="keep training.target_modules the same in every stage",
                )
            a, b = saved.get_tensor(f"{name}.lora_A"), saved.get_tensor(f"{name}.lora_B")
            if a.shape[1:] != (config.rank, layer.base.in_features):
                raise LlavaCError(
                    f"{SIDECAR}: the experts of {name} do not fit the layer",
                    path=model_dir,
                    fix="load the experts onto the base model they were trained with",
                )
            for i in range(config.experts):
                layer.add_expert(config.rank, a[i], b[i])
    return layers


def load_projector(model: nn.Module, checkpoint: Path) -> None:
    """The projector's weights of `checkpoint` into `model` (read tensor by tensor)."""
    saved = LazyCheckpoint(checkpoint)
    keys = [k for k in saved.keys() if PROJECTOR in k]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, name in parameter_names(model, keys).items():
            params[name].copy_(saved.get(key))


class HiDeSetup(ModelSetup):
    """Every adapted linear gets the earlier experts (from `previous`, frozen) and a fresh expert
    t, the only one trained and active; the projector (from `previous`) trains; the rest is
    frozen. Saved folded, with the experts' sidecar."""

    def __init__(self, params: HiDeParams, base: Path, previous: Path | None = None):
        self.rank, self.scale, self.fusion = params.rank, params.scale, params.fusion
        self.expand_layers = params.expand_layers
        self.base, self.previous = base, previous
        self.expanded: list[str] = []

    def __call__(self, model: nn.Module, training: TrainingConfig) -> nn.Module:
        targets = target_linears(model, training)
        self.expanded = expanded_linears(model, targets, self.expand_layers)
        if self.previous is None:
            layers = wrap_hide(model, targets, self.scale, training.lora_dropout)
        else:
            self.check_previous(targets)
            load_projector(model, self.previous)
            layers = attach_experts(model, self.previous, targets, training.lora_dropout)
        task = next(iter(layers.values())).experts
        generator = torch.Generator().manual_seed(training.seed + task)
        model.requires_grad_(False)
        for layer in layers.values():
            layer.add_expert(self.rank, generator=generator)
            layer.mode = "single"
            layer.lora_A[-1].requires_grad_(True)
            layer.lora_B[-1].requires_grad_(True)
        if training.train_projector:
            for name, param in model.named_parameters():
                if PROJECTOR in name:
                    param.requires_grad_(True)
        return model

    def check_previous(self, targets: list[str]) -> None:
        saved = saved_config(self.previous)
        if (saved.rank, saved.scale) != (self.rank, self.scale):
            raise LlavaCError(
                f"the earlier experts have rank {saved.rank} and scale {saved.scale}, this stage's "
                f"settings {self.rank} and {self.scale}",
                path=self.previous,
                fix="keep method.params.rank and method.params.scale the same in every stage",
            )
        with safe_open(str(self.previous / SIDECAR), framework="pt") as f:
            names = sorted({k.rsplit(".", 1)[0] for k in f.keys()})
        if names != sorted(targets):
            raise LlavaCError(
                "the earlier experts adapt other linears than this stage's training.target_modules",
                path=self.previous,
                fix="keep training.target_modules the same in every stage",
            )

    def save(self, model: nn.Module, final: Path) -> None:
        out = final / "model"
        with folded(model, self.expanded, self.fusion) as plain:
            plain.save_pretrained(out, max_shard_size="2GB")
        experts = next(iter(hide_layers(model).values())).experts
        config = ExpertsConfig(
            self.rank, self.scale, self.fusion, self.expanded, str(self.base), experts
        )
        write_experts(model, out, config)


class RoutedHiDe(nn.Module):
    """A LLaVA model whose expanded layers mix the task experts per row, with the CLIP and the
    anchors that route each row. `forward` and `generate` take a LLaVA batch; the weights they
    used are kept in `last_weights` (rows × tasks, the tasks' order in `tasks`), which makes it
    an `evaluate.evaluator.RoutedModel`: the evaluator records the routing per task."""

    def __init__(
        self,
        model: nn.Module,
        features: ClipFeatures,
        anchors: dict[str, torch.Tensor],
        tokenizer: Any,
        temperature: float,
        tasks: list[str],
    ):
        super().__init__()
        self.model, self.features = model, features
        self.register_buffer("anchors_image", anchors["image"].float())
        self.register_buffer("anchors_text", anchors["text"].float())
        self.tokenizer, self.temperature, self.tasks = tokenizer, temperature, tasks
        self.weights = RowWeights()
        self.last_weights: torch.Tensor | None = None
        for layer in hide_layers(model).values():
            if layer.mode == "routed":
                layer.weights = self.weights

    @property
    def config(self):
        return self.model.config

    @property
    def expert_names(self) -> list[str]:
        """The columns of `last_weights` (the evaluator's `RoutedModel`): each expert's task."""
        return self.tasks

    @torch.no_grad()
    def route(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each row's weights over the tasks' experts (rows × T)."""
        prompts = self.tokenizer.batch_decode(input_ids.cpu(), skip_special_tokens=True)
        text = self.features.text([routing_text(p) for p in prompts])
        image = None if pixel_values is None else self.features.image(pixel_values)
        sims = similarities(self.anchors_image, self.anchors_text, text, image)
        return routing_weights(sims, self.temperature)

    @contextlib.contextmanager
    def routed(self, batch: dict[str, Any]) -> Iterator[None]:
        weights = self.route(batch["input_ids"], batch.get("pixel_values"))
        self.last_weights = weights.cpu()
        self.weights.value = weights.to(batch["input_ids"].device)
        try:
            yield
        finally:
            self.weights.value = None

    def forward(self, **batch: Any) -> Any:
        with self.routed(batch):
            return self.model(**batch)

    def generate(self, **batch: Any) -> Any:
        if batch.get("num_beams", 1) != 1:
            raise LlavaCError(
                "HiDe routes each row of the batch; beam search would change the rows",
                fix="decode greedily or by sampling (num_beams=1)",
            )
        with self.routed(batch):
            return self.model.generate(**batch)


def routed_model(
    model: nn.Module,
    expanded: list[str],
    fusion: Fusion,
    anchors_dir: Path,
    tokenizer_dir: Path,
) -> RoutedHiDe:
    """The routed model around a model with HiDe layers: the expanded ones route per row, any
    other runs the fused change (unfolded; after `load_hide_model` they are folded already)."""
    from transformers import AutoTokenizer

    anchors_dir = Path(anchors_dir)
    if not (anchors_dir / ANCHORS).is_file() or not (anchors_dir / ROUTER).is_file():
        raise LlavaCError(
            f"no task anchors ({ANCHORS}, {ROUTER}) beside the HiDe experts",
            path=anchors_dir,
            fix="run the stage's after-training step (rerun the job: the pipeline does it)",
        )
    router = json.loads((anchors_dir / ROUTER).read_text())
    anchors = load_file(str(anchors_dir / ANCHORS))
    layers = hide_layers(model)
    experts = next(iter(layers.values())).experts
    if anchors["text"].shape[0] != experts:
        raise LlavaCError(
            f"{ANCHORS} holds {anchors['text'].shape[0]} task anchors for {experts} experts",
            path=anchors_dir,
            fix="rerun the stage's after-training step",
        )
    for name, layer in layers.items():
        layer.mode = "routed" if name in expanded else "fused"
        layer.fusion = fusion
    return RoutedHiDe(
        model,
        ClipFeatures(Path(router["clip"])),
        anchors,
        AutoTokenizer.from_pretrained(tokenizer_dir),
        router["temperature"],
        router["tasks"],
    )


def load_hide_model(model_dir: str, dtype: Any) -> nn.Module:
    """A stage's routed model (the evaluator's and the α-search actors' `ModelLoader`): the folded
    HF checkpoint, the expanded layers' experts, the CLIP and the anchors. A directory without
    HiDe experts (the initial model, stage 0) loads as the plain HF model."""
    model = load_hf_model(model_dir, dtype)
    if not (Path(model_dir) / SIDECAR).is_file():
        return model
    config = saved_config(Path(model_dir))
    attach_experts(model, Path(model_dir), config.expanded)
    return routed_model(model, config.expanded, config.fusion, Path(model_dir), Path(model_dir))


def hide_training(ctx: StageContext) -> TrainingParts:
    params: HiDeParams = ctx.params
    if ctx.job.training.full_finetune:
        raise LlavaCError(
            "hide trains LoRA experts, not the whole model", fix="set training.full_finetune=false"
        )
    if not (ctx.start_model / SIDECAR).is_file():
        if ctx.stage.index > 1:
            raise LlavaCError(
                f"stage {ctx.stage.index} starts from a model without HiDe experts",
                path=ctx.start_model,
                fix="start from the previous hide stage's model (rerun the job from its first "
                "stage)",
            )
        return TrainingParts(setup=HiDeSetup(params, ctx.start_model), init=ctx.start_model)
    base = Path(saved_config(ctx.start_model).base)
    if not (base / "config.json").is_file():
        raise LlavaCError(
            "the base model the earlier HiDe stages trained on is gone",
            path=base,
            fix="restore it (hide trains every stage's expert on the initial model's W)",
        )
    return TrainingParts(setup=HiDeSetup(params, base, ctx.start_model), init=base)


def hide_after_training(ctx: StageContext, trained: TrainedStage) -> None:
    """The stage's anchors (mean CLIP embeddings of its training rows, on Ray actors) appended to
    the earlier stages', written beside the experts and into RUN_DIR/method."""
    params: HiDeParams = ctx.params
    model_dir = Path(trained.model)
    experts = saved_config(model_dir).experts
    clip = params.clip_path or ensure_tiny_clip(model_dir, ctx.state_dir / "clip")
    earlier = {"image": torch.zeros(0), "text": torch.zeros(0)}
    tasks: list[str] = []
    if experts > 1:
        earlier = load_file(str(ctx.start_model / ANCHORS))
        tasks = json.loads((ctx.start_model / ROUTER).read_text())["tasks"]
    image, text = compute_anchors(
        Path(clip),
        model_dir,
        ctx.tasks(),
        ctx.job.model.template,
        num_actors=params.anchor_actors,
        cluster=ctx.job.cluster,
    )
    anchors = {
        "image": torch.cat([earlier["image"].reshape(-1, image.numel()), image[None]]),
        "text": torch.cat([earlier["text"].reshape(-1, text.numel()), text[None]]),
    }
    if anchors["text"].shape[0] != experts:
        raise LlavaCError(
            f"{experts} experts but {anchors['text'].shape[0]} task anchors after this stage",
            path=ctx.start_model,
            fix="rerun the job from its first stage",
        )
    for path in (model_dir / ANCHORS, ctx.state_file("hide_anchors")):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in anchors.items()}, str(tmp))
        tmp.replace(path)
    router = {
        "clip": str(Path(clip).absolute()),
        "temperature": params.temperature,
        "tasks": [*tasks, "+".join(ctx.stage.tasks)],
    }
    write_json_atomic(model_dir / ROUTER, router)


METHOD = register(
    Method(
        name="hide",
        summary="one LoRA expert per task; top layer mixed per row by CLIP anchors, lower layers fused",
        adds="top layer Σ_i softmax(sim/0.1)_i·s·B_i·A_i·x per row (sim to CLIP task anchors); "
        "lower layers s·(ΣB)(ΣA)",
        source="Guo et al., HiDe-LLaVA (ACL 2025), Ghy0501/HiDe-LLaVA clitmoelora.py",
        params=HiDeParams,
        training=hide_training,
        consolidation="none",
        consolidable=False,
        after_training=hide_after_training,
        load_model=load_hide_model,
    )
)
