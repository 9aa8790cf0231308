"""The continual pipeline: for every stage, train → (search α) → consolidate → evaluate every task.

Each step's outputs are recorded in the run directory's manifest as soon as the step finishes, so
rerunning the same job resumes at the first unfinished step. The pipeline calls the hooks of the
job's method (llava_c_ray/methods/base.py: stages, training parts, after-training work, consolidation
rule, model loader) and never branches on method or rule names.
"""

from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llava_c_ray import console
from llava_c_ray.config import JobConfig
from llava_c_ray.data.records import read_records
from llava_c_ray.data.validate import MAX_IMAGE_PIXELS, ValidationReport, validate_records
from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate.evaluator import (
    GENERAL,
    EvalTask,
    ModelLoader,
    evaluate_checkpoint,
    job_eval_tasks,
    load_hf_model,
)
from llava_c_ray.evaluate.lmms_run import LmmsSettings, LmmsTasks, check_lmms_tasks, run_lmms_eval
from llava_c_ray.files import write_json_atomic
from llava_c_ray.methods import BoundMethod, Stage, StageContext, TrainedStage, bind
from llava_c_ray.methods.base import one_stage_per_task
from llava_c_ray.ray_session import ensure_ray
from llava_c_ray.run_records import (
    AfterTrainingRecord,
    ConsolidateRecord,
    EvaluateRecord,
    Results,
    SearchRecord,
    TrainRecord,
)
from llava_c_ray.rundir import RunDir, open_run_dir


@dataclass
class Pipeline:
    """One run: the job, its method, its run directory and the model it starts from."""

    job: JobConfig
    method: BoundMethod
    run: RunDir
    initial_model: Path

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.job.tasks]

    @property
    def stages(self) -> list[Stage]:
        return self.method.stages(self.task_names)

    def context(self, stage: Stage, start_model: Path) -> StageContext:
        """What the method's hooks see of `stage`."""
        return StageContext(
            job=self.job,
            params=self.method.params,
            stage=stage,
            stages=tuple(self.stages),
            start_model=start_model,
            stage_dir=self.run.stage_dir(stage.dirname),
            state_dir=self.run.path / "method",
        )


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


def run_job(job: JobConfig, run_dir: Path | None = None, *, force_new: bool = False) -> Results:
    """Run (or resume) the whole task sequence of `job`; returns the results written to results.json."""
    method = bind(job)
    reports = check_job_data(job)  # every task's data, before anything is written or trained
    check_lmms_tasks(job_lmms_tasks(job))
    run = open_run(job, run_dir, force_new)
    logs = console.LOGS.open_in(run.path)
    console.say(f"{job.name}: method {method.method.name}, run directory {run.path}")
    initial = resolve_initial_model(job)
    ensure_ray()
    pipe = Pipeline(apply_skipped(job, reports, run.path), method, run, initial)
    model = initial
    evaluate_step(pipe, Stage(0, "initial", ()), model)
    for stage in pipe.stages:
        model = run_stage_steps(pipe, stage, model)
    results = write_results(pipe)
    from llava_c_ray.evaluate.plots import draw_run_plots

    draw_run_plots(pipe.run.path, results)
    pipe.run.sync()
    console.say(finished_note(pipe.run.path, logs))
    return results


def finished_note(run_dir: Path, logs: Path) -> str:
    return (
        f"run directory: {run_dir}\n  results: {run_dir / 'results.json'}\n"
        f"  plots: {run_dir / 'plots'}\n"
        f"  logs: {logs}\n  TensorBoard: tensorboard --logdir {run_dir / 'stages'}"
    )


def say(pipe: Pipeline, stage: Stage, text: str) -> None:
    """A line of the run's console view about one stage."""
    console.say(f"[{stage.index}/{len(pipe.stages)} {stage.name}] {text}")


SKIP_HINT = "set data.on_error=skip to train on the rest"


def check_job_data(
    job: JobConfig, tasks: list[str] | None = None, *, evaluation: bool = True
) -> dict[str, ValidationReport]:
    """Validate the training files of `tasks` (default: all), the inquiry set and, with
    `evaluation`, every val / test split and the general probe — records and image headers, as
    `load_records` does — and raise one error listing every invalid record; with
    `data.on_error=skip` invalid training records are not errors. Returns the training files'
    reports by task name (a directory from `llava-c data prepare` was validated when written)."""
    limit = job.data.max_image_pixels or MAX_IMAGE_PIXELS
    chosen = [job.task(name) for name in tasks] if tasks is not None else job.tasks
    train_reports: dict[str, ValidationReport] = {}
    failed: list[tuple[str, ValidationReport]] = []

    def check(key: str, path: Path, image_folder: Path | None, **kw) -> ValidationReport:
        report = validate_records(read_records(path), path, image_folder, max_pixels=limit, **kw)
        if report.problems:
            failed.append((key, report))
        return report

    for task in chosen:
        if not Path(task.train).is_dir():
            train_reports[task.name] = check(f"{task.name} train", task.train, task.image_folder)
    train_keys = {key for key, _ in failed}
    if job.data.on_error == "skip":
        failed.clear()  # only training files so far: their invalid records are skipped
    if job.inquiry is not None:
        check("inquiry", job.inquiry.path, None, require_answers=False)
    if evaluation:
        for task in chosen:
            for split in ("val", "test"):
                path = getattr(task, split)
                if path is not None:
                    check(f"{task.name} {split}", path, task.image_folder)
        probe = job.general_probe
        if probe is not None:
            for key, path in (("general_probe", probe.path), ("general_probe val", probe.val)):
                if path is not None:
                    check(key, path, probe.image_folder)
    if failed:
        raise LlavaCError(
            "invalid records in the job's data (nothing was trained):\n"
            + "\n".join(f"{key}: {report.summary(limit=10)}" for key, report in failed),
            fix=failed[0][1].fix(SKIP_HINT if any(k in train_keys for k, _ in failed) else None),
        )
    for name, report in train_reports.items():
        if not report.records:
            raise LlavaCError(
                f"every training record of task {name!r} is invalid; nothing is left to train on",
                path=report.file,
                fix=f"correct the records (`llava-c data validate {report.file} --image-folder "
                "DIR` lists them)",
            )
    return train_reports


def apply_skipped(job: JobConfig, reports: dict[str, ValidationReport], out: Path) -> JobConfig:
    """With `data.on_error=skip`: the skipped ids of each task go to OUT/skipped/<task>.json and a
    task with skipped records trains on OUT/data/<task>.json, its valid records; the job returned
    points at those files."""
    if job.data.on_error != "skip":
        return job
    job = job.model_copy(deep=True)
    for name, report in reports.items():
        report.write_skipped(Path(out) / "skipped" / f"{name}.json")
        if report.problems:
            valid = Path(out) / "data" / f"{name}.json"
            write_json_atomic(valid, [record.to_raw() for record in report.records])
            job.task(name).train = valid
    return job


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
    after_training_step(pipe, stage, start_model, trained)
    alpha = search_step(pipe, stage, start_model, trained)
    model = consolidate_step(pipe, stage, start_model, trained, alpha)
    evaluate_step(pipe, stage, model)
    return model


def train_step(pipe: Pipeline, stage: Stage, start_model: Path) -> TrainRecord:
    done = pipe.run.stage(stage.index).steps.train
    if done:
        return done
    from llava_c_ray.train.progress import PROGRESS_FILE, summary
    from llava_c_ray.train.stage import run_stage

    out = pipe.run.stage_dir(stage.dirname) / "train"
    shutil.rmtree(
        out, ignore_errors=True
    )  # a half-finished attempt; the manifest never recorded it
    started = time.time()
    spec = stage_spec(pipe, stage, start_model, out)
    result = run_stage(spec)
    record = TrainRecord(
        model=result.model_dir,
        adapter=result.adapter_dir,
        steps=result.steps,
        finished=time.time(),
        seconds=time.time() - started,
    )
    pipe.run.record(stage.index, record)
    say(pipe, stage, f"trained in {record.seconds:.0f} s: {summary(out / PROGRESS_FILE)}")
    return record


def stage_spec(pipe: Pipeline, stage: Stage, start_model: Path, out: Path):
    return spec_for(pipe.job, pipe.method, pipe.context(stage, start_model), out)


def spec_for(job: JobConfig, method: BoundMethod, ctx: StageContext, out: Path):
    """The stage's training spec with what the method adds to it."""
    from llava_c_ray.train.spec import StageSpec

    parts = method.method.training(ctx)
    return StageSpec.from_job(
        job,
        tasks=ctx.tasks(),
        init=parts.init or ctx.start_model,
        out=out,
        losses=parts.losses,
        step_hooks=parts.step_hooks,
        setup=parts.setup,
        extra_files=parts.extra_files,
    )


def standalone_stage_spec(job: JobConfig, task: str, init: Path, out: Path):
    """`llava-c train`: one task of the job as the stage it is in a task-by-task sequence, with
    the method's state (if any) kept under `out/method`."""
    job.task(task)  # an unknown task fails here, listing the job's tasks
    method = bind(job)
    stages = tuple(one_stage_per_task([t.name for t in job.tasks]))
    stage = next(s for s in stages if s.tasks == (task,))
    out = Path(out).absolute()
    ctx = StageContext(
        job, method.params, stage, stages, Path(init).absolute(), out, out / "method"
    )
    return spec_for(job, method, ctx, out)


def after_training_step(
    pipe: Pipeline, stage: Stage, start_model: Path, trained: TrainRecord
) -> None:
    """The method's driver-side work on the trained stage (e.g. a Fisher estimate), once."""
    hook = pipe.method.method.after_training
    if hook is None or pipe.run.stage(stage.index).steps.after_training:
        return
    started = time.time()
    hook(pipe.context(stage, start_model), TrainedStage(trained.model, trained.adapter))
    record = AfterTrainingRecord(finished=time.time(), seconds=time.time() - started)
    pipe.run.record(stage.index, record)
    say(pipe, stage, f"{pipe.method.method.name}'s after-training work in {record.seconds:.0f} s")


def search_step(pipe: Pipeline, stage: Stage, start_model: Path, trained: TrainRecord) -> float:
    """α for this stage: the job's fixed α, or the best of a Ray Tune search when enabled."""
    job = pipe.job
    rule = pipe.method.rule
    if not job.search.enabled or not rule.consolidates:
        return job.consolidation.alpha
    done = pipe.run.stage(stage.index).steps.search
    if done:
        return done.alpha
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
        rule=rule.name,
        loader=pipe.method.method.load_model,
        **trained_source(trained),
    )
    record = SearchRecord(
        alpha=result.best_alpha,
        rule=rule.name,
        trials=result.trials,
        experiment=result.experiment_path,
        finished=time.time(),
        seconds=time.time() - started,
    )
    pipe.run.record(stage.index, record)
    say(pipe, stage, f"α search in {record.seconds:.0f} s chose {result.choice}")
    return result.best_alpha


def earlier_tasks(pipe: Pipeline, stage: Stage) -> list[str]:
    """Tasks trained in the stages before `stage` (the α search's "old" group)."""
    return [t.name for t in pipe.context(stage, Path()).earlier_tasks()]


def trained_source(trained: TrainRecord) -> dict[str, Path]:
    """The LoRA adapter when there is one (exact low-rank SVD, cheap), else the merged model."""
    return {"adapter": trained.adapter} if trained.adapter else {"tuned": trained.model}


def consolidate_step(
    pipe: Pipeline, stage: Stage, start_model: Path, trained: TrainRecord, alpha: float
) -> Path:
    rule = pipe.method.rule
    if not rule.consolidates:
        return trained.model
    done = pipe.run.stage(stage.index).steps.consolidate
    if done:
        return done.model
    from llava_c_ray.consolidate.engine import consolidate_checkpoint

    stage_dir = pipe.run.stage_dir(stage.dirname)
    out = stage_dir / "model"
    shutil.rmtree(
        out, ignore_errors=True
    )  # a half-finished attempt; the manifest never recorded it
    started = time.time()
    consolidate_checkpoint(
        start_model,
        out,
        **trained_source(trained),
        method=rule.name,
        alpha=alpha,
        boundary=pipe.job.consolidation.boundary,
        factors_cache=stage_dir / "factors",
    )
    (out / "sac_stats.json").replace(stage_dir / "sac_stats.json")
    record = ConsolidateRecord(
        model=out,
        method=rule.name,
        alpha=alpha,
        finished=time.time(),
        seconds=time.time() - started,
    )
    pipe.run.record(stage.index, record)
    pipe.run.update_stage(stage.index, alpha=alpha, checkpoint=out)
    say(pipe, stage, f"consolidated ({rule.name}, α = {alpha:g}) in {record.seconds:.0f} s")
    return out


def evaluate_step(pipe: Pipeline, stage: Stage, model: Path) -> None:
    """Score every task and the probe on the stage's model, loaded the method's way (stage 0, the
    job's initial model, is a plain Hugging Face checkpoint whatever the method)."""
    if pipe.run.stage(stage.index).steps.evaluate:
        return
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
        loader=stage_loader(pipe, stage),
    )
    scores = dict(result.scores)
    general = scores.pop(GENERAL, None)
    lmms, lmms_out = lmms_step(pipe, stage, model)
    record = EvaluateRecord(
        scores=scores,
        general=general,
        eval=out,
        lmms=lmms,
        lmms_eval=lmms_out,
        finished=time.time(),
        seconds=time.time() - started,
    )
    pipe.run.record(stage.index, record)
    write_results(pipe)
    shown = {**result.scores, **lmms}
    say(pipe, stage, f"scores in {record.seconds:.0f} s: {score_line(pipe.job, shown)}")


def job_lmms_tasks(job: JobConfig) -> LmmsTasks:
    return LmmsTasks(job.eval.lmms_tasks, job.eval.lmms_include_path, job.eval.lmms_limit)


def lmms_step(pipe: Pipeline, stage: Stage, model: Path) -> tuple[dict[str, float], Path | None]:
    """The job's lmms-eval tasks on the stage's model: scores and lmms-eval's results file."""
    if not pipe.job.eval.lmms_tasks:
        return {}, None
    out = pipe.run.stage_dir(stage.dirname) / "lmms_eval.json"
    tasks, settings = job_lmms_tasks(pipe.job), lmms_settings(pipe.job)
    return run_lmms_eval(model, tasks, settings, out, stage_loader(pipe, stage)), out


def stage_loader(pipe: Pipeline, stage: Stage) -> ModelLoader:
    """How the stage's model is loaded: the method's way (stage 0, the job's initial model, is a
    plain Hugging Face checkpoint whatever the method)."""
    return pipe.method.method.load_model if stage.index else load_hf_model


def lmms_settings(job: JobConfig) -> LmmsSettings:
    return LmmsSettings(
        template=job.model.template,
        batch_size=job.eval.batch_size,
        max_new_tokens=job.eval.max_new_tokens,
        use_gpu=job.cluster.use_gpu,
        num_actors=job.eval.num_actors,
    )


def score_line(job: JobConfig, scores: dict[str, float]) -> str:
    """`task 23.4 (chance 23.4) · … · general_probe 85.0`."""
    chance = {t.name: t.chance for t in job.tasks if t.chance is not None}
    return " · ".join(
        f"{name} {score:.1f}" + (f" (chance {chance[name]:.1f})" if name in chance else "")
        for name, score in scores.items()
    )


def eval_tasks(pipe: Pipeline, stage: Stage) -> list[EvalTask]:
    """Every task (or only those trained so far, without `evaluate_unseen`) plus the general probe."""
    seen = {name for s in pipe.stages[: stage.index] for name in s.tasks}
    return job_eval_tasks(pipe.job, None if pipe.job.eval.evaluate_unseen else seen)


def accuracy_matrix(pipe: Pipeline) -> tuple[list[list[float | None]], list[float | None]]:
    """Rows = stages 0..T recorded so far, columns = tasks; plus the general score per stage."""
    rows, general = [], []
    for stage in pipe.run.manifest.stages:
        record = stage.steps.evaluate
        if not record:
            break
        rows.append([record.scores.get(name) for name in pipe.task_names])
        general.append(record.general)
    return rows, general


def lmms_scores(pipe: Pipeline, stages: int) -> dict[str, list[float | None]]:
    """Each lmms-eval task's score over the first `stages` evaluated stages."""
    records = [s.steps.evaluate for s in pipe.run.manifest.stages[:stages]]
    names = sorted({name for r in records if r for name in r.lmms})
    return {name: [r.lmms.get(name) if r else None for r in records] for name in names}


def write_results(pipe: Pipeline) -> Results:
    """results.json and accuracy_matrix.csv from what the manifest holds now."""
    from llava_c_ray.evaluate.metrics import continual_metrics

    matrix, general = accuracy_matrix(pipe)
    finished = len(matrix) == len(pipe.stages) + 1
    results = Results(
        job=pipe.job.name,
        method=pipe.method.method.name,
        tasks=pipe.task_names,
        stages=[s.name for s in pipe.run.manifest.stages][: len(matrix)],
        accuracy_matrix=matrix,
        general=general,
        finished=finished,
        metrics=continual_metrics(matrix, general) if finished else {},
        chance={t.name: t.chance for t in pipe.job.tasks},
        lmms=lmms_scores(pipe, len(matrix)),
    )
    write_json_atomic(pipe.run.path / "results.json", results.model_dump(mode="json"))
    with open(pipe.run.path / "accuracy_matrix.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stage", *pipe.task_names, GENERAL])
        for name, row, gen in zip(results.stages, matrix, general, strict=True):
            writer.writerow([name, *row, gen])
    return results
