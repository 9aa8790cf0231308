"""Job config loading: good files, overrides, and every class of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llava_c_ray.cli import main
from llava_c_ray.config import apply_override, job_from_dict, load_job
from llava_c_ray.errors import LlavaCError


@pytest.fixture
def data_files(tmp_path: Path) -> dict[str, str]:
    files = {}
    for split in ("train", "val", "test"):
        path = tmp_path / f"{split}.json"
        path.write_text("[]")
        files[split] = str(path)
    return files


@pytest.fixture
def job_file(tmp_path: Path, data_files: dict[str, str]) -> Path:
    job = {
        "name": "t",
        "tasks": [{"name": "icon", **data_files, "scoring": "choice"}],
        "training": {"per_device_batch": 4, "global_batch": 16},
        "cluster": {"num_workers": 2},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_good_job_loads_with_defaults(job_file: Path) -> None:
    job = load_job(job_file)
    assert job.tasks[0].name == "icon"
    assert job.consolidation.alpha == 0.2
    assert job.training.lora_r == 128 and job.training.lora_alpha == 256
    assert job.gradient_accumulation == 2
    assert job.method.name == "llava_c"


def test_overrides_parse_yaml_values(job_file: Path) -> None:
    job = load_job(
        job_file,
        ["training.lr=1e-4", "search.enabled=true", "search.objective.general=0", "tasks.0.name=x"],
    )
    assert job.training.lr == 1e-4
    assert job.search.enabled is True
    assert job.tasks[0].name == "x"


def test_search_needs_the_validation_splits_it_weighs(job_file: Path, data_files) -> None:
    with pytest.raises(LlavaCError, match="general_probe.val"):
        load_job(job_file, ["search.enabled=true"])
    with pytest.raises(LlavaCError, match="`val` split for every task"):
        load_job(
            job_file, ["search.enabled=true", "search.objective.general=0", "tasks.0.val=null"]
        )
    probe = f"general_probe={{path: {data_files['test']}, val: {data_files['val']}}}"
    assert load_job(job_file, ["search.enabled=true", probe]).general_probe.val.name == "val.json"


def test_hash_changes_with_config(job_file: Path) -> None:
    assert load_job(job_file).hash() == load_job(job_file).hash()
    assert load_job(job_file).hash() != load_job(job_file, ["training.lr=1e-3"]).hash()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("consolidation.alpha=1.5", "consolidation.alpha"),
        ("consolidation.alpha=-0.1", "consolidation.alpha"),
        ("training.lrr=1e-4", "training.lrr"),
        ("training.lr=fast", "training.lr"),
        ("training.per_device_batch=0", "training.per_device_batch"),
        ("training.global_batch=10", "global_batch"),
        ("training.strategy=deepspeed", "training.strategy"),
        ("search.space=[]", "search.space"),
        ("search.space=[0.1, 2.0]", "search.space"),
        ("consolidation.boundary=wrap", "consolidation.boundary"),
        ("tasks.5.name=x", "tasks.5.name"),
        ("training", "training"),
    ],
)
def test_bad_values_name_the_key(job_file: Path, override: str, key: str) -> None:
    with pytest.raises(LlavaCError, match=key.replace(".", r"\.")):
        load_job(job_file, [override])


def test_all_zero_objective_weights_rejected(job_file: Path) -> None:
    zeros = ["search.objective.new=0", "search.objective.old=0", "search.objective.general=0"]
    with pytest.raises(LlavaCError, match="search.objective"):
        load_job(job_file, zeros)


def test_missing_data_files_listed_all_at_once(tmp_path: Path) -> None:
    job = {"tasks": [{"name": "a", "train": str(tmp_path / "no1.json"), "test": "no2.json"}]}
    with pytest.raises(LlavaCError) as err:
        job_from_dict(job)
    assert "tasks.0.train" in str(err.value) and "tasks.0.test" in str(err.value)
    job_from_dict(job, check_files=False)


def test_duplicate_task_names_rejected(data_files: dict[str, str]) -> None:
    task = {"name": "a", **data_files}
    with pytest.raises(LlavaCError, match="unique"):
        job_from_dict({"tasks": [task, task]})


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [unclosed")
    with pytest.raises(LlavaCError, match="bad.yaml"):
        load_job(bad)
    with pytest.raises(LlavaCError, match="not found"):
        load_job(tmp_path / "absent.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3")
    with pytest.raises(LlavaCError, match="mapping"):
        load_job(scalar)


def test_override_without_equals_rejected() -> None:
    with pytest.raises(LlavaCError, match="key=value"):
        apply_override({}, "training.lr")


def test_benchmark_expands_into_tasks(tmp_path: Path, data_files: dict[str, str]) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "images").mkdir()
    for name in ("train.json", "val.json", "test.json", "inquiry.json"):
        (bench / name).write_text("[]")
    task = {
        "name": "icon",
        "train": "train.json",
        "val": "val.json",
        "test": "test.json",
        "image_folder": "images",
        "instruction": "Answer.",
        "scoring": "choice",
        "chance": 25.0,
    }
    index = {
        "general": [],
        "continual": [task],
        "inquiry": {"path": "inquiry.json"},
        "general_probe": {"test": "test.json", "image_folder": "images", "scoring": "f1"},
    }
    (bench / "benchmark.json").write_text(json.dumps(index))
    job = job_from_dict({"benchmark": {"path": str(bench)}}, ["tasks.0.instruction=Say it."])
    assert [t.name for t in job.tasks] == ["icon"]
    assert job.tasks[0].instruction == "Say it."
    assert job.inquiry is not None and job.general_probe is not None
    with pytest.raises(LlavaCError, match="llava-c data synth"):
        job_from_dict({"benchmark": {"path": str(tmp_path / "none")}})
    picked = job_from_dict({"benchmark": {"path": str(bench), "tasks": ["icon"]}})
    assert [t.name for t in picked.tasks] == ["icon"]
    with pytest.raises(LlavaCError, match=r"choose from \['icon'\]"):
        job_from_dict({"benchmark": {"path": str(bench), "tasks": ["icon", "nope"]}})


def test_config_show_cli(job_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", str(job_file), "training.lr=3e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["training"]["lr"] == 3e-4
    assert main(["config", "show", str(job_file), "consolidation.alpha=1.5"]) == 2
    assert "consolidation.alpha" in capsys.readouterr().err


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.json").write_text("[]")
    job = job_from_dict({"tasks": [{"name": "a", "train": "train.json", "test": "train.json"}]})
    assert job.tasks[0].train == tmp_path / "train.json"


def test_job_name_must_be_a_plain_directory_name() -> None:
    with pytest.raises(LlavaCError, match="name"):
        job_from_dict(
            {"name": "../up", "tasks": [{"name": "a", "train": "x", "test": "y"}]},
            check_files=False,
        )
