"""Run directory: manifest written atomically, resume on the same config, refusal on another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_c_ray.config import job_from_dict
from llava_c_ray.errors import LlavaCError
from llava_c_ray.run_records import EvaluateRecord, TrainRecord
from llava_c_ray.rundir import config_differences, open_run_dir


def trained(model: str = "m") -> TrainRecord:
    return TrainRecord(model=Path(model), steps=1, finished=0.0, seconds=3.0)


def evaluated() -> EvaluateRecord:
    return EvaluateRecord(scores={"a": 1.0}, eval=Path("e.json"), finished=0.0)


def make_job(**overrides: object):
    data = {"tasks": [{"name": "a", "train": "x", "test": "y"}], **overrides}
    return job_from_dict(data, check_files=False)


def test_new_run_writes_config_and_manifest(tmp_path: Path) -> None:
    run = open_run_dir(tmp_path / "run", make_job())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config_hash"] == make_job().hash()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert run.stage(1).steps.train is None


def test_reopen_resumes_recorded_steps(tmp_path: Path) -> None:
    run = open_run_dir(tmp_path / "run", make_job())
    run.record(1, trained())
    again = open_run_dir(tmp_path / "run", make_job())
    assert again.stage(1).steps.train == trained()
    assert again.stage(1).steps.evaluate is None
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_different_job_refused_with_differing_keys(tmp_path: Path) -> None:
    run = open_run_dir(tmp_path / "run", make_job())
    run.record(0, evaluated())
    with pytest.raises(LlavaCError, match=r"training\.lr: 2e-05 -> 0\.001"):
        open_run_dir(tmp_path / "run", make_job(training={"lr": 1e-3}))
    assert json.loads(run.manifest_file.read_text())["stages"][0]["steps"]["evaluate"]


def test_result_neutral_keys_resume_under_the_new_config(tmp_path: Path) -> None:
    """A run started before `log_every` existed (or with another value) resumes; the config and
    hash on record become the new ones. A key that changes results is still refused."""
    run = open_run_dir(tmp_path / "run", make_job())
    run.record(0, trained())
    config = tmp_path / "run" / "config.yaml"
    lines = config.read_text().splitlines(keepends=True)
    older = ("log_every", "group_by_length")  # keys an older llava-c did not write
    config.write_text("".join(line for line in lines if not any(k in line for k in older)))
    job = make_job(
        training={"log_every": 5, "prefetch_batches": 4},
        storage={"local_cache": str(tmp_path / "another-cache")},  # resolved per checkout
    )
    again = open_run_dir(tmp_path / "run", job)
    assert again.stage(0).steps.train == trained()
    assert again.manifest.config_hash == job.hash()
    assert "log_every: 5" in config.read_text()
    assert open_run_dir(tmp_path / "run", job).stage(0).steps.train
    with pytest.raises(LlavaCError, match=r"training\.lr"):
        open_run_dir(tmp_path / "run", make_job(training={"lr": 1e-3, "log_every": 5}))
    with pytest.raises(LlavaCError, match=r"training\.group_by_length: False -> True"):
        open_run_dir(tmp_path / "run", make_job(training={"group_by_length": True}))


def test_force_new_moves_old_run_aside(tmp_path: Path) -> None:
    open_run_dir(tmp_path / "run", make_job()).record(0, evaluated())
    open_run_dir(tmp_path / "run", make_job(training={"lr": 1e-3}), force_new=True)
    moved = list(tmp_path.glob("run.old-*"))
    assert len(moved) == 1 and (moved[0] / "manifest.json").is_file()


def test_non_run_directory_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep")
    with pytest.raises(LlavaCError, match="no manifest"):
        open_run_dir(tmp_path / "run", make_job())
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep"


def test_config_differences_nested() -> None:
    old = {"a": {"b": 1, "c": [1]}, "d": 2}
    new = {"a": {"b": 2, "c": [1]}, "e": 3}
    assert config_differences(old, new) == ["a.b: 1 -> 2", "d: 2 -> None", "e: None -> 3"]


def test_a_key_added_later_takes_its_default_in_the_stored_config(tmp_path: Path) -> None:
    """No list of added keys: the stored config is validated through the current schema, so a
    key it lacks takes its default; a run asking for another value is refused."""
    open_run_dir(tmp_path / "run", make_job()).record(0, trained())
    config = tmp_path / "run" / "config.yaml"
    config.write_text(
        "".join(line for line in config.read_text().splitlines(True) if "grad_clip" not in line)
    )
    assert open_run_dir(tmp_path / "run", make_job()).stage(0).steps.train == trained()
    with pytest.raises(LlavaCError, match=r"training\.grad_clip: 1\.0 -> 0\.5"):
        open_run_dir(tmp_path / "run", make_job(training={"grad_clip": 0.5}))


def test_a_broken_manifest_is_named(tmp_path: Path) -> None:
    open_run_dir(tmp_path / "run", make_job())
    (tmp_path / "run" / "manifest.json").write_text('{"job": 3}')
    with pytest.raises(LlavaCError, match="not a llava-c manifest"):
        open_run_dir(tmp_path / "run", make_job())
