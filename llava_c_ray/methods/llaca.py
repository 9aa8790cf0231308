"""`llaca`: LoRA with an adaptive EMA of the trained weights after every step (LLaCA; METHODS.md § llaca).

After every optimizer step, for every trainable tensor θ with its clipped, averaged gradient g, the
rule of `llaca_rule.py`: θ* ← (1 − rate)·θ* + rate·θ_t with rate = 2(1 + ‖g_t‖₁)/(‖θ_t − θ*‖₁·
‖g_t − g_{t−1}‖₁), 0.01 on the first step or outside (0, 1). Training continues on θ; at the stage
end θ ← θ*, so the stage saves θ* [src JingyangQiao/CoIN `LoraModel.ema_update`, called after
`optimizer.step()`, before `zero_grad`]. Recipe: LoRA r128/α256, lr 2e-4, projector 2e-5.

Two modes (`carry_adapter`):
- true (the published recipe): one LoRA carried from task to task. Every stage loads the job's
  initial model θ̃_0 and the previous stage's adapter (its LoRA and projector, = θ* of that stage)
  and keeps training it; the stage's merged model θ̃_0 + adapter is what it evaluates. After each
  stage `after_training` copies the adapter to `method/llaca-adapter-NN/` and, after stage 1,
  records θ̃_0 (stage 1's start model) in `method/llaca.json`.
- false: a fresh LoRA per stage, merged into the stage-start model (as `finetune`).
Consolidation: none.

Where the hook sees the gradients:
- DDP (and a single worker): transformers' Trainer calls the `on_optimizer_step` callback right
  after `self.optimizer.step()`, after `_clip_grad_norm` and before `model.zero_grad()`
  (transformers/trainer.py, the `do_sync_step` branch), so every `p.grad` there is the clipped,
  all-reduced average, identical on every rank, as are the parameters: every rank computes the
  same θ* with no collective.
- DeepSpeed ZeRO-2/3: there the Trainer's `optimizer.step()` is a no-op (accelerate's
  `DeepSpeedOptimizerWrapper`); DeepSpeed's `engine.step()` already ran inside
  `accelerator.backward` and freed the gradients — ZeRO-2 sets its fp32 partition's `.grad` to
  None right after its inner step (`stage_1_and_2.py` `step`), ZeRO-3 in `_release_sub_group`.
  So the hook wraps the optimizer step instead: a torch optimizer step post-hook, filtered to the
  ZeRO optimizer's inner torch optimizer, runs once per ZeRO parameter group (ZeRO-2) or sub-group
  (ZeRO-3), when that group's flat fp32 partition holds the updated θ and, in its `.grad`, the
  unscaled, clipped, averaged fp32 gradient. Each rank takes its local fragment of every tensor
  of the group (ZeRO-2: `param._hp_mapping`'s fragment address in the partition; ZeRO-3: the
  `grad_position` range, the same view `deepspeed.utils.safe_get_local_fp32_param` returns),
  computes `partial_sums`, all-reduces the [n_tensors × 3] sums over the data-parallel group (one
  collective per group, the same sequence on every rank), and updates its fragments of θ*.
  `safe_get_local_grad` is not used: it returns the reduced gradient partition before unscaling
  and clipping. θ* and g_{t−1} are therefore sharded like the optimizer state. CPU offload is not
  supported (its fp32 partition lives on the CPU; the hook says so).
  The post-hook is registered when the model is built (`LLaCASetup` binds the hook to it), as
  the Trainer's callbacks run only after DeepSpeed's first step could be watched.

ZeRO is chosen by the job (`training.strategy == "deepspeed"` sets `LLaCAHook.zero`); the ZeRO
stage is read from the parameters (ZeRO-3 parameters carry `ds_id`, ZeRO-1/2 ones `_hp_mapping`).

Memory: the hook's state is two fp32 copies of the trainable parameters (θ* and g_{t−1}), per
worker under DDP and 1/N of them per worker under ZeRO (bench/llaca_memory.py measures it).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llava_c_ray.config import TrainingConfig
from llava_c_ray.errors import LlavaCError
from llava_c_ray.files import atomic_directory, write_json_atomic
from llava_c_ray.methods import llaca_rule
from llava_c_ray.methods.base import (
    Method,
    Params,
    StageContext,
    TrainedStage,
    TrainingParts,
    register,
)
from llava_c_ray.train.hooks import ModelSetup, StepHook, add_lora, unwrap

STATE_FILE = "llaca.json"


class LLaCAParams(Params):
    carry_adapter: bool = True
    """Carry one LoRA from task to task (the published recipe); false: a fresh LoRA per stage,
    merged into the stage-start model."""


def adapter_state_dir(state_dir: Path, index: int) -> Path:
    """The adapter (θ* of its LoRA and projector) stage `index` ended with."""
    return state_dir / f"llaca-adapter-{index:02d}"


@dataclass
class Fragments:
    """One ZeRO group's tensors as this rank holds them: names, local θ and gradient fragments."""

    names: list[str]
    thetas: list[torch.Tensor]
    grads: list[torch.Tensor]
    group: Any = None
    """The data-parallel process group the partial sums are reduced over."""


class LLaCAHook(StepHook):
    """θ* ← (1 − rate)·θ* + rate·θ after every optimizer step (llaca_rule); θ ← θ* at the end.

    State, keyed by parameter name: `star.<name>` (θ*), `grad.<name>` (g_{t−1}), both fp32 (under
    ZeRO this rank's fragments), and `steps`, the optimizer steps seen (0: the next one is the
    first, which copies θ into θ*). Logged per step: `llaca_mean_rate`, `llaca_fallback_share`.
    """

    name = "llaca"

    def __init__(self, zero: bool = False):
        self.zero = zero
        self.stars: dict[str, torch.Tensor] = {}
        self.prev_grads: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.model: nn.Module | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = None

    def bind(self, model: nn.Module) -> None:
        """Called with the model to train before the Trainer wraps it; under ZeRO, start watching
        the optimizer steps of the ZeRO optimizer that will be built around it."""
        self.model = model
        if self.zero and self.handle is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            self.handle = register_optimizer_step_post_hook(self.after_zero_group_step)

    # The rule on lists of tensors (whole tensors, or this rank's fragments under ZeRO).

    def advance(self, frags: Fragments) -> None:
        """One step of the rule on `frags`; new names start as θ* = θ (their first step)."""
        known = [k for k, n in enumerate(frags.names) if n in self.stars]
        new = [k for k, n in enumerate(frags.names) if n not in self.stars]
        for k in new:
            name = frags.names[k]
            self.stars[name] = frags.thetas[k].detach().float().clone()
            self.prev_grads[name] = frags.grads[k].detach().float().clone()
        if new:
            fallback = torch.ones(len(new), dtype=torch.bool)
            rates = torch.full((len(new),), llaca_rule.FALLBACK_RATE, dtype=torch.float64)
            self.pending.append((rates, fallback))
        if not known:
            return
        names = [frags.names[k] for k in known]
        thetas = [frags.thetas[k].detach().float() for k in known]
        grads = [frags.grads[k].detach().float() for k in known]
        stars = [self.stars[n] for n in names]
        prev = [self.prev_grads[n] for n in names]
        sums = llaca_rule.partial_sums(thetas, stars, grads, prev)
        if frags.group is not None:
            torch.distributed.all_reduce(sums, group=frags.group)
        rates, fallback = llaca_rule.rates(sums, first_step=False)
        llaca_rule.ema_update_(stars, thetas, rates)
        torch._foreach_copy_(prev, grads)
        self.pending.append((rates.cpu(), fallback.cpu()))

    def step_stats(self) -> dict[str, float]:
        if not self.pending:
            return {}
        rates = torch.cat([r for r, _ in self.pending])
        fallback = torch.cat([f for _, f in self.pending])
        self.pending.clear()
        self.steps += 1
        return {
            "mean_rate": float(rates.double().mean()),
            "fallback_share": float(fallback.double().mean()),
        }

    # DDP: everything happens in the Trainer's callback.

    def on_optimizer_step(self, model: nn.Module) -> dict[str, float]:
        if self.zero:
            if self.handle is None:
                raise LlavaCError(
                    "llaca's step hook was never bound to the model under DeepSpeed",
                    fix="build the stage's model with llaca's own set-up (LLaCASetup)",
                )
            return self.step_stats()  # the updates ran in `after_zero_group_step`
        named = [
            (n, p)
            for n, p in unwrap(model).named_parameters()
            if p.requires_grad and p.grad is not None
        ]
        if not named:
            raise LlavaCError(
                "llaca found no gradients after the optimizer step",
                fix="under DeepSpeed the hook needs `zero=True` (training.strategy=deepspeed)",
            )
        with torch.no_grad():
            self.advance(
                Fragments([n for n, _ in named], [p for _, p in named], [p.grad for _, p in named])
            )
        return self.step_stats()

    # ZeRO: a post-hook on the inner torch optimizer, once per (sub-)group.

    def zero_optimizer(self) -> Any:
        """The DeepSpeed ZeRO optimizer the bound model's parameters belong to (None before)."""
        for param in self.model.parameters():
            owner = getattr(param, "_z3_optimizer", None) or getattr(param, "_zero_optimizer", None)
            if owner is not None:
                return owner
        return None

    @torch.no_grad()
    def after_zero_group_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        zero = self.zero_optimizer() if self.model is not None else None
        if zero is None or optimizer is not getattr(zero, "optimizer", None):
            return
        flats = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        for flat in flats:
            self.advance(self.zero_fragments(zero, flat))

    def zero_fragments(self, zero: Any, flat: torch.Tensor) -> Fragments:
        """This rank's fragments of every tensor whose fp32 partition is `flat`."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        if getattr(zero, "offload_optimizer", False) or getattr(zero, "cpu_offload", False):
            raise LlavaCError(
                "llaca does not support DeepSpeed optimizer offload",
                fix="turn offload_optimizer off in the DeepSpeed config",
            )
        thetas, grads, order = [], [], []
        if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
            index = next(i for i, t in enumerate(zero.fp32_partitioned_groups_flat) if t is flat)
            for param in zero.fp16_groups[index]:
                _, offset, numel = zero.grad_position[zero.get_param_id(param)]
                order.append(names[id(param)])
                thetas.append(flat.narrow(0, offset, numel))
                grads.append(flat.grad.narrow(0, offset, numel))
            return Fragments(order, thetas, grads, zero.dp_process_group)
        index = next(i for i, t in enumerate(zero.single_partition_of_fp32_groups) if t is flat)
        for param in zero.bit16_groups[index]:  # ZeRO-1/2: a tensor may lie on other ranks only
            mapping = param._hp_mapping
            start, numel = (
                (0, 0)
                if mapping is None
                else (mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel)
            )
            order.append(names[id(param)])
            thetas.append(flat.narrow(0, start, numel))
            grads.append(flat.grad.narrow(0, start, numel))
        return Fragments(order, thetas, grads, zero.real_dp_process_group[index])

    # State and the end of the stage.

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"steps": torch.tensor(self.steps)}
        state |= {f"star.{n}": t for n, t in self.stars.items()}
        state |= {f"grad.{n}": t for n, t in self.prev_grads.items()}
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], model: nn.Module) -> None:
        device = next(p.device for p in unwrap(model).parameters() if p.requires_grad)
        self.steps = int(state["steps"])
        self.stars = {
            k.removeprefix("star."): v.to(device) for k, v in state.items() if k.startswith("star.")
        }
        self.prev_grads = {
            k.removeprefix("grad."): v.to(device) for k, v in state.items() if k.startswith("grad.")
        }

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> None:
        """θ ← θ* on every rank (under ZeRO: the fp32 fragments, then the bit16 weights)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        inner = unwrap(model)
        zero = self.zero_optimizer() if self.zero else None
        if zero is None:
            for name, param in inner.named_parameters():
                if name in self.stars:
                    param.copy_(self.stars[name].view_as(param))
            return
        if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3: fp32 and bit16 partitions
            from deepspeed.utils import safe_set_local_fp32_param

            for name, param in inner.named_parameters():
                if name in self.stars:
                    safe_set_local_fp32_param(param, self.stars[name])
                    param.ds_tensor.copy_(self.stars[name].view_as(param.ds_tensor))
            return
        for name, param in inner.named_parameters():  # ZeRO-1/2
            mapping = getattr(param, "_hp_mapping", None)
            if name in self.stars and mapping is not None:
                mapping.hp_fragment.copy_(self.stars[name])
        zero.update_lp_params()  # bit16 copies of every partition, all-gathered (collective)


@dataclass
class LLaCASetup(ModelSetup):
    """A LoRA (and the projector) to train: fresh, or the previous stage's adapter (`adapter`),
    continued. LoRA's random init is seeded with `training.seed`, so a rerun starts equal. Binds
    the stage's `LLaCAHook` to the model it builds."""

    hook: LLaCAHook
    adapter: Path | None = None

    def __call__(self, model: nn.Module, training: TrainingConfig) -> nn.Module:
        if training.full_finetune:
            raise LlavaCError("llaca trains a LoRA adapter", fix="set training.full_finetune=false")
        torch.manual_seed(training.seed)
        if self.adapter is None:
            model = add_lora(model, training)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(self.adapter), is_trainable=True)
        self.hook.bind(model)
        return model


def training_parts(ctx: StageContext, hook: LLaCAHook) -> TrainingParts:
    """The stage's parts around `hook` (a subclass in tests)."""
    params: LLaCAParams = ctx.params
    if not params.carry_adapter or ctx.stage.index == 1:
        return TrainingParts(step_hooks=(hook,), setup=LLaCASetup(hook))
    adapter = adapter_state_dir(ctx.state_dir, ctx.stage.index - 1)
    state = ctx.state_dir / STATE_FILE
    if not (adapter / "adapter_config.json").is_file() or not state.is_file():
        raise LlavaCError(
            "the adapter LLaCA carries from the previous stage is missing",
            path=adapter,
            fix="rerun the job from its first stage (the run directory lost method/)",
        )
    initial = Path(json.loads(state.read_text())["initial_model"])
    return TrainingParts(step_hooks=(hook,), setup=LLaCASetup(hook, adapter=adapter), init=initial)


def llaca_training(ctx: StageContext) -> TrainingParts:
    return training_parts(ctx, LLaCAHook(zero=ctx.job.training.strategy == "deepspeed"))


def keep_adapter(ctx: StageContext, trained: TrainedStage) -> None:
    """Carry mode: keep the stage's adapter for the next stage, and θ̃_0 after stage 1."""
    if not ctx.params.carry_adapter:
        return
    if trained.adapter is None:
        raise LlavaCError("llaca needs LoRA training", fix="set training.full_finetune=false")
    if ctx.stage.index == 1:
        write_json_atomic(ctx.state_dir / STATE_FILE, {"initial_model": str(ctx.start_model)})
    with atomic_directory(adapter_state_dir(ctx.state_dir, ctx.stage.index), overwrite=True) as tmp:
        shutil.copytree(trained.adapter, tmp, dirs_exist_ok=True)


METHOD = register(
    Method(
        name="llaca",
        summary="LoRA carried across tasks + an adaptive EMA of the weights after every step",
        adds="θ* ← (1−r)·θ* + r·θ after every step, r = 2(1+‖g‖₁)/(‖θ−θ*‖₁·‖g−g₋₁‖₁); θ ← θ* "
        "at the stage end",
        source="Qiao et al., LLaCA (adaptive EMA), JingyangQiao/CoIN",
        params=LLaCAParams,
        training=llaca_training,
        after_training=keep_adapter,
    )
)
