"""`replay`: stage t trains on D_t plus a uniform sample of earlier training rows (METHODS.md § replay).

The sample holds round(`ratio`·|D_t|) rows drawn uniformly from the pool of the earlier tasks'
*training* rows (`source: tasks`), from a labelled general data file (`general`, the LLaVA-c
paper's "data replay" baseline), or from both. Test and validation rows are never in the pool.
The drawn ids are kept in the run directory (`method/replay-NN.json`), so a resumed stage trains
on the same rows. Each source's rows are written as a training file of their own, keeping that
task's image folder and instruction suffix.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llava_c_ray.data.records import read_records
from llava_c_ray.data.shards import read_manifest
from llava_c_ray.errors import LlavaCError
from llava_c_ray.files import write_json_atomic
from llava_c_ray.methods.base import Method, Params, StageContext, TrainingParts, register
from llava_c_ray.train.spec import TrainFile

GENERAL = "general"


class ReplayParams(Params):
    ratio: float = Field(default=0.1, gt=0, le=1)
    """Replayed rows per stage as a fraction of the new task's training rows [choice]."""
    source: Literal["tasks", "general", "both"] = "tasks"
    """Replay earlier tasks' training rows, a labelled general data file, or both."""
    general_data: Path | None = None
    """Labelled general data (LLaVA JSON/JSONL) for `source: general | both`."""
    general_image_folder: Path | None = None
    """Folder the general data's `image` fields are relative to."""
    seed: int = 0
    """Seed of the draw (with the stage index)."""

    @field_validator("general_data", "general_image_folder")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        return path.expanduser().absolute() if path is not None else None

    @model_validator(mode="after")
    def _general_needs_data(self) -> ReplayParams:
        if self.source != "tasks" and self.general_data is None:
            raise ValueError(f"source={self.source} needs general_data (a LLaVA JSON/JSONL file)")
        return self


def json_rows(path: Path, owner: str) -> list[dict[str, Any]]:
    """The raw records of a training file replay can sample from."""
    if Path(path).is_dir():
        raise LlavaCError(
            f"replay samples rows of JSON/JSONL training files; {owner} trains from a prepared "
            "shard directory",
            path=path,
            fix="point the task's `train` at its JSON/JSONL file",
        )
    return read_records(path)


def pools(ctx: StageContext) -> dict[str, tuple[TrainFile, list[dict[str, Any]]]]:
    """The rows replay draws from, by source: each earlier task, and the general data."""
    params: ReplayParams = ctx.params
    found = {}
    if params.source != GENERAL:
        for task in ctx.earlier_tasks():
            source = TrainFile(task.train, task.image_folder, task.instruction)
            found[task.name] = (source, json_rows(task.train, f"task {task.name}"))
    if params.source != "tasks" and params.general_data is not None:
        source = TrainFile(params.general_data, params.general_image_folder)
        found[GENERAL] = (source, json_rows(params.general_data, "method.params.general_data"))
    return found


def stage_rows(ctx: StageContext) -> int:
    """|D_t|: the training rows of the stage's own tasks."""
    return sum(
        read_manifest(t.train)["records"] if Path(t.train).is_dir() else len(read_records(t.train))
        for t in ctx.tasks()
    )


def draw(ctx: StageContext, sizes: dict[str, int]) -> dict[str, list[int]]:
    """Row indices per source: round(ratio·|D_t|) drawn uniformly from the union of the pools."""
    params: ReplayParams = ctx.params
    pool = [(name, i) for name, size in sizes.items() for i in range(size)]
    count = min(len(pool), max(1, round(params.ratio * stage_rows(ctx))))
    chosen = random.Random(f"{params.seed}-{ctx.stage.index}").sample(pool, count)
    return {name: sorted(i for n, i in chosen if n == name) for name in sizes}


def drawn_ids(ctx: StageContext, found: dict) -> dict[str, list[str]]:
    """The sampled record ids per source: read back from the run directory, or drawn and kept."""
    state = ctx.state_dir / f"replay-{ctx.stage.index:02d}.json"
    if state.is_file():
        return json.loads(state.read_text())["ids"]
    indices = draw(ctx, {name: len(rows) for name, (_, rows) in found.items()})
    ids = {name: [str(found[name][1][i]["id"]) for i in picked] for name, picked in indices.items()}
    write_json_atomic(state, {"stage": ctx.stage.name, "ids": ids})
    return ids


def replay_training(ctx: StageContext) -> TrainingParts:
    """Write each source's replayed rows as a training file beside the stage; train on them too."""
    found = pools(ctx)
    if not found:
        return TrainingParts()
    files = []
    for name, picked in drawn_ids(ctx, found).items():
        if not picked:
            continue
        source, rows = found[name]
        by_id = {str(row["id"]): row for row in rows}
        out = ctx.stage_dir / "replay" / f"{name}.json"
        write_json_atomic(out, [by_id[i] for i in picked])
        files.append(TrainFile(out, source.image_folder, source.instruction))
    return TrainingParts(extra_files=tuple(files))


METHOD = register(
    Method(
        name="replay",
        summary="sequential LoRA + a sample of earlier training rows in every stage",
        adds="ratio × (rows of D_t) rows of earlier tasks (or general data) mixed into stage t",
        source="rehearsal baseline (LLaVA-c paper §5: data replay)",
        params=ReplayParams,
        training=replay_training,
    )
)
