"""Evaluate a checkpoint on many tasks with batched greedy generation on Ray actors.

Each `EvalActor` loads the model once; the work is split into batches spread over the actors.
Scores (mean × 100 per task) and every sample's prompt, prediction, reference and score are
written to `eval.json`, so any number can be audited.

A routed model (`RoutedModel`: one that mixes experts with weights of its own per row, like `hide`)
also gets each sample's routing weights and, per task, the mean weight of each expert and the
share of questions sent to their own task's expert (`run_records.Routing`) — the routing record
`llava-c report` plots.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from llava_c_ray.config import JobConfig
from llava_c_ray.data.records import load_records
from llava_c_ray.data.scoring import score
from llava_c_ray.data.template import with_instruction
from llava_c_ray.files import write_json_atomic
from llava_c_ray.run_records import EvalOutput, Routing, TaskRouting


@dataclass(frozen=True)
class EvalTask:
    name: str
    path: Path
    image_folder: Path | None
    scoring: str
    instruction: str = ""


GENERAL = "general_probe"
"""The general probe's name among a stage's evaluated tasks."""


def job_eval_tasks(job: JobConfig, only: set[str] | None = None) -> list[EvalTask]:
    """The job's tasks' test splits (those named in `only`, if given), then the general probe:
    what a stage's evaluation scores."""
    tasks = [
        EvalTask(t.name, t.test, t.image_folder, t.scoring, t.instruction)
        for t in job.tasks
        if only is None or t.name in only
    ]
    probe = job.general_probe
    if probe is not None:
        tasks.append(EvalTask(GENERAL, probe.path, probe.image_folder, probe.scoring))
    return tasks


@dataclass(frozen=True)
class Query:
    task: str
    id: str
    question: str
    image: str | None
    reference: str


@dataclass
class EvalResult:
    scores: dict[str, float]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    routing: Routing | None = None


@runtime_checkable
class RoutedModel(Protocol):
    """A model that mixes several experts with weights of its own for each row (`hide`). After
    every `generate` (or forward) `last_weights` holds the weights it gave the batch's rows
    (a rows × experts tensor, each row summing to 1); `expert_names` names its columns, each
    expert by the task it was trained on (a multi-task stage's by its tasks joined by '+')."""

    expert_names: list[str]
    last_weights: Any


@dataclass(frozen=True)
class Answers:
    """A batch's greedy answers and, from a routed model, each row's routing weights."""

    texts: list[str]
    weights: list[list[float]] | None = None
    experts: list[str] | None = None


ModelLoader = Callable[[str, Any], Any]
"""(model directory, torch dtype) → a model with `generate`: how a method's stage model is run."""


def load_hf_model(model_dir: str, dtype: Any) -> Any:
    """A plain Hugging Face LLaVA checkpoint (every method whose stage model is merged)."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)


class EvalActor:
    """Holds one model and its processor; answers batches of questions by greedy decoding."""

    def __init__(
        self, model_dir: str, template: str = "vicuna_v1", loader: ModelLoader = load_hf_model
    ):
        import torch
        from transformers import AutoProcessor

        self.template = template
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = loader(model_dir, dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)

    def answer(self, queries: list[Query], max_new_tokens: int) -> list[str]:
        """Greedy answers of a batch whose queries all have images or all are text-only."""
        return self.answer_routed(queries, max_new_tokens).texts

    def answer_routed(self, queries: list[Query], max_new_tokens: int) -> Answers:
        """`answer`, with the routing weights of each row when the model is a `RoutedModel`."""
        import torch
        from PIL import Image

        from llava_c_ray.data.template import encode_prompts

        images = None
        if queries[0].image is not None:
            images = [Image.open(q.image).convert("RGB") for q in queries]
        batch = encode_prompts([q.question for q in queries], self.processor, images, self.template)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        generated = out[:, batch["input_ids"].shape[1] :]
        texts = [
            t.strip()
            for t in self.processor.tokenizer.batch_decode(generated, skip_special_tokens=True)
        ]
        if not isinstance(self.model, RoutedModel):
            return Answers(texts)
        weights = self.model.last_weights.float().cpu()
        if weights.shape != (len(queries), len(self.model.expert_names)):
            raise RuntimeError(
                f"a routed model kept routing weights of shape {tuple(weights.shape)} for a batch "
                f"of {len(queries)} rows and {len(self.model.expert_names)} experts"
            )
        return Answers(texts, weights.tolist(), list(self.model.expert_names))


def task_queries(task: EvalTask, max_samples: int | None) -> list[Query]:
    records = load_records(task.path, task.image_folder)[:max_samples]
    return [
        Query(
            task.name,
            r.id,
            with_instruction(r.question, task.instruction),
            str(Path(task.image_folder) / r.image) if r.image else None,
            r.answer,
        )
        for r in records
    ]


def batches(queries: list[Query], size: int) -> list[list[Query]]:
    """Batches within a task, split where image and text-only queries meet."""
    out = []
    for _, group in itertools.groupby(queries, key=lambda q: (q.task, q.image is None)):
        group = list(group)
        out += [group[i : i + size] for i in range(0, len(group), size)]
    return out


def evaluate_checkpoint(
    model_dir: Path,
    tasks: list[EvalTask],
    *,
    num_actors: int = 1,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_samples: int | None = None,
    template: str = "vicuna_v1",
    out: Path | None = None,
    use_gpu: bool = False,
    loader: ModelLoader = load_hf_model,
) -> EvalResult:
    """Score `model_dir` on every task; write eval.json to `out` if given.

    With `use_gpu` each actor holds one GPU (an actor without a GPU request would see them all
    and every actor would load its model onto cuda:0)."""
    import ray

    from llava_c_ray.ray_session import ensure_ray

    queries = [q for task in tasks for q in task_queries(task, max_samples)]
    ensure_ray()
    actor_class = ray.remote(**({"num_gpus": 1} if use_gpu else {"num_cpus": 1}))(EvalActor)
    actors = [actor_class.remote(str(model_dir), template, loader) for _ in range(num_actors)]
    work = batches(queries, batch_size)
    refs = [
        actors[i % num_actors].answer_routed.remote(b, max_new_tokens) for i, b in enumerate(work)
    ]
    answered: list[Answers] = ray.get(refs)
    for actor in actors:
        ray.kill(actor)
    result = evaluation_result(tasks, work, answered)
    if out is not None:
        write_eval(out, model_dir, result)
    return result


def evaluation_result(
    tasks: list[EvalTask], work: list[list[Query]], answered: list[Answers]
) -> EvalResult:
    """Scores and samples of the batches `work` answered as `answered`, with the routing record
    when a routed model answered them."""
    queries = [q for b in work for q in b]
    routing = routing_record(tasks, queries, answered)
    weights = [w for a in answered for w in a.weights] if routing is not None else None
    result = score_answers(tasks, queries, [t for a in answered for t in a.texts], weights)
    result.routing = routing
    return result


def score_answers(
    tasks: list[EvalTask],
    queries: list[Query],
    answers: list[str],
    weights: list[list[float]] | None = None,
) -> EvalResult:
    """Each query's answer scored; `weights` (a routed model's, one list per query) are kept in
    its sample."""
    rules = {t.name: t.scoring for t in tasks}
    samples: dict[str, list[dict[str, Any]]] = {t.name: [] for t in tasks}
    routed = weights if weights is not None else [None] * len(queries)
    for query, answer, weight in zip(queries, answers, routed, strict=True):
        value = score(answer, query.reference, rules[query.task])
        sample = {**asdict(query), "prediction": answer, "score": value}
        if weight is not None:
            sample["routing"] = weight
        samples[query.task].append(sample)
    scores = {
        name: 100.0 * sum(s["score"] for s in rows) / len(rows) if rows else 0.0
        for name, rows in samples.items()
    }
    return EvalResult(scores, samples)


def own_expert_index(task: str, experts: list[str]) -> int | None:
    """The index of the expert trained on `task` (named by it, alone or '+'-joined), if any."""
    return next((i for i, e in enumerate(experts) if task in e.split("+")), None)


def routing_record(
    tasks: list[EvalTask], queries: list[Query], answered: list[Answers]
) -> Routing | None:
    """Per task: each expert's mean weight and the percent of questions whose largest weight is
    their own task's expert. None unless every batch came from a routed model."""
    if not answered or any(a.weights is None for a in answered):
        return None
    experts = answered[0].experts
    if any(a.experts != experts for a in answered):
        raise RuntimeError("the evaluation actors' routed models name different experts")
    rows: dict[str, list[list[float]]] = {t.name: [] for t in tasks}
    for query, weights in zip(queries, (w for a in answered for w in a.weights), strict=True):
        rows[query.task].append(weights)
    return Routing(
        experts=experts,
        tasks={name: task_routing(w, own_expert_index(name, experts)) for name, w in rows.items()},
    )


def task_routing(weights: list[list[float]], own: int | None) -> TaskRouting:
    """One task's routing from its questions' weights (rows × experts) and its own expert."""
    if not weights:
        return TaskRouting(rows=0, mean_weights=[], own_expert=None)
    chosen = [max(range(len(w)), key=w.__getitem__) for w in weights]  # ties: the first
    return TaskRouting(
        rows=len(weights),
        mean_weights=[sum(col) / len(weights) for col in zip(*weights, strict=True)],
        own_expert=None if own is None else 100.0 * chosen.count(own) / len(weights),
    )


def write_eval(out: Path, model_dir: Path, result: EvalResult) -> None:
    output = EvalOutput(
        model=str(model_dir), scores=result.scores, samples=result.samples, routing=result.routing
    )
    # A plain model's eval.json keeps its shape: no routing key.
    exclude = {"routing"} if result.routing is None else set()
    write_json_atomic(out, output.model_dump(mode="json", exclude=exclude))
