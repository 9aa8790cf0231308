"""Run one training stage on Ray Train and bring its outputs (θ_t and the adapter) home.

The driver validates every input first (start checkpoint, data files, images) and writes the
training data as Parquet shards with the image bytes inside; Ray Data streams them to a
`TorchTrainer`, one split per worker, whose workers train with transformers' Trainer. A failed
worker group restarts from the last reported checkpoint (`FailureConfig`), not from scratch, and
from the micro-batch that checkpoint had reached.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_c_ray.data.records import load_records
from llava_c_ray.data.shards import is_current, prepare_shards, ray_dataset, read_manifest
from llava_c_ray.errors import LlavaCError
from llava_c_ray.files import move_into_place
from llava_c_ray.ray_session import ensure_ray
from llava_c_ray.train.spec import StageData, StageSpec, TrainFile

SHARDS = "shards"


@dataclass(frozen=True)
class StageResult:
    model_dir: Path
    adapter_dir: Path | None
    steps: int
    metrics: dict[str, Any]


def check_inputs(spec: StageSpec) -> StageData:
    """Fail before any training if the start checkpoint or any training record is unusable;
    returns the training data as Parquet shards (validated, images inside) for Ray Data."""
    if not (Path(spec.init) / "config.json").is_file():
        raise LlavaCError(
            "start checkpoint not found (no config.json)",
            path=spec.init,
            fix="pass a Hugging Face LLaVA checkpoint directory as --init",
        )
    if spec.inquiry is not None:
        load_records(spec.inquiry, None, require_answers=False)
    data = prepare_data(spec)
    if data.records // spec.num_workers == 0:
        raise LlavaCError(
            f"{data.records} training records cannot be split between {spec.num_workers} workers",
            fix="lower cluster.num_workers or add training records",
        )
    return data


def prepare_data(spec: StageSpec) -> StageData:
    """Each training source as Parquet shards: a directory from `llava-c data prepare` as it is, a
    JSON/JSONL file written under `out/shards/` (reused while the file is unchanged)."""
    directories, instructions, records = [], {}, 0
    for i, source in enumerate(spec.train_files):
        directory = shard_directory(source, spec.out / SHARDS / f"{i:02d}", spec.max_image_pixels)
        directories.append(directory)
        instructions[str(directory)] = source.instruction
        records += read_manifest(directory)["records"]
    return StageData(tuple(directories), instructions, records)


def shard_directory(source: TrainFile, cache: Path, max_pixels: int | None = None) -> Path:
    path = Path(source.path).absolute()
    if path.is_dir():
        return path
    if not is_current(cache, path):
        prepare_shards(
            path,
            source.image_folder,
            cache,
            records_per_shard=128,
            overwrite=True,
            max_pixels=max_pixels,
        )
    return cache.absolute()


def run_stage(spec: StageSpec) -> StageResult:
    """Train one stage with `spec.num_workers` Ray Train workers; outputs land in `spec.out`."""
    data = check_inputs(spec)
    ensure_ray()
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llava_c_ray.train.worker import train_loop_per_worker

    storage = Path(spec.storage_path or spec.out / "ray_train").resolve()
    resources = {"CPU": spec.cpus_per_worker, **spec.resources_per_worker}
    if spec.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "data": data, "steps": spec.optimizer_steps(data.records)},
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers, use_gpu=spec.use_gpu, resources_per_worker=resources
        ),
        datasets={"train": ray_dataset(list(data.directories), seed=spec.training.seed)},
        # Ordered splits: a resumed worker skips to the same rows it had reached.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=f"stage-{spec.name}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=spec.training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    from llava_c_ray.train.progress import PROGRESS_FILE, progress_bar

    with progress_bar(spec.out / PROGRESS_FILE, f"stage {spec.name}", spec.progress):
        result = fit(trainer)
    check_finite(result)
    outputs = collect_outputs(result, spec.out)
    shutil.rmtree(spec.out / SHARDS, ignore_errors=True)
    return outputs


def fit(trainer) -> Any:
    from ray.train import TrainingFailedError

    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        raise LlavaCError(f"training failed: {root_message(exc)}") from exc


def check_finite(result) -> None:
    """Turn the workers' non-finite-loss return value into the stage's error, naming the kept
    checkpoint."""
    from llava_c_ray.train.worker import NON_FINITE_MARKER

    failure = result.return_value or {}
    if NON_FINITE_MARKER not in failure:
        return
    kept = result.checkpoint.path if result.checkpoint is not None else "none saved yet"
    raise LlavaCError(f"training stopped: {failure['error']}\nLast good checkpoint: {kept}")


def root_message(exc: BaseException) -> str:
    """The last line of the worker's error (e.g. its non-finite-loss error), not Ray's wrapper."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def collect_outputs(result, out: Path) -> StageResult:
    """Copy the final checkpoint's `model/` and `adapter/` into `out`, renaming into place (an
    older `model/` or `adapter/` there goes only once its successor is in place)."""
    if result.checkpoint is None:
        raise LlavaCError("training finished without a final checkpoint", path=out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".final-", dir=out) as download:
        result.checkpoint.to_directory(download)
        for name in ("model", "adapter"):
            if (Path(download) / name).is_dir():
                move_into_place(Path(download) / name, out / name, overwrite=True)
    adapter = out / "adapter"
    return StageResult(
        model_dir=out / "model",
        adapter_dir=adapter if adapter.is_dir() else None,
        steps=int(result.metrics.get("step", 0)),
        metrics=dict(result.metrics),
    )
