"""`replay`: the drawn rows are earlier training rows only, their count follows `ratio`, and a
resumed stage draws the same ids (METHODS.md § replay)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_c_ray.config import job_from_dict
from llava_c_ray.data.records import read_records
from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods import StageContext, bind, get_method


def context(benchmark: Path, run: Path, stage: int, **params) -> StageContext:
    job = job_from_dict(
        {"benchmark": {"path": str(benchmark)}, "method": {"name": "replay", "params": params}}
    )
    bound = bind(job)
    stages = tuple(bound.stages([t.name for t in job.tasks]))
    current = stages[stage - 1]
    return StageContext(
        job, bound.params, current, stages, Path("start"), run / current.dirname, run / "method"
    )


def replayed(ctx: StageContext) -> dict[str, list[dict]]:
    files = get_method("replay").training(ctx).extra_files
    return {Path(f.path).stem: read_records(f.path) for f in files}


def test_stage_one_replays_nothing(tiny_benchmark: Path, tmp_path: Path) -> None:
    assert replayed(context(tiny_benchmark, tmp_path, 1)) == {}


def test_sample_is_earlier_training_rows_sized_by_ratio(tiny_benchmark: Path, tmp_path) -> None:
    ctx = context(tiny_benchmark, tmp_path, 3, ratio=0.5)
    rows = replayed(ctx)
    earlier = ctx.earlier_tasks()
    assert set(rows) <= {t.name for t in earlier} and rows
    own = len(read_records(ctx.tasks()[0].train))
    assert sum(len(r) for r in rows.values()) == min(round(0.5 * own), 2 * own)
    for task in earlier:
        train = {json.dumps(r, sort_keys=True) for r in read_records(task.train)}
        held_out = {r["id"] for split in (task.val, task.test) for r in read_records(split)}
        for row in rows.get(task.name, []):
            assert json.dumps(row, sort_keys=True) in train
            assert row["id"] not in held_out


def test_a_resumed_stage_trains_on_the_same_ids(tiny_benchmark: Path, tmp_path: Path) -> None:
    first = replayed(context(tiny_benchmark, tmp_path, 4, ratio=0.3))
    state = tmp_path / "method" / "replay-04.json"
    assert state.is_file()
    for path in (tmp_path / "04-count_math" / "replay").glob("*.json"):
        path.unlink()
    again = replayed(context(tiny_benchmark, tmp_path, 4, ratio=0.3))
    assert again == first
    other_seed = replayed(context(tiny_benchmark, tmp_path / "other", 4, ratio=0.3, seed=1))
    assert other_seed != first


def test_general_source_needs_its_data(tiny_benchmark: Path, tmp_path: Path) -> None:
    with pytest.raises(LlavaCError, match=r"method\.params.*general_data"):
        context(tiny_benchmark, tmp_path, 2, source="general")
