"""lmms-eval tasks on a checkpoint, in Ray actors (`eval.lmms_tasks`, `llava-c eval lmms`).

Each `LmmsActor` loads the checkpoint once (as our `llava_c` lmms-eval model, through the method's
loader) and runs its share of the tasks with lmms-eval's Python API (`simple_evaluate`): the CLI
exits 0 when a task fails, the API raises, and a failure here fails the caller with the harness's
message — never a silent zero. The harness's results (merged over actors, samples included) go to
one JSON file; each task's score is its headline metric, the first of its `metric_list`:

    lmms_eval.json  {"results": {task: {"score,none": 61.2, ...}}, "configs": ..., "samples": ...}

`check_lmms_tasks` runs before any long work: lmms-eval installed, include paths present, every
task name known to the harness. A dataset that must come from the Hugging Face hub and is not in
the local cache fails with a named error (docs/lmms-eval.md, "offline") instead of a retry loop's
message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate.evaluator import ModelLoader, load_hf_model
from llava_c_ray.files import write_json_atomic

INSTALL = "pip install 'llava-c-ray[eval]' (docs/lmms-eval.md says how beside a CPU torch)"
OFFLINE_HINT = (
    "fill a Hugging Face cache with the task's dataset on a machine with network and point HF_HOME "
    "at it, with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 (docs/lmms-eval.md, 'offline'), or run "
    "the job's own tasks from `llava-c eval tasks`, which read local files"
)
# Per-task sections of lmms-eval's results, merged over actors; the rest is taken from the first.
TASK_SECTIONS = (
    "results",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
    "samples",
)


@dataclass(frozen=True)
class LmmsTasks:
    """What to run: lmms-eval task (or group / tag) names, task directories beside lmms-eval's
    own (`--include_path`), and a cap on documents per task (lmms-eval's `--limit`)."""

    names: list[str]
    include_path: list[Path] = field(default_factory=list)
    limit: int | None = None


@dataclass(frozen=True)
class LmmsSettings:
    """How a checkpoint is asked: our template, batch size and generation cap (the job's eval)."""

    template: str = "vicuna_v1"
    batch_size: int = 16
    max_new_tokens: int = 32
    use_gpu: bool = False
    num_actors: int = 1


def lmms_eval_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("lmms_eval") is not None


def check_lmms_tasks(tasks: LmmsTasks, where: str = "eval.lmms_tasks") -> None:
    """One clear error before any long work: no lmms-eval, a missing include path or a task name
    the harness does not know (with the names it does know that come closest)."""
    if not tasks.names:
        return
    if not lmms_eval_installed():
        raise LlavaCError(f"{where} needs lmms-eval, which is not installed", fix=INSTALL)
    for path in tasks.include_path:
        if not Path(path).is_dir():
            raise LlavaCError(
                "lmms-eval include path is not a directory",
                path=path,
                fix="write a job's tasks there with `llava-c eval tasks JOB --out DIR`",
            )
    known = set(task_manager(tasks.include_path, tasks.names).all_tasks)
    unknown = [name for name in tasks.names if name not in known]
    if unknown:
        raise LlavaCError(
            f"{where}: lmms-eval knows no task {', '.join(map(repr, unknown))}"
            + near_names(unknown, known),
            fix="name tasks as `lmms-eval --tasks list` shows them; for a job's own tasks add the "
            "directory of `llava-c eval tasks` to the include path (names llava_c_<task>)",
        )


def near_names(unknown: list[str], known: set[str]) -> str:
    import difflib

    near = sorted({m for name in unknown for m in difflib.get_close_matches(name, known, n=3)})
    return f" (close: {', '.join(near)})" if near else ""


def task_manager(include_path: Sequence[Path], names: Sequence[str]) -> Any:
    """lmms-eval's task index of the include paths, with its own ~2,000 tasks only when a name
    is not found in them (indexing those takes seconds, in every actor)."""
    from lmms_eval.tasks import TaskManager

    paths = [str(Path(p).absolute()) for p in include_path]
    if paths:
        local = TaskManager(verbosity="WARNING", include_path=paths, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    return TaskManager(verbosity="WARNING", include_path=paths or None)


class LmmsActor:
    """Holds one `llava_c` lmms-eval model (one checkpoint load) and runs tasks on it."""

    def __init__(self, model_dir: str, settings: LmmsSettings, loader: ModelLoader = load_hf_model):
        from llava_c_ray.evaluate.lmms_model import LlavaC

        self.model = LlavaC(
            pretrained=model_dir,
            template=settings.template,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            loader=loader,
        )
        self.batch_size = settings.batch_size
        self.model_dir = Path(model_dir)

    def evaluate(self, tasks: LmmsTasks) -> dict[str, Any]:
        """lmms-eval's results for `tasks`, made JSON-safe (images and arrays as their repr).
        A failure is raised as a `LlavaCError` made here: the harness's own exceptions (a
        tenacity RetryError, say) do not always survive Ray's pickling."""
        from lmms_eval.evaluator import simple_evaluate

        try:
            results = simple_evaluate(
                model=self.model,
                tasks=list(tasks.names),
                batch_size=self.batch_size,
                limit=tasks.limit,
                task_manager=task_manager(tasks.include_path, tasks.names),
                log_samples=True,
                verbosity="WARNING",
            )
        except Exception as exc:
            raise lmms_failure(self.model_dir, tasks, exc) from None
        return json.loads(json.dumps(results, default=repr))


def run_lmms_eval(
    model_dir: Path,
    tasks: LmmsTasks,
    settings: LmmsSettings,
    out: Path,
    loader: ModelLoader = load_hf_model,
) -> dict[str, float]:
    """Run `tasks` on `model_dir` in Ray actors, write lmms-eval's results to `out` and return
    each task's headline score. An lmms-eval failure raises `LlavaCError` with its message."""
    import ray

    from llava_c_ray.ray_session import ensure_ray

    ensure_ray()
    shares = [s for s in split(tasks, settings.num_actors) if s.names]
    resources = {"num_gpus": 1} if settings.use_gpu else {"num_cpus": 1}
    actor_class = ray.remote(**resources)(LmmsActor)
    actors = [actor_class.remote(str(model_dir), settings, loader) for _ in shares]
    try:
        parts = ray.get([a.evaluate.remote(share) for a, share in zip(actors, shares, strict=True)])
    except ray.exceptions.RayError as exc:
        raise lmms_failure(model_dir, tasks, exc) from None
    finally:
        for actor in actors:
            ray.kill(actor)
    results = merge_results(parts)
    scores = headline_scores(results)
    write_json_atomic(out, results)
    return scores


def split(tasks: LmmsTasks, count: int) -> list[LmmsTasks]:
    """The task names dealt round-robin into `count` shares (one per actor)."""
    return [LmmsTasks(tasks.names[i::count], tasks.include_path, tasks.limit) for i in range(count)]


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One lmms-eval results dict from several actors' (disjoint tasks)."""
    merged = dict(parts[0])
    for section in TASK_SECTIONS:
        merged[section] = {k: v for part in parts for k, v in (part.get(section) or {}).items()}
    return merged


def headline_scores(results: dict[str, Any]) -> dict[str, float]:
    """Each evaluated task's first metric (of its `metric_list`), unfiltered: `{task: value}`.
    Groups are left out (their subtasks are listed). A task without that metric, or with a
    value that is not a finite number, is an error: a failed task never reads as a zero."""
    scores = {}
    for task, config in sorted((results.get("configs") or {}).items()):
        metric = config["metric_list"][0]["metric"]
        values = results.get("results", {}).get(task, {})
        key = next(
            (k for k in values if k.split(",")[0] == metric and "_stderr" not in k), f"{metric},"
        )
        value = values.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise LlavaCError(
                f"lmms-eval gave task {task!r} no number for its metric {metric!r} "
                f"(got {value!r}; metrics: {', '.join(values) or 'none'})",
                fix="run the task alone with `llava-c eval lmms CHECKPOINT --tasks "
                f"{task} --out DIR` and read lmms-eval's log",
            )
        scores[task] = float(value)
    if not scores:
        raise LlavaCError(
            "lmms-eval returned no task results", fix="check the task names and their data"
        )
    return scores


def lmms_failure(model_dir: Path, tasks: LmmsTasks, exc: BaseException) -> LlavaCError:
    """The harness's own error, named, with the offline fix when a dataset load hit the network."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, LlavaCError):
        return cause
    causes = chain(cause)
    message = f"lmms-eval failed on {', '.join(tasks.names)}: " + " ← ".join(map(describe, causes))
    offline = any(network_error(e) for e in causes)
    fix = OFFLINE_HINT if offline else "read the message above; run one task with `--limit 2`"
    return LlavaCError(message, path=model_dir, fix=fix)


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:400]}{' …' if len(text) > 400 else ''}"


def chain(exc: BaseException) -> list[BaseException]:
    """An exception, then what caused it (its cause or context, or a retry loop's last error),
    outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and not any(current is s for s in seen):
        seen.append(current)
        last = getattr(current, "last_attempt", None)  # tenacity's RetryError
        retried = last.exception() if last is not None and hasattr(last, "exception") else None
        current = current.__cause__ or retried or current.__context__
    return seen


def network_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError"})
