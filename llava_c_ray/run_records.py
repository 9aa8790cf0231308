"""The run directory's records as typed models: the manifest (per stage, per step) and the results.

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
