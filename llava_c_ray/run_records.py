"""The run directory's records as typed models: the manifest (per stage, per step), the results
and a stage's evaluation output (eval.json).

The JSON they are saved as is the run directory's format (SPEC.md §4); reading one back validates
it, so a field read by the pipeline or the report always exists with its type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StepRecord(Record):
    """A finished step of a stage."""

    step: ClassVar[str]
    status: str = "done"
    finished: float
    seconds: float | None = None


class TrainRecord(StepRecord):
    step = "train"
    model: Path
    """θ_t: the stage's merged (or method-specific) model directory."""
    adapter: Path | None = None
    """The stage's LoRA adapter, when it trained one."""
    steps: int


class AfterTrainingRecord(StepRecord):
    step = "after_training"


class SearchRecord(StepRecord):
    step = "search"
    alpha: float
    rule: str
    trials: list[dict[str, Any]]
    experiment: Path


class ConsolidateRecord(StepRecord):
    step = "consolidate"
    model: Path
    method: str
    """The consolidation rule."""
    alpha: float


class EvaluateRecord(StepRecord):
    step = "evaluate"
    scores: dict[str, float]
    general: float | None = None
    eval: Path
    lmms: dict[str, float] = Field(default_factory=dict)
    """Each lmms-eval task's headline score (`eval.lmms_tasks`)."""
    lmms_eval: Path | None = None
    """lmms-eval's results JSON for the stage."""


class StageSteps(Record):
    train: TrainRecord | None = None
    after_training: AfterTrainingRecord | None = None
    search: SearchRecord | None = None
    consolidate: ConsolidateRecord | None = None
    evaluate: EvaluateRecord | None = None


class StageRecord(Record):
    index: int
    name: str = "initial"
    tasks: list[str] = Field(default_factory=list)
    start: Path | None = None
    """The checkpoint the stage started from."""
    alpha: float | None = None
    checkpoint: Path | None = None
    """The stage's consolidated model."""
    steps: StageSteps = Field(default_factory=StageSteps)


class Manifest(Record):
    job: str
    method: str
    config_hash: str
    created: float
    updated: float | None = None
    stages: list[StageRecord] = Field(default_factory=list)


class Results(Record):
    """results.json: the accuracy matrix (stages 0..T × tasks), the general score per stage and
    the continual-learning metrics once the run has finished."""

    job: str
    method: str
    tasks: list[str]
    stages: list[str]
    accuracy_matrix: list[list[float | None]]
    general: list[float | None]
    finished: bool
    metrics: dict[str, float | None] = Field(default_factory=dict)
    chance: dict[str, float | None] = Field(default_factory=dict)
    """Chance level of each task (and the probe), shown beside its scores."""
    lmms: dict[str, list[float | None]] = Field(default_factory=dict)
    """Each lmms-eval task's headline score per stage (`eval.lmms_tasks`): the general
    benchmarks' retention over the sequence."""


class TaskRouting(Record):
    """How a routed model (one that mixes experts per row) routed one evaluated task's questions."""

    rows: int
    mean_weights: list[float]
    """The mean routing weight of each expert over the task's questions (the experts' order)."""
    own_expert: float | None
    """Percent of the questions whose largest weight is their own task's expert; None when no
    expert was trained on the task (an unseen task, the general probe)."""


class Routing(Record):
    """eval.json's routing record: question's task × expert chosen."""

    experts: list[str]
    """The experts' names, each its task's (a multi-task stage's: its tasks joined by '+')."""
    tasks: dict[str, TaskRouting]


class EvalOutput(Record):
    """A stage's eval.json: the scores (mean × 100 per task), every sample (prompt, prediction,
    reference, score and, for a routed model, its routing weights) and the routing record."""

    model: str
    scores: dict[str, float]
    samples: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    routing: Routing | None = None
    """Only for a routed model."""
