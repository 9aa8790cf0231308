"""Evaluate a checkpoint on many tasks with batched greedy generation on Ray actors.

Each `EvalActor` loads the model once; the work is split into batches spread over the actors.
Scores (mean × 100 per task) and every sample's prompt, prediction, reference and score are
written to `eval.json`, so any number can be audited.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llava_c_ray.data.records import load_records
from llava_c_ray.data.scoring import score
from llava_c_ray.data.template import with_instruction
from llava_c_ray.files import write_json_atomic


@dataclass(frozen=True)
class EvalTask:
    name: str
    path: Path
    image_folder: Path | None
    scoring: str
    instruction: str = ""


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
        return [
            t.strip()
            for t in self.processor.tokenizer.batch_decode(generated, skip_special_tokens=True)
        ]


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
    refs = [actors[i % num_actors].answer.remote(b, max_new_tokens) for i, b in enumerate(work)]
    answers = [a for chunk in ray.get(refs) for a in chunk]
    for actor in actors:
        ray.kill(actor)
    result = score_answers(tasks, [q for b in work for q in b], answers)
    if out is not None:
        write_eval(out, model_dir, result)
    return result


def score_answers(tasks: list[EvalTask], queries: list[Query], answers: list[str]) -> EvalResult:
    rules = {t.name: t.scoring for t in tasks}
    samples: dict[str, list[dict[str, Any]]] = {t.name: [] for t in tasks}
    for query, answer in zip(queries, answers, strict=True):
        value = score(answer, query.reference, rules[query.task])
        samples[query.task].append({**asdict(query), "prediction": answer, "score": value})
    scores = {
        name: 100.0 * sum(s["score"] for s in rows) / len(rows) if rows else 0.0
        for name, rows in samples.items()
    }
    return EvalResult(scores, samples)


def write_eval(out: Path, model_dir: Path, result: EvalResult) -> None:
    write_json_atomic(
        out, {"model": str(model_dir), "scores": result.scores, "samples": result.samples}
    )
