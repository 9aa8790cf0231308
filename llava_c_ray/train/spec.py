"""What one training stage needs, independent of the YAML schema: `StageSpec`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from llava_c_ray.config import JobConfig, TaskConfig, TrainingConfig
from llava_c_ray.errors import LlavaCError
from llava_c_ray.train.hooks import LossTerm, ModelSetup, StepHook


@dataclass(frozen=True)
class TrainFile:
    path: Path
    image_folder: Path | None
    instruction: str = ""


@dataclass(frozen=True)
class StageData:
    """A stage's training data as prepared Parquet shard directories (`data.shards`)."""

    directories: tuple[Path, ...]
    instructions: dict[str, str]
    """Task instruction of each shard directory, by its absolute path."""
    records: int


@dataclass(frozen=True)
class StageSpec:
    """The inputs of `run_stage`: start checkpoint, data, the method's hooks, hyperparameters,
    workers."""

    name: str
    init: Path
    out: Path
    train_files: tuple[TrainFile, ...]
    training: TrainingConfig
    template: str = "vicuna_v1"
    setup: ModelSetup = field(default_factory=ModelSetup)
    losses: tuple[LossTerm, ...] = ()
    step_hooks: tuple[StepHook, ...] = ()
    inquiry: Path | None = None
    """Unlabeled inquiries packed into every micro-batch (when a loss term needs them)."""
    inquiry_rows: int = 1
    inquiries_per_row: int = 4
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    storage_path: Path | None = None
    max_image_pixels: int | None = None
    """Image pixel limit of the training records (None = the data layer's)."""
    progress: bool = True
    """Draw a progress bar on the driver (tqdm hides it when stderr is not a terminal)."""

    @classmethod
    def from_job(
        cls,
        job: JobConfig,
        *,
        tasks: list[TaskConfig],
        init: Path,
        out: Path,
        losses: tuple[LossTerm, ...] = (),
        step_hooks: tuple[StepHook, ...] = (),
        setup: ModelSetup | None = None,
        extra_files: tuple[TrainFile, ...] = (),
        name: str | None = None,
    ) -> StageSpec:
        """The stage training `tasks` (plus `extra_files`, e.g. replayed rows) with a method's
        loss terms, step hooks and model set-up."""
        inquiring = [term.name for term in losses if term.needs_inquiries]
        if inquiring and job.inquiry is None:
            raise LlavaCError(
                f"method {job.method.name!r} adds {inquiring}, which need unlabeled inquiries, "
                "but the job has no inquiry set",
                fix="set `inquiry.path` to unlabeled text-only inquiries",
            )
        files = tuple(TrainFile(t.train, t.image_folder, t.instruction) for t in tasks)
        return cls(
            name=name or "+".join(t.name for t in tasks),
            init=Path(init).absolute(),
            out=Path(out).absolute(),
            train_files=files + tuple(extra_files),
            training=job.training,
            template=job.model.template,
            setup=setup or ModelSetup(),
            losses=tuple(losses),
            step_hooks=tuple(step_hooks),
            inquiry=job.inquiry.path if inquiring and job.inquiry is not None else None,
            inquiry_rows=job.uir.rows_per_step,
            inquiries_per_row=job.uir.inquiries_per_row,
            num_workers=job.cluster.num_workers,
            use_gpu=job.cluster.use_gpu,
            cpus_per_worker=job.cluster.cpus_per_worker,
            resources_per_worker=dict(job.cluster.resources_per_worker),
            max_image_pixels=job.data.max_image_pixels,
        )

    @property
    def gradient_accumulation(self) -> int:
        return self.training.global_batch // (self.training.per_device_batch * self.num_workers)

    def optimizer_steps(self, records: int) -> int:
        """`training.max_steps`, else enough optimizer steps to see every row `epochs` times: each
        worker streams records // workers rows (Ray Data's equal split) in micro-batches of
        `per_device_batch`, `gradient_accumulation` micro-batches to a step."""
        t = self.training
        if t.max_steps:
            return t.max_steps
        micro_batches = math.ceil((records // self.num_workers) / t.per_device_batch)
        return max(1, math.ceil(t.epochs * micro_batches / self.gradient_accumulation))
