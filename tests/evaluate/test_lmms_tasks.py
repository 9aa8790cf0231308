"""`write_lmms_tasks`: a job's tasks and probe as lmms-eval task files, without lmms-eval.

The rows are the ones our evaluator asks, the YAMLs name our hooks and rule, and the hooks score
as `data/scoring.py` does. test_lmms_model.py runs the written tasks in the real lmms-eval."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llava_c_ray.config import job_from_dict
from llava_c_ray.data.scoring import score
from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate.evaluator import task_queries
from llava_c_ray.evaluate.lmms_tasks import (
    INDEX,
    doc_to_text,
    doc_to_visual,
    job_eval_tasks,
    job_tag,
    lmms_task_name,
    process_results,
    write_lmms_tasks,
)


class TaskLoader(yaml.SafeLoader):
    """YAML as lmms-eval reads a task: `!function module.name` kept as its text."""


TaskLoader.add_constructor("!function", lambda loader, node: f"!function {node.value}")


@pytest.fixture(scope="module")
def job(tiny_benchmark: Path) -> Any:
    return job_from_dict(
        {
            "name": "smoke",
            "benchmark": {"path": str(tiny_benchmark), "tasks": ["icon_count", "attributes"]},
            "eval": {"max_new_tokens": 12, "max_samples": 3},
        }
    )


@pytest.fixture(scope="module")
def written(job: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_lmms_tasks(job, tmp_path_factory.mktemp("lmms") / "tasks")


def test_a_yaml_per_task_and_the_probe(job: Any, written: list[Path]):
    assert [p.stem for p in written] == ["icon_count", "attributes", "general_probe"]
    for path in written:
        config = yaml.load(path.read_text(), Loader=TaskLoader)  # noqa: S506 (our SafeLoader)
        task = next(t for t in job_eval_tasks(job) if t.name == path.stem)
        assert config["task"] == lmms_task_name(task.name)
        assert config["tag"] == [job_tag(job)]
        assert config["dataset_path"] == "json"
        assert Path(config["dataset_kwargs"]["data_files"]["test"]) == path.with_suffix(".jsonl")
        assert config["output_type"] == "generate_until"
        assert config["process_results"] == "!function utils.process_results"
        generation = {"max_new_tokens": 12, "do_sample": False, "until": []}
        assert config["generation_kwargs"] == generation
        assert config["metadata"]["scoring"] == task.scoring
        assert path.read_text().startswith("# lmms-eval task"), "the header shows the command"


def test_rows_are_the_ones_our_evaluator_asks(job: Any, written: list[Path]):
    for task in job_eval_tasks(job):
        lines = (written[0].parent / f"{task.name}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        queries = task_queries(task, job.eval.max_samples)
        assert len(rows) == len(queries) == 3
        for row, query in zip(rows, queries, strict=True):
            assert doc_to_text(row) == query.question
            assert row["image"] == query.image and row["answer"] == query.reference
            assert row["scoring"] == task.scoring


def test_index_and_utils(job: Any, written: list[Path]):
    out = written[0].parent
    index = json.loads((out / INDEX).read_text())
    assert index["tag"] == job_tag(job)
    assert list(index["tasks"]) == [lmms_task_name(p.stem) for p in written]
    # utils.py imports our hooks, as lmms-eval's `!function utils.x` loads it from the directory
    sys.path.insert(0, str(out))
    try:
        import utils  # type: ignore[import-not-found]

        assert utils.process_results is process_results
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("utils", None)


def test_hooks_score_by_our_rule(written: list[Path]):
    rows = [json.loads(line) for line in written[0].with_suffix(".jsonl").read_text().splitlines()]
    row = rows[0]
    assert row["scoring"] == "choice"
    assert process_results(row, [row["answer"]]) == {"score": 100.0}
    wrong = "(Z)"
    assert process_results(row, [wrong]) == {"score": 100.0 * score(wrong, row["answer"], "choice")}
    (image,) = doc_to_visual(row)
    assert image.mode == "RGB"
    assert doc_to_visual({**row, "image": None}) == []


def test_refuses_a_foreign_directory_and_replaces_its_own(job: Any, tmp_path: Path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(LlavaCError, match="not written by"):
        write_lmms_tasks(job, foreign, overwrite=True)
    ours = tmp_path / "ours"
    write_lmms_tasks(job, ours)
    with pytest.raises(LlavaCError, match="--overwrite"):
        write_lmms_tasks(job, ours)
    assert write_lmms_tasks(job, ours, overwrite=True)[0].is_file()


def test_the_command_writes_a_jobs_tasks_and_prints_how_to_run_them(
    tiny_benchmark: Path, tmp_path: Path, capsys
) -> None:
    from llava_c_ray.cli import main

    overrides = [f"benchmark.path={tiny_benchmark}", "eval.max_samples=2"]
    assert main(["eval", "tasks", "smoke", "--out", str(tmp_path / "t"), *overrides]) == 0
    out = capsys.readouterr().out
    assert "--include_path" in out and "llava_c_job_smoke" in out
    assert (tmp_path / "t" / INDEX).is_file()
    assert main(["eval", "tasks", "smoke", "--out", str(tmp_path), *overrides]) == 2  # not ours
