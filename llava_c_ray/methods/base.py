"""The method interface: what a continual-learning method decides, as hooks the pipeline calls.

A method is a `Method` registered by name in one small module of this package. The pipeline, the
stage runner, the evaluator and the α search call its hooks and never branch on its name:

- `plan`: how the task sequence becomes stages (one per task; `joint`: one stage on the union);
- `params`: a pydantic model of the method's typed parameters, validated from `method.params`;
- `training(ctx)`: what the training workers get for a stage — the model set-up, loss terms
  added in `compute_loss` (each logged by name), per-optimizer-step hooks with checkpointed state,
  and extra training files (e.g. replayed rows);
- `consolidation`: the rule (llava_c_ray/consolidate/rules.py) that turns θ_t into θ̃_t,
  overridable by the job's `consolidation.method`;
- `after_training(ctx, trained)`: driver-side work once a stage has trained — e.g. a Fisher
  estimate or the adapter's subspace — written under the run directory's `method/` folder, which
  later stages read (a rerun after a killed driver finds it there);
- `load_model`: how the evaluator and the α-search actors load a stage's model (default: a plain
  Hugging Face checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from llava_c_ray.config import JobConfig, TaskConfig
from llava_c_ray.consolidate.rules import Rule, get_rule
from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate.evaluator import ModelLoader, load_hf_model
from llava_c_ray.train.hooks import LossTerm, ModelSetup, StepHook
from llava_c_ray.train.spec import TrainFile


class Params(BaseModel):
    """Base of every method's parameters: unknown keys are errors, values are checked."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False
    )


@dataclass(frozen=True)
class Stage:
    """One training stage: its 1-based index, a name for its directory, the tasks it trains on."""

    index: int
    name: str
    tasks: tuple[str, ...]

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.name}"


def one_stage_per_task(task_names: Sequence[str]) -> list[Stage]:
    return [Stage(i, name, (name,)) for i, name in enumerate(task_names, start=1)]


@dataclass(frozen=True)
class StageContext:
    """What a method's driver-side hooks see of one stage."""

    job: JobConfig
    params: Params
    stage: Stage
    stages: tuple[Stage, ...]
    start_model: Path
    stage_dir: Path
    """RUN_DIR/stages/NN-<name>: the stage's own outputs."""
    state_dir: Path
    """RUN_DIR/method: method state that later stages read."""

    def tasks(self) -> list[TaskConfig]:
        return [self.job.task(name) for name in self.stage.tasks]

    def state_file(self, name: str, index: int | None = None) -> Path:
        """`RUN_DIR/method/<name>-NN.safetensors`: the method's state after stage NN (this one)."""
        return (
            self.state_dir
            / f"{name}-{self.stage.index if index is None else index:02d}.safetensors"
        )

    def earlier_state(self, name: str) -> Path | None:
        """The state the previous stage left (None in stage 1), or an error if it is missing."""
        if self.stage.index == 1:
            return None
        path = self.state_file(name, self.stage.index - 1)
        if not path.is_file():
            raise LlavaCError(
                f"the state the earlier stages left for this method ({name}) is missing",
                path=path,
                fix="rerun the job from its first stage (the run directory lost method/)",
            )
        return path

    def earlier_tasks(self) -> list[TaskConfig]:
        """Tasks trained in the stages before this one, in order."""
        names = [n for s in self.stages[: self.stage.index - 1] for n in s.tasks]
        return [self.job.task(name) for name in names if name not in self.stage.tasks]


@dataclass(frozen=True)
class TrainingParts:
    """What a method adds to a stage's training (all picklable: they travel to the workers)."""

    losses: tuple[LossTerm, ...] = ()
    step_hooks: tuple[StepHook, ...] = ()
    setup: ModelSetup = field(default_factory=ModelSetup)
    extra_files: tuple[TrainFile, ...] = ()
    init: Path | None = None
    """The checkpoint the stage's workers load (None: the stage-start model θ̃_{t-1}); e.g. the
    initial model when a method carries one adapter across stages."""


@dataclass(frozen=True)
class TrainedStage:
    """Where a stage's training put θ_t (merged) and its adapter (None after a full fine-tune)."""

    model: Path
    adapter: Path | None


def plain_training(ctx: StageContext) -> TrainingParts:
    return TrainingParts()


@dataclass(frozen=True)
class Method:
    """A registered continual-learning method: a name, its parameters and its hooks."""

    name: str
    summary: str
    adds: str = "—"
    """What it adds to sequential LoRA (the README's method table)."""
    source: str = "—"
    params: type[Params] = Params
    plan: Callable[[Sequence[str]], list[Stage]] = one_stage_per_task
    training: Callable[[StageContext], TrainingParts] = plain_training
    consolidation: str = "none"
    consolidable: bool = True
    """False when the stage model is routed at inference (no merged weights to consolidate): a
    consolidating `consolidation.method` is then refused at load time."""
    after_training: Callable[[StageContext, TrainedStage], None] | None = None
    load_model: ModelLoader = load_hf_model

    def parse_params(self, raw: dict) -> Params:
        """The method's typed parameters from `method.params`, or one error naming every bad key."""
        try:
            return self.params.model_validate(raw)
        except ValidationError as exc:
            lines = [
                "  "
                + ".".join(["method.params", *(str(p) for p in err["loc"])])
                + ": "
                + (
                    "unknown key"
                    if err["type"] == "extra_forbidden"
                    else err["msg"].removeprefix("Value error, ")
                )
                for err in exc.errors()
            ]
            raise LlavaCError(
                f"invalid parameters of method {self.name!r}:\n" + "\n".join(lines),
                fix=f"see `llava-c methods` for the parameters of {self.name} and their ranges",
            ) from None

    def parameter_lines(self) -> list[str]:
        """`name = default — description` of every parameter (for `llava-c methods`)."""
        return [
            f"{name} = {info.default!r} — {info.description or ''}".rstrip(" —")
            for name, info in self.params.model_fields.items()
        ]


@dataclass(frozen=True)
class BoundMethod:
    """A job's method with its validated parameters and the consolidation rule it uses."""

    method: Method
    params: Params
    rule: Rule

    def stages(self, task_names: Sequence[str]) -> list[Stage]:
        return self.method.plan(task_names)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method called `name`, or an error listing the known ones."""
    if name not in METHODS:
        raise LlavaCError(
            f"unknown method {name!r} (method.name)",
            fix=f"use one of: {', '.join(sorted(METHODS))}",
        )
    return METHODS[name]


def bind(job: JobConfig) -> BoundMethod:
    """The job's method, its parameters and its consolidation rule, each checked by name."""
    method = get_method(job.method.name)
    params = method.parse_params(job.method.params)
    rule = get_rule(job.consolidation.method or method.consolidation)
    if rule.consolidates and not method.consolidable:
        raise LlavaCError(
            f"method {method.name!r} routes its stage model at inference and has no merged "
            f"weights to consolidate (consolidation.method = {rule.name!r})",
            fix=f"remove consolidation.method ({method.name} uses `{method.consolidation}`)",
        )
    return BoundMethod(method, params, rule)
