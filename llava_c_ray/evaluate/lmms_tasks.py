"""A job's tasks and general probe as lmms-eval tasks on local files (`llava-c eval tasks`).

`write_lmms_tasks(job, out)` writes, for each task of the job and for its probe, `<task>.jsonl` —
the rows our evaluator asks (`task_queries`: question with the task's instruction, absolute image
path, reference, scoring rule; `eval.max_samples` of them when the job caps them) — and
`<task>.yaml`, an lmms-eval task named `llava_c_<task>` reading it. `utils.py` beside them points
lmms-eval's hooks at the functions below, which score with our rule (`data/scoring.py`), as
100 × the mean, our evaluator's number. All tasks of a job carry the tag `llava_c_job_<job>`:

    lmms-eval --model llava_c --model_args pretrained=CKPT --batch_size 16 \
        --include_path OUT --tasks llava_c_job_<job>

Rows are written as plain strings so Hugging Face `datasets` reads any job's data (LLaVA JSON
with mixed-type ids or nested turns would not load as a table). Nothing here imports lmms-eval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from llava_c_ray.config import JobConfig
from llava_c_ray.data.scoring import score
from llava_c_ray.evaluate.evaluator import EvalTask, job_eval_tasks, task_queries
from llava_c_ray.files import atomic_directory, refuse_replacing, write_json_atomic

PREFIX = "llava_c_"
INDEX = "llava_c_tasks.json"
"""The index of a directory written here: its job, and each lmms-eval task's source and rule."""

UTILS = '''"""lmms-eval hooks of the tasks beside this file, written by `llava-c eval tasks`: the
prompt, the image and the score of a row exactly as llava-c-ray's evaluator makes them."""

from llava_c_ray.evaluate.lmms_tasks import doc_to_text, doc_to_visual, process_results  # noqa: F401
'''


def lmms_task_name(task: str) -> str:
    """The lmms-eval name of a job's task (prefixed: lmms-eval ships `gqa`, `textvqa`, …)."""
    return f"{PREFIX}{task}"


def job_tag(job: JobConfig) -> str:
    """The lmms-eval tag that runs all of a job's tasks at once."""
    return f"{PREFIX}job_{job.name}"


def write_lmms_tasks(job: JobConfig, out: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the job's lmms-eval tasks into `out` (see the module docstring); the YAMLs' paths.

    `out` must be new or empty; with `overwrite`, a directory this function wrote is replaced."""
    out = Path(out).absolute()
    refuse_replacing(out, overwrite, is_task_directory, f"`llava-c eval tasks` (no {INDEX})")
    tasks = job_eval_tasks(job)
    index: dict[str, Any] = {"job": job.name, "tag": job_tag(job), "tasks": {}}
    with atomic_directory(out, overwrite) as tmp:
        for task in tasks:
            rows = [
                {
                    "id": q.id,
                    "question": q.question,
                    "image": q.image,
                    "answer": q.reference,
                    "scoring": task.scoring,
                }
                for q in task_queries(task, job.eval.max_samples)
            ]
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            (tmp / f"{task.name}.jsonl").write_text(lines, encoding="utf-8")
            (tmp / f"{task.name}.yaml").write_text(
                task_yaml(job, task, out / f"{task.name}.jsonl"), encoding="utf-8"
            )
            index["tasks"][lmms_task_name(task.name)] = {
                "task": task.name,
                "source": str(task.path),
                "scoring": task.scoring,
                "rows": len(rows),
            }
        (tmp / "utils.py").write_text(UTILS, encoding="utf-8")
        write_json_atomic(tmp / INDEX, index)
    return [out / f"{task.name}.yaml" for task in tasks]


def is_task_directory(path: Path) -> bool:
    return (path / INDEX).is_file()


def task_yaml(job: JobConfig, task: EvalTask, rows: Path) -> str:
    """One lmms-eval task config. Strings are written as JSON, which YAML reads as they are."""
    name = lmms_task_name(task.name)
    return f"""\
# lmms-eval task `{name}`: {task.name} of job `{job.name}` ({task.path}), scored `{task.scoring}`
# as llava-c-ray scores it. Written by `llava-c eval tasks`; run with
#   lmms-eval --model llava_c --model_args pretrained=CHECKPOINT,template={job.model.template} \\
#     --batch_size {job.eval.batch_size} --include_path {rows.parent} --tasks {name}
task: {json.dumps(name)}
tag: [{json.dumps(job_tag(job))}]
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(rows))}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {job.eval.max_new_tokens}
  do_sample: false
  until: []
metric_list:
  - metric: score
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
  scoring: {json.dumps(task.scoring)}
"""


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: Any = None) -> str:
    """The question as our evaluator asks it (the task's instruction already appended)."""
    return doc["question"]


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The row's image, or none for a text-only row."""
    return [Image.open(doc["image"]).convert("RGB")] if doc["image"] else []


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """The answer's score under the row's rule, × 100: the mean over rows is our task score."""
    return {"score": 100.0 * score(results[0], doc["answer"], doc["scoring"])}
