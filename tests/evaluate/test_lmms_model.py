"""lmms-eval's run of our model on our generated tasks answers and scores as our evaluator does.

Needs lmms-eval (the `eval` extra; docs/lmms-eval.md says how to install it beside the CPU torch),
so marked `lmms`: `make test` runs these in the eval venv. lmms-eval runs in process through its
Python API, the model looked up by name (`llava_c`, our entry point) and the tasks from
`write_lmms_tasks`, on the tiny checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llava_c_ray.config import job_from_dict
from llava_c_ray.evaluate.evaluator import EvalActor, batches, evaluation_result, task_queries
from llava_c_ray.evaluate.lmms_model import MODEL_NAME, LlavaCAnswers
from llava_c_ray.evaluate.lmms_tasks import (
    job_eval_tasks,
    job_tag,
    lmms_task_name,
    write_lmms_tasks,
)

pytestmark = [pytest.mark.integration, pytest.mark.lmms]

BATCH = 4  # smaller than a task, so batches split inside tasks and at image / text-only edges
MAX_NEW_TOKENS = 8
SAMPLES = 6


@pytest.fixture(scope="module")
def job(tiny_benchmark: Path, tiny_checkpoint: Path) -> Any:
    return job_from_dict(
        {
            "name": "lmms",
            "model": {"path": str(tiny_checkpoint)},
            "benchmark": {"path": str(tiny_benchmark), "tasks": ["icon_count", "attributes"]},
            "eval": {"batch_size": BATCH, "max_new_tokens": MAX_NEW_TOKENS, "max_samples": SAMPLES},
        }
    )


@pytest.fixture(scope="module")
def lmms_run(job: Any, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    out = tmp_path_factory.mktemp("lmms") / "tasks"
    write_lmms_tasks(job, out)
    return simple_evaluate(
        model=MODEL_NAME,
        model_args=f"pretrained={tiny_checkpoint},template={job.model.template}",
        tasks=[job_tag(job)],
        batch_size=BATCH,
        task_manager=TaskManager(include_path=str(out), include_defaults=False),
        log_samples=True,
    )


def test_lmms_eval_finds_our_model_by_name():
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    model = get_model(MODEL_NAME)
    assert issubclass(model, lmms) and issubclass(model, LlavaCAnswers)


def test_answers_and_scores_equal_our_evaluators(job: Any, tiny_checkpoint: Path, lmms_run: dict):
    tasks = job_eval_tasks(job)
    queries = [q for t in tasks for q in task_queries(t, SAMPLES)]
    actor = EvalActor(str(tiny_checkpoint), job.model.template)
    work = batches(queries, BATCH)
    ours = evaluation_result(tasks, work, [actor.answer_routed(b, MAX_NEW_TOKENS) for b in work])

    assert queries, "the tiny benchmark gave no rows"
    for task in tasks:
        name = lmms_task_name(task.name)
        theirs = sorted(lmms_run["samples"][name], key=lambda s: s["doc_id"])
        assert [response(s) for s in theirs] == [
            s["prediction"] for s in ours.samples[task.name]
        ], task.name
        assert lmms_run["results"][name]["score,none"] == pytest.approx(ours.scores[task.name])


def response(sample: dict) -> str:
    """A logged sample's answer (a one-item list in the API's samples, a string in its files)."""
    answer = sample["filtered_resps"]
    return answer[0] if isinstance(answer, list) else answer


def test_generate_only(tiny_checkpoint: Path):
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    model = get_model(MODEL_NAME)(pretrained=str(tiny_checkpoint))
    request = Instance(
        "generate_until",
        ("Which word is spelled d-o-g?", {"do_sample": True}, lambda doc: [], 0, "t", "test"),
        0,
        {"task": "t", "doc_id": 0, "repeats": 1},
    )
    model.task_dict = {"t": {"test": [{}]}}
    with pytest.raises(NotImplementedError, match="greedily"):
        model.generate_until([request])
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        model.loglikelihood([request])
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([request])


def test_stop_sequences_cut_the_answer(tiny_checkpoint: Path):
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    model = get_model(MODEL_NAME)(pretrained=str(tiny_checkpoint), max_new_tokens=6)
    model.task_dict = {"t": {"test": [{}]}}

    def ask(kwargs: dict) -> str:
        args = ("Which word is spelled d-o-g?", kwargs, lambda doc: [], 0, "t", "test")
        request = Instance("generate_until", args, 0, {"task": "t", "doc_id": 0, "repeats": 1})
        return model.generate_until([request])[0]

    full = ask({})
    assert len(full) > 1, "the tiny model's answer is too short to cut; ask another question"
    stop = full[1:]
    cut = ask({"until": ["never said", stop]})
    assert cut == full[: full.index(stop)] and len(cut) < len(full)


def test_stock_llava_hf_answers_our_image_questions_as_our_evaluator(
    job: Any, tiny_checkpoint: Path, tmp_path: Path
):
    """lmms-eval's own `llava_hf` prompts through the checkpoint's chat template, which renders
    our training prompt, so its answers to image questions are ours, up to the surrounding
    whitespace our evaluator strips. (lmms-eval 0.7.3's llava_hf answers no text-only question: it logs "Error … in generating" for each and returns ''.)"""
    import torch
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    out = tmp_path / "tasks"
    write_lmms_tasks(job, out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    theirs = simple_evaluate(
        model="llava_hf",
        model_args=f"pretrained={tiny_checkpoint},device={device},device_map={device}",
        tasks=[job_tag(job)],
        batch_size=1,
        task_manager=TaskManager(include_path=str(out), include_defaults=False),
        log_samples=True,
    )
    actor = EvalActor(str(tiny_checkpoint), job.model.template)
    compared = 0
    for task in job_eval_tasks(job):
        queries = task_queries(task, SAMPLES)
        samples = sorted(theirs["samples"][lmms_task_name(task.name)], key=lambda s: s["doc_id"])
        for query, sample in zip(queries, samples, strict=True):
            if query.image is not None:
                ours = actor.answer([query], MAX_NEW_TOKENS)[0]
                assert response(sample).strip() == ours, query.id  # we strip the decoded text
                compared += 1
    assert compared >= 2 * SAMPLES  # both tasks' questions, and the probe's image questions
