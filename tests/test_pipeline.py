"""`llava-c run` end to end on the tiny model: run directory, resume, refusal, driver killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llava_c_ray.cli import main
from llava_c_ray.config import load_job
from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods import bind
from llava_c_ray.pipeline import run_job

pytestmark = pytest.mark.integration


def write_job(tmp_path: Path, benchmark: Path, model: Path, tasks: int = 2, **extra) -> Path:
    job = {
        "name": "t",
        "model": {"path": str(model)},
        "benchmark": {"path": str(benchmark)},
        "method": {"name": "llava_c"},
        "training": {
            "lora_r": 4,
            "lora_alpha": 8,
            "lr": 5e-3,
            "per_device_batch": 4,
            "global_batch": 8,
            "max_steps": 2,
            "checkpoint_every": 2,
            "warmup_ratio": 0.0,
        },
        "eval": {"batch_size": 8, "max_new_tokens": 6, "max_samples": 4},
        "cluster": {"num_workers": 2},
        "storage": {"path": str(tmp_path / "runs")},
        **extra,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    names = [t.name for t in load_job(path).tasks][:tasks]
    job["tasks"] = [t.model_dump(mode="json") for t in load_job(path).tasks if t.name in names]
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def finished(ray_cluster, tiny_benchmark, tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    job_file = write_job(tmp, tiny_benchmark, tiny_checkpoint, tasks=3)
    started = time.perf_counter()
    results = run_job(load_job(job_file), tmp / "run")
    return tmp, job_file, results, time.perf_counter() - started


def test_run_directory_layout(finished) -> None:
    tmp, _, results, _ = finished
    run = tmp / "run"
    assert len(results.accuracy_matrix) == 4 and len(results.accuracy_matrix[0]) == 3
    assert results.finished and set(results.metrics) >= {
        "avg",
        "bwt",
        "forgetting",
        "general_retention",
    }
    manifest = json.loads((run / "manifest.json").read_text())
    assert [sorted(s["steps"]) for s in manifest["stages"]] == [["evaluate"]] + 3 * [
        ["consolidate", "evaluate", "train"]
    ]
    stage = run / "stages" / "01-icon_count"
    for name in (
        "model/config.json",
        "train/adapter/adapter_config.json",
        "sac_stats.json",
        "eval.json",
    ):
        assert (stage / name).exists(), name
    assert (
        (run / "accuracy_matrix.csv")
        .read_text()
        .startswith("stage,icon_count,attributes,count_math,general_probe")
    )
    assert {p.name for p in (run / "plots").glob("*.png")} >= {
        "accuracy_heatmap.png",
        "task_curves.png",
        "general_curve.png",
    }
    samples = json.loads((stage / "eval.json").read_text())["samples"]["icon_count"]
    assert {"prediction", "reference", "score", "question"} <= set(samples[0])


def test_sac_of_a_trained_adapter_equals_the_dense_path(
    finished, tiny_checkpoint, tmp_path
) -> None:
    """The low-rank SAC of an adapter trained by the stage runner equals SAC of the merged model."""
    import torch

    from llava_c_ray.consolidate.engine import consolidate_checkpoint
    from llava_c_ray.model.safetensors_io import LazyCheckpoint

    stage = finished[0] / "run" / "stages" / "01-icon_count"
    dense = consolidate_checkpoint(
        tiny_checkpoint, tmp_path / "dense", tuned=stage / "train" / "model", progress=False
    )
    via_adapter, via_dense = LazyCheckpoint(stage / "model"), LazyCheckpoint(dense.out)
    for name in via_dense.keys():
        assert torch.allclose(via_adapter.get(name), via_dense.get(name), atol=1e-5), name


def test_rerun_resumes_without_recomputing(finished) -> None:
    tmp, job_file, results, seconds = finished
    before = (tmp / "run" / "manifest.json").read_text()
    started = time.perf_counter()
    again = run_job(load_job(job_file), tmp / "run")
    elapsed = time.perf_counter() - started
    print(f"first run {seconds:.1f}s, rerun {elapsed:.1f}s ({100 * elapsed / seconds:.1f}%)")
    assert again.accuracy_matrix == results.accuracy_matrix
    steps = lambda text: [s["steps"] for s in json.loads(text)["stages"]]  # noqa: E731
    assert steps((tmp / "run" / "manifest.json").read_text()) == steps(before)
    assert elapsed < 0.05 * seconds


def test_different_job_refused_nothing_lost(finished, capsys) -> None:
    tmp, job_file, _, _ = finished
    before = sorted(p.relative_to(tmp) for p in (tmp / "run").rglob("*"))
    assert main(["run", str(job_file), "training.lr=0.1", "--run-dir", str(tmp / "run")]) == 2
    assert "training.lr" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp) for p in (tmp / "run").rglob("*")) == before


def test_report_command(finished, capsys) -> None:
    tmp, *_ = finished
    assert main(["report", str(tmp / "run"), str(tmp / "run")]) == 0
    out = capsys.readouterr().out
    assert "icon_count" in out and "general_retention" in out


def test_bad_jobs_fail_fast(tmp_path, tiny_benchmark, tiny_checkpoint) -> None:
    job_file = write_job(tmp_path, tiny_benchmark, tiny_checkpoint)
    with pytest.raises(LlavaCError, match="unknown method"):
        bind(load_job(job_file, ["method.name=nope"]))
    data = yaml.safe_load(job_file.read_text())
    data["tasks"][0]["train"] = str(tmp_path / "missing.json")
    job_file.write_text(yaml.safe_dump(data))
    with pytest.raises(LlavaCError, match="missing.json"):
        load_job(job_file)


def test_driver_killed_mid_run_resumes(
    ray_cluster, finished, tiny_benchmark, tiny_checkpoint, tmp_path
) -> None:
    """Kill the driver during stage 2 of 3; the rerun keeps stages 0–1 as they were, finishes
    stages 2–3, and ends with the uninterrupted run's numbers (same seeds, deterministic CPU)."""
    job_file = write_job(tmp_path, tiny_benchmark, tiny_checkpoint, tasks=3)
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "llava_c_ray.cli",
        "run",
        str(job_file),
        "--run-dir",
        str(run_dir),
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    manifest = run_dir / "manifest.json"
    deadline = time.time() + 400
    while time.time() < deadline and driver.poll() is None:
        stages = json.loads(manifest.read_text())["stages"] if manifest.exists() else []
        if len(stages) > 2 and "train" in stages[2]["steps"]:
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the driver finished before it could be killed"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    finished_before = json.loads(manifest.read_text())["stages"][:2]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads(manifest.read_text())
    assert final["stages"][:2] == finished_before
    matrix = json.loads((run_dir / "results.json").read_text())["accuracy_matrix"]
    assert matrix == finished[2].accuracy_matrix
    # The console carries the run's own lines; Ray's worker output went to the run's logs.
    console = (done.stdout + done.stderr).splitlines()
    assert [line for line in console if line.startswith("[3/3 ")][-1].startswith(
        "[3/3 count_math] scores"
    )
    assert len(console) <= 40, "\n".join(console)
    assert "RayTrainWorker" in (run_dir / "logs" / "workers.log").read_text()
