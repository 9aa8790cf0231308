"""The continual pipeline: for every stage, train → (search α) → consolidate → evaluate every task.

Each step's outputs are recorded in the run directory's manifest as soon as the step finishes, so
rerunning the same job resumes at the first unfinished step. The pipeline asks the job's `Method`
what to do (stages, UIR weight, consolidation) and never branches on method names.
"""

from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_c_ray.config import JobConfig
from llava_c_ray.errors import LlavaCError
from llava_c_ray.methods import Method, Stage, get_method
from llava_c_ray.ray_session import ensure_ray
from llava_c_ray.rundir import RunDir, open_run_dir, write_json_atomic


@dataclass
class Pipeline:
    """One run: the job, its method, its run directory and the model it starts from."""

    job: JobConfig
    method: Method
    run: RunDir
    initial_model: Path

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.job.tasks]


def local_root(job: JobConfig) -> Path:
    """Where run directories live on this machine: storage.path, or its cache for a URI."""
    from llava_c_ray.storage import is_remote

    path = job.storage.local_cache if is_remote(job.storage.path) else Path(job.storage.path)
    return path.absolute()


def default_run_dir(job: JobConfig) -> Path:
    return local_root(job) / job.name


def mirror_uri(job: JobConfig, run_dir: Path | None) -> str | None:
    """The URI a job's run directory is mirrored to (None for local storage or an explicit dir)."""
    from llava_c_ray.storage import is_remote, join

    if run_dir is not None or not is_remote(job.storage.path):
        return None
    return join(job.storage.path, job.name)


def open_run(job: JobConfig, run_dir: Path | None, force_new: bool) -> RunDir:
    """Open the local run directory, first fetching it from the storage URI to resume elsewhere."""
    from llava_c_ray.storage import sync_down

    mirror = mirror_uri(job, run_dir)
    path = Path(run_dir).absolute() if run_dir else default_run_dir(job)
    if mirror:
        sync_down(mirror, path)
    run = open_run_dir(path, job, force_new=force_new)
    run.mirror = mirror
    run.sync()
    return run


def run_job(
    job: JobConfig, run_dir: Path | None = None, *, force_new: bool = False
) -> dict[str, Any]:
    """Run (or resume) the whole task sequence of `job`; returns the results written to results.json."""
    method = get_method(job.method.name)
    run = open_run(job, run_dir, force_new)
    initial = resolve_initial_model(job)
    ensure_ray()
    pipe = Pipeline(job, method, run, initial)
    model = initial
    evaluate_step(pipe, Stage(0, "initial", ()), model)
    for stage in method.stages(pipe.task_names):
        model = run_stage_steps(pipe, stage, model)
    results = write_results(pipe)
    from llava_c_ray.evaluate.plots import draw_run_plots

    draw_run_plots(pipe.run.path, results)
    pipe.run.sync()
    return results


def resolve_initial_model(job: JobConfig) -> Path:
    """The job's starting checkpoint: a local HF directory, or the built-in tiny base model."""
    if job.model.path == "tiny":
        from llava_c_ray.builtin import ensure_builtin

        return ensure_builtin(local_root(job) / "builtin").base_model
    path = Path(job.model.path).expanduser().absolute()
    if not (path / "config.json").is_file():
        raise LlavaCError(
            "model.path is not a Hugging Face checkpoint directory (no config.json)",
            path=path,
            fix="point model.path at a local LLaVA checkpoint, or use `tiny`",
        )
    return path


def run_stage_steps(pipe: Pipeline, stage: Stage, start_model: Path) -> Path:
    """Train, consolidate and evaluate one stage, skipping the steps the manifest says are done."""
    pipe.run.update_stage(
        stage.index, name=stage.name, tasks=list(stage.tasks), start=str(start_model)
    )
    trained = train_step(pipe, stage, start_model)
    alpha = search_step(pipe, stage, start_model, trained)
    model = consolidate_step(pipe, stage, start_model, trained, alpha)
    evaluate_step(pipe, stage, model)
    return model


def train_step(pipe: Pipeline, stage: Stage, start_model: Path) -> dict[str, Any]:
    done = pipe.run.step(stage.index, "train")
    if done:
        return done
    from llava_c_ray.train.stage import run_stage

    out = pipe.run.stage_dir(stage.dirname) / "train"
    shutil.rmtree(
        out, ignore_errors=True
    )  # a half-finished attempt; the manifest never recorded it
    started = time.time()
    spec = stage_spec(pipe, stage, start_model, out)
    result = run_stage(spec)
    pipe.run.record(
        stage.index,
        "train",
        model=str(result.model_dir),
        adapter=str(result.adapter_dir) if result.adapter_dir else None,
        steps=result.steps,
        seconds=time.time() - started,
    )
    return pipe.run.step(stage.index, "train")


def stage_spec(pipe: Pipeline, stage: Stage, start_model: Path, out: Path):
    from llava_c_ray.train.stage import StageSpec

    return StageSpec.from_job(
        pipe.job,
        tasks=[pipe.job.task(name) for name in stage.tasks],
        init=start_model,
        out=out,
        uir_weight=pipe.method.uir_weight(pipe.job),
    )


def search_step(pipe: Pipeline, stage: Stage, start_model: Path, trained: dict[str, Any]) -> float:
    """α for this stage: the job's fixed α, or the best of a Ray Tune search when enabled."""
    job = pipe.job
    rule = pipe.method.consolidation_for(job)
    if not job.search.enabled or rule == "none":
        return job.consolidation.alpha
    done = pipe.run.step(stage.index, "search")
    if done:
        return done["alpha"]
    from llava_c_ray.search.tune import search_alpha

    stage_dir = pipe.run.stage_dir(stage.dirname)
    out = stage_dir / "search"
    shutil.rmtree(
        out, ignore_errors=True
    )  # a half-finished attempt; the manifest never recorded it
    started = time.time()
    result = search_alpha(
        job,
        new=list(stage.tasks),
        old=earlier_tasks(pipe, stage),
        base=start_model,
        factors=stage_dir / "factors",
        out=out,
        rule=rule,
        **trained_source(trained),
    )
    pipe.run.record(
        stage.index,
        "search",
        alpha=result.best_alpha,
        rule=rule,
        trials=result.trials,
        experiment=str(result.experiment_path),
        seconds=time.time() - started,
    )
    return result.best_alpha


def earlier_tasks(pipe: Pipeline, stage: Stage) -> list[str]:
    """Tasks trained in the stages before `stage` (the α search's "old" group)."""
    earlier = pipe.method.stages(pipe.task_names)[: stage.index - 1]
    return [name for s in earlier for name in s.tasks if name not in stage.tasks]


def trained_source(trained: dict[str, Any]) -> dict[str, Path]:
    """The LoRA adapter when there is one (exact low-rank SVD, cheap), else the merged model."""
    adapter = trained.get("adapter")
    return {"adapter": Path(adapter)} if adapter else {"tuned": Path(trained["model"])}


def consolidate_step(
    pipe: Pipeline, stage: Stage, start_model: Path, trained: dict[str, Any], alpha: float
) -> Path:
    kind = pipe.method.consolidation_for(pipe.job)
    if kind == "none":
        return Path(trained["model"])
    done = pipe.run.step(stage.index, "consolidate")
    if done:
        return Path(done["model"])
    from llava_c_ray.consolidate.engine import consolidate_checkpoint

    stage_dir = pipe.run.stage_dir(stage.dirname)
    out = stage_dir / "model"
    started = time.time()
    consolidate_checkpoint(
        start_model,
        out,
        **trained_source(trained),
        method=kind,
        alpha=alpha,
        boundary=pipe.job.consolidation.boundary,
        overwrite=True,
        factors_cache=stage_dir / "factors",
        progress=False,
    )
    (out / "sac_stats.json").replace(stage_dir / "sac_stats.json")
    pipe.run.record(
        stage.index,
        "consolidate",
        model=str(out),
        method=kind,
        alpha=alpha,
        seconds=time.time() - started,
    )
    pipe.run.update_stage(stage.index, alpha=alpha, checkpoint=str(out))
    return out


def evaluate_step(pipe: Pipeline, stage: Stage, model: Path) -> None:
    if pipe.run.step(stage.index, "evaluate"):
        return
    from llava_c_ray.evaluate.evaluator import evaluate_checkpoint

    started = time.time()
    tasks = eval_tasks(pipe, stage)
    out = pipe.run.stage_dir(stage.dirname) / "eval.json"
    result = evaluate_checkpoint(
        model,
        tasks,
        num_actors=pipe.job.eval.num_actors,
        batch_size=pipe.job.eval.batch_size,
        max_new_tokens=pipe.job.eval.max_new_tokens,
        max_samples=pipe.job.eval.max_samples,
        template=pipe.job.model.template,
        out=out,
        use_gpu=pipe.job.cluster.use_gpu,
    )
    scores = dict(result.scores)
    general = scores.pop(GENERAL, None)
    pipe.run.record(
        stage.index,
        "evaluate",
        scores=scores,
        general=general,
        eval=str(out),
        seconds=time.time() - started,
    )
    write_results(pipe)


GENERAL = "general_probe"


def eval_tasks(pipe: Pipeline, stage: Stage) -> list:
    """Every task (or only those trained so far, without `evaluate_unseen`) plus the general probe."""
    from llava_c_ray.evaluate.evaluator import EvalTask

    job = pipe.job
    seen = {name for s in pipe.method.stages(pipe.task_names)[: stage.index] for name in s.tasks}
    tasks = [
        EvalTask(t.name, t.test, t.image_folder, t.scoring, t.instruction)
        for t in job.tasks
        if job.eval.evaluate_unseen or t.name in seen
    ]
    probe = job.general_probe
    if probe is not None:
        tasks.append(EvalTask(GENERAL, probe.path, probe.image_folder, probe.scoring, ""))
    return tasks


def accuracy_matrix(pipe: Pipeline) -> tuple[list[list[float | None]], list[float | None]]:
    """Rows = stages 0..T recorded so far, columns = tasks; plus the general score per stage."""
    rows, general = [], []
    for stage in pipe.run.manifest["stages"]:
        record = stage["steps"].get("evaluate")
        if not record:
            break
        rows.append([record["scores"].get(name) for name in pipe.task_names])
        general.append(record.get("general"))
    return rows, general


def write_results(pipe: Pipeline) -> dict[str, Any]:
    """results.json and accuracy_matrix.csv from what the manifest holds now."""
    from llava_c_ray.evaluate.metrics import continual_metrics

    matrix, general = accuracy_matrix(pipe)
    finished = len(matrix) == len(pipe.method.stages(pipe.task_names)) + 1
    results = {
        "job": pipe.job.name,
        "method": pipe.method.name,
        "tasks": pipe.task_names,
        "stages": [s.get("name", "initial") for s in pipe.run.manifest["stages"]][: len(matrix)],
        "accuracy_matrix": matrix,
        "general": general,
        "finished": finished,
        "metrics": continual_metrics(matrix, general) if finished else {},
    }
    write_json_atomic(pipe.run.path / "results.json", results)
    with open(pipe.run.path / "accuracy_matrix.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stage", *pipe.task_names, GENERAL])
        for name, row, gen in zip(results["stages"], matrix, general, strict=True):
            writer.writerow([name, *row, gen])
    return results
