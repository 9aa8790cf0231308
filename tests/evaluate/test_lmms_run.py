"""`eval.lmms_tasks`: lmms-eval tasks per stage in Ray actors, their scores in results.json.

The pure parts (headline scores, merging, failure messages, the report's table, config) run
everywhere; the runs need lmms-eval and are marked `lmms` (`make test` runs them in .venv-eval)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from llava_c_ray.cli import main
from llava_c_ray.config import job_from_dict, load_job
from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate import lmms_run
from llava_c_ray.evaluate.lmms_run import (
    LmmsTasks,
    check_lmms_tasks,
    headline_scores,
    lmms_failure,
    merge_results,
)
from llava_c_ray.evaluate.lmms_tasks import lmms_task_name, write_lmms_tasks
from llava_c_ray.evaluate.report import lmms_table, run_report
from llava_c_ray.run_records import Results


def harness_results(**tasks: dict[str, float]) -> dict:
    """lmms-eval's results shape: per task, metric values keyed `metric,filter`, and its config."""
    return {
        "results": {name: {"alias": name, **values} for name, values in tasks.items()},
        "configs": {
            name: {"metric_list": [{"metric": next(iter(values)).split(",")[0]}]}
            for name, values in tasks.items()
        },
        "samples": {name: [] for name in tasks},
    }


def test_headline_score_is_the_first_metric_unfiltered():
    results = harness_results(
        mme={"mme_percetion_score,none": 1210.5, "mme_cognition_score,none": 300.0},
        ours={"score,none": 61.25, "score_stderr,none": 4.0},
    )
    assert headline_scores(results) == {"mme": 1210.5, "ours": 61.25}


@pytest.mark.parametrize("value", [None, "N/A", math.nan])
def test_a_task_without_a_number_is_an_error_not_a_zero(value):
    results = harness_results(ours={"score,none": value})
    with pytest.raises(LlavaCError, match="no number for its metric 'score'"):
        headline_scores(results)


def test_no_results_at_all_is_an_error():
    with pytest.raises(LlavaCError, match="no task results"):
        headline_scores({"results": {}, "configs": {}})


def test_actors_results_merge_per_task():
    a = harness_results(one={"score,none": 1.0})
    b = harness_results(two={"score,none": 2.0})
    merged = merge_results([a, b])
    assert headline_scores(merged) == {"one": 1.0, "two": 2.0}
    assert set(merged["samples"]) == {"one", "two"}


def test_a_dataset_the_hub_must_supply_offline_gets_the_offline_fix():
    class OfflineModeIsEnabled(ConnectionError):
        pass

    try:
        try:
            raise OfflineModeIsEnabled("Couldn't reach 'lmms-lab/MME' on the Hub")
        except ConnectionError as exc:
            raise RuntimeError("Error during evaluation") from exc
    except RuntimeError as exc:
        error = lmms_failure(Path("/ckpt"), LmmsTasks(["mme"]), exc)
    assert "lmms-eval failed on mme: RuntimeError: Error during evaluation ← " in str(error)
    assert "OfflineModeIsEnabled: Couldn't reach" in str(error)
    assert "HF_DATASETS_OFFLINE=1" in str(error) and "/ckpt" in str(error)
    other = lmms_failure(Path("/ckpt"), LmmsTasks(["mme"]), ValueError("bad doc"))
    assert "bad doc" in str(other) and "HF_DATASETS_OFFLINE" not in str(other)


def test_without_lmms_eval_a_job_asking_for_it_fails_before_any_work(monkeypatch):
    monkeypatch.setattr(lmms_run, "lmms_eval_installed", lambda: False)
    with pytest.raises(LlavaCError, match="needs lmms-eval.*\n.*llava-c-ray\\[eval\\]"):
        check_lmms_tasks(LmmsTasks(["mme"]))
    check_lmms_tasks(LmmsTasks([]))  # nothing asked: nothing needed


def test_config_takes_lmms_keys_absolute_and_checks_the_include_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "t.json").write_text("[]")
    task = {"name": "t", "train": "t.json", "test": "t.json"}

    def job(**lmms):
        return job_from_dict({"tasks": [task], "eval": {"lmms_tasks": ["mme"], **lmms}})

    assert job(lmms_include_path=["tasks"]).eval.lmms_include_path == [tmp_path / "tasks"]
    with pytest.raises(LlavaCError, match="eval.lmms_include_path.0"):
        job(lmms_include_path=["missing"])
    with pytest.raises(LlavaCError, match="lmms_limit"):
        job(lmms_limit=0)


def test_report_shows_each_lmms_task_per_stage_and_its_retention():
    results = Results(
        job="j",
        method="m",
        tasks=["a"],
        stages=["initial", "a"],
        accuracy_matrix=[[0.0], [50.0]],
        general=[80.0, 60.0],
        finished=True,
        lmms={"mme": [1200.0, 900.0]},
    )
    table = lmms_table(results)
    assert table.splitlines()[2].split() == ["initial", "1200.0"]
    assert table.splitlines()[3].split() == ["a", "900.0"]
    assert table.splitlines()[4].split() == ["(retention)", "0.750"]
    assert table in run_report(results)
    assert "lmms-eval" not in run_report(results.model_copy(update={"lmms": {}}))


# --- runs (lmms-eval installed) -----------------------------------------------------------------

TASKS = ["icon_count"]


def write_job(tmp: Path, benchmark: Path, model: Path, lmms_tasks: list[str], **extra) -> Path:
    job = {
        "name": "lmms-run",
        "model": {"path": str(model)},
        "benchmark": {"path": str(benchmark), "tasks": TASKS},
        "method": {"name": "finetune"},
        "training": {
            "lora_r": 4,
            "lora_alpha": 8,
            "per_device_batch": 4,
            "global_batch": 4,
            "max_steps": 2,
            "checkpoint_every": 2,
        },
        "eval": {
            "batch_size": 4,
            "max_new_tokens": 6,
            "max_samples": 4,
            "lmms_tasks": lmms_tasks,
            "lmms_include_path": [str(tmp / "lmms")],
        },
        "cluster": {"num_workers": 1},
        "storage": {"path": str(tmp / "runs")},
        **extra,
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def lmms_dir(tiny_benchmark, tiny_checkpoint, tmp_path_factory) -> Path:
    """The job's tasks written as lmms-eval tasks (4 rows each, as the job's eval caps them)."""
    tmp = tmp_path_factory.mktemp("lmms-run")
    (tmp / "lmms").mkdir()
    job_file = write_job(tmp, tiny_benchmark, tiny_checkpoint, [])
    write_lmms_tasks(load_job(job_file), tmp / "lmms", overwrite=True)
    return tmp


@pytest.mark.integration
@pytest.mark.lmms
def test_a_run_scores_two_generated_tasks_per_stage_as_our_evaluator_does(
    ray_cluster, lmms_dir, tiny_benchmark, tiny_checkpoint, capsys
):
    names = [lmms_task_name("icon_count"), lmms_task_name("general_probe")]
    job_file = write_job(lmms_dir, tiny_benchmark, tiny_checkpoint, names)
    run_dir = lmms_dir / "run"
    assert main(["run", str(job_file), "--run-dir", str(run_dir)]) == 0

    results = json.loads((run_dir / "results.json").read_text())
    stages = len(results["stages"])
    assert stages == 2 and results["finished"]
    icon = [row[0] for row in results["accuracy_matrix"]]
    # The same rows, prompts and decoding: lmms-eval's number is our evaluator's, stage by stage.
    assert results["lmms"] == {names[0]: icon, names[1]: results["general"]}
    for stage in sorted((run_dir / "stages").iterdir()):
        harness = json.loads((stage / "lmms_eval.json").read_text())
        assert set(harness["results"]) == set(names)
        assert all(len(harness["samples"][n]) == 4 for n in names)
    assert (run_dir / "plots" / "lmms_tasks.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "lmms-eval tasks:" in out and f"{names[0]} " in out


@pytest.mark.integration
@pytest.mark.lmms
def test_a_failing_lmms_task_fails_the_run_before_training_with_the_harness_message(
    ray_cluster, lmms_dir, tiny_benchmark, tiny_checkpoint, tmp_path
):
    broken = tmp_path / "lmms"
    write_lmms_tasks(load_job(write_job(lmms_dir, tiny_benchmark, tiny_checkpoint, [])), broken)
    (broken / "icon_count.jsonl").unlink()  # the task's data is gone after the task was written
    name = lmms_task_name("icon_count")
    job_file = write_job(lmms_dir, tiny_benchmark, tiny_checkpoint, [name])
    job = load_job(job_file, [f"eval.lmms_include_path=[{broken}]"])
    from llava_c_ray.pipeline import run_job

    with pytest.raises(LlavaCError) as failed:
        run_job(job, tmp_path / "run")
    assert f"lmms-eval failed on {name}: " in str(failed.value)
    assert f"FileNotFoundError: Unable to find '{broken / 'icon_count.jsonl'}'" in str(failed.value)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert all(not stage["steps"] for stage in manifest["stages"])  # nothing recorded, no zero


@pytest.mark.lmms
def test_an_unknown_task_name_is_refused_with_the_close_names(lmms_dir):
    with pytest.raises(LlavaCError, match="knows no task 'llava_c_icon_cont'.*llava_c_icon_count"):
        check_lmms_tasks(LmmsTasks(["llava_c_icon_cont"], [lmms_dir / "lmms"]))


@pytest.mark.integration
@pytest.mark.lmms
def test_eval_lmms_command_scores_one_checkpoint(ray_cluster, lmms_dir, tiny_checkpoint, capsys):
    out = lmms_dir / "one.json"
    argv = ["eval", "lmms", str(tiny_checkpoint), "--tasks", lmms_task_name("icon_count")]
    argv += ["--include-path", str(lmms_dir / "lmms"), "--out", str(out), "--batch-size", "4"]
    assert main([*argv, "--limit", "2"]) == 0
    harness = json.loads(out.read_text())
    assert len(harness["samples"][lmms_task_name("icon_count")]) == 2
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(argv) == 2  # the results are not overwritten without --overwrite
    assert len(json.loads(out.read_text())["samples"][lmms_task_name("icon_count")]) == 2
