"""`llava-c run` end to end on the tiny model: run directory, resume, refusal, driver killed mid-run.

One run serves the module: its driver is killed mid-run and the rerun finishes it (`finished`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from llava_c_ray.cli import main
from llava_c_ray.config import load_job
from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods import bind
from llava_c_ray.pipeline import run_job
from llava_c_ray.run_records import Results

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


KILL_BUDGET_S = 900
"""How long a driver may take to reach stage 2's recorded training, and the rerun to finish:
~45 s and ~50 s on 2 idle cores; both waits end as soon as the driver does."""


@dataclass
class KilledRun:
    """The module's one run: `llava-c run` of a 2-task job, its driver killed during stage 2 once
    that stage's training was recorded, then rerun to completion."""

    tmp: Path
    job_file: Path
    results: Results
    seconds: float
    """Both drivers' wall time: what the run cost."""
    at_kill: list[dict]
    """The manifest's stages when the driver was killed."""
    resumed: list[dict]
    """The manifest's stages when the rerun finished."""
    console: list[str]
    """The rerun's console."""

    @property
    def run(self) -> Path:
        return self.tmp / "run"


@pytest.fixture(scope="module")
def finished(ray_cluster, tiny_benchmark, tiny_checkpoint, tmp_path_factory) -> KilledRun:
    """Shared by every test of a finished run directory: a resumed run must leave the same
    complete layout as an uninterrupted one."""
    tmp = tmp_path_factory.mktemp("pipeline")
    job_file = write_job(tmp, tiny_benchmark, tiny_checkpoint, tasks=2)
    command = [sys.executable, "-m", "llava_c_ray.cli", "run", str(job_file)]
    command += ["--run-dir", str(tmp / "run")]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    started = time.perf_counter()
    driver = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    manifest = tmp / "run" / "manifest.json"
    deadline, stages = time.time() + KILL_BUDGET_S, []
    while time.time() < deadline and driver.poll() is None:
        stages = json.loads(manifest.read_text())["stages"] if manifest.exists() else []
        if len(stages) > 2 and "train" in stages[2]["steps"]:
            break
        time.sleep(0.5)
    if driver.poll() is not None or not (len(stages) > 2 and "train" in stages[2]["steps"]):
        driver.kill()
        pytest.fail(f"the driver did not reach stage 2's training alive ({driver.wait()})")
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    at_kill = json.loads(manifest.read_text())["stages"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=KILL_BUDGET_S)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    return KilledRun(
        tmp,
        job_file,
        Results.model_validate_json((tmp / "run" / "results.json").read_text()),
        seconds,
        at_kill,
        json.loads(manifest.read_text())["stages"],
        (done.stdout + done.stderr).splitlines(),
    )


def test_run_directory_layout(finished) -> None:
    results, run = finished.results, finished.run
    assert len(results.accuracy_matrix) == 3 and len(results.accuracy_matrix[0]) == 2
    assert results.finished and set(results.metrics) >= {
        "avg",
        "bwt",
        "forgetting",
        "general_retention",
    }
    manifest = json.loads((run / "manifest.json").read_text())
    assert [sorted(s["steps"]) for s in manifest["stages"]] == [["evaluate"]] + 2 * [
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
        .startswith("stage,icon_count,attributes,general_probe")
    )
    assert {p.name for p in (run / "plots").glob("*.png")} >= {
        "accuracy_heatmap.png",
        "task_curves.png",
        "general_curve.png",
    }
    samples = json.loads((stage / "eval.json").read_text())["samples"]["icon_count"]
    assert {"prediction", "reference", "score", "question"} <= set(samples[0])


@pytest.mark.parametrize("stage", [1, 2])
def test_sac_of_a_trained_adapter_equals_the_dense_path(finished, stage, tmp_path) -> None:
    """The low-rank SAC of an adapter trained by the stage runner equals SAC of the merged model,
    from the stage's start model: stage 1 consolidated by the killed driver, stage 2 finished by
    the rerun from the training the killed driver recorded."""
    import torch

    from llava_c_ray.consolidate.engine import consolidate_checkpoint
    from llava_c_ray.model.safetensors_io import LazyCheckpoint

    record = finished.resumed[stage]
    stage_dir = finished.run / "stages" / f"{stage:02d}-{record['name']}"
    assert Path(record["steps"]["train"]["model"]) == stage_dir / "train" / "model"
    tuned = stage_dir / "train" / "model"
    assert not list(tuned.glob("*.index.json"))  # the start model's shard index is not copied
    dense = consolidate_checkpoint(
        Path(record["start"]),
        tmp_path / "dense",
        tuned=tuned,
        alpha=record["alpha"],
        progress=False,
    )
    via_adapter, via_dense = LazyCheckpoint(stage_dir / "model"), LazyCheckpoint(dense.out)
    for name in via_dense.keys():
        assert torch.allclose(via_adapter.get(name), via_dense.get(name), atol=1e-5), name


def test_rerun_resumes_without_recomputing(finished) -> None:
    before = (finished.run / "manifest.json").read_text()
    started = time.perf_counter()
    again = run_job(load_job(finished.job_file), finished.run)
    elapsed = time.perf_counter() - started
    seconds = finished.seconds
    print(f"first run {seconds:.1f}s, rerun {elapsed:.1f}s ({100 * elapsed / seconds:.1f}%)")
    assert again.accuracy_matrix == finished.results.accuracy_matrix
    steps = lambda text: [s["steps"] for s in json.loads(text)["stages"]]  # noqa: E731
    assert steps((finished.run / "manifest.json").read_text()) == steps(before)
    assert elapsed < 0.05 * seconds


def test_different_job_refused_nothing_lost(finished, capsys) -> None:
    tmp, job_file = finished.tmp, finished.job_file
    before = sorted(p.relative_to(tmp) for p in (tmp / "run").rglob("*"))
    assert main(["run", str(job_file), "training.lr=0.1", "--run-dir", str(tmp / "run")]) == 2
    assert "training.lr" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp) for p in (tmp / "run").rglob("*")) == before


def test_report_command(finished, capsys) -> None:
    tmp = finished.tmp
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


def test_driver_killed_mid_run_resumes(finished, tiny_checkpoint) -> None:
    """The driver was killed during stage 2 of 2, after its training was recorded; the rerun kept
    stages 0–1 and stage 2's recorded steps as they were and finished stage 2 from them (that
    the finished stage 2 is SAC of that training from stage 1's model: the dense-path test)."""
    before, after = finished.at_kill, finished.resumed
    assert after[:2] == before[:2]
    assert "train" in before[2]["steps"] and len(after) == 3
    assert {step: after[2]["steps"][step] for step in before[2]["steps"]} == before[2]["steps"]
    starts = [Path(s["start"]) for s in after[1:]]
    assert starts == [tiny_checkpoint] + [Path(s["checkpoint"]) for s in after[1:-1]]
    matrix = json.loads((finished.run / "results.json").read_text())["accuracy_matrix"]
    scores = [[s["steps"]["evaluate"]["scores"][t] for t in finished.results.tasks] for s in after]
    assert matrix == scores and finished.results.finished
    # The console carries the run's own lines; Ray's worker output went to the run's logs.
    console = finished.console
    assert [line for line in console if line.startswith("[2/2 ")][-1].startswith(
        "[2/2 attributes] scores"
    )
    assert len(console) <= 40, "\n".join(console)
    assert "RayTrainWorker" in (finished.run / "logs" / "workers.log").read_text()
