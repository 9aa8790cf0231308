"""`llava_c`: an lmms-eval model that answers exactly as our evaluator does.

Registered through the `lmms_eval.models` entry point (pyproject.toml), so with lmms-eval installed
(`pip install 'llava-c-ray[eval]'`) any task runs on a checkpoint written here:

    lmms-eval --model llava_c --model_args pretrained=CKPT,template=vicuna_v1 --batch_size 16 \
        --tasks mme --include_path DIR

Each question goes through our template (`prompt_text`) and our batched greedy generation
(`EvalActor`), in batches formed as `evaluator.batches` forms them, so on the same rows its
answers are our evaluator's. It only generates: loglikelihood (multiple-choice scoring by
likelihood) and multi-round tasks raise NotImplementedError, and so does sampling. One process:
lmms-eval's multi-process (accelerate) launch is not supported.

lmms-eval is imported lazily: the `LlavaC` class, which subclasses lmms-eval's `lmms`, is built
the first time it is looked up (by lmms-eval's registry), so this package imports without it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from typing import Any

from llava_c_ray.errors import LlavaCError
from llava_c_ray.evaluate.evaluator import EvalActor, ModelLoader, Query, batches, load_hf_model

MODEL_NAME = "llava_c"
"""The name lmms-eval knows this model by (`--model llava_c`)."""


def manifest() -> Any:
    """The `lmms_eval.models` entry point: lmms-eval's registration record of `LlavaC`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.LlavaC")


def __getattr__(name: str) -> Any:
    if name == "LlavaC":
        from lmms_eval.api.model import lmms

        cls = type("LlavaC", (LlavaCAnswers, lmms), {"__module__": __name__, "is_simple": True})
        globals()["LlavaC"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LlavaCAnswers:
    """The behaviour of `LlavaC`, kept apart from lmms-eval's base class so it can be read (and
    imported) without lmms-eval. `task_dict` is filled by lmms-eval: task → split → docs."""

    def __init__(
        self,
        pretrained: str,
        template: str = "vicuna_v1",
        max_new_tokens: int | str = 32,
        batch_size: int | str = 16,
        device: str | None = None,
        loader: ModelLoader = load_hf_model,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise LlavaCError(
                f"unknown model_args for {MODEL_NAME}: {', '.join(sorted(unknown))}",
                fix="use pretrained=CHECKPOINT, template=vicuna_v1|plain, max_new_tokens=N "
                "(and --batch_size N)",
            )
        super().__init__()  # lmms-eval's base: rank, world size, cache hook, task_dict
        self.batch_size = whole_number(batch_size, "batch_size")
        self.max_new_tokens = whole_number(max_new_tokens, "max_new_tokens")
        self.actor = EvalActor(pretrained, template, loader)
        if device is not None and device != self.actor.device:
            self.actor.model.to(device)
            self.actor.device = device

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy answers of lmms-eval `generate_until` requests, in the order given. A request's
        args are (question, generation kwargs, doc_to_visual, doc id, task, split)."""
        rows = [Row(i, *request.args) for i, request in enumerate(requests)]
        # Shapes only, to batch as our evaluator does: image and text-only questions apart.
        shapes = [Query(row.group, str(row.index), "", row.image_marker(self), "") for row in rows]
        answers: list[str] = [""] * len(rows)
        for batch in batches(shapes, self.batch_size):
            chosen = [rows[int(q.id)] for q in batch]
            kwargs = chosen[0].generation_kwargs
            queries = [row.query(self) for row in chosen]
            texts = self.actor.answer(queries, max_new_tokens(kwargs, self.max_new_tokens))
            for row, text in zip(chosen, texts, strict=True):
                answers[row.index] = cut_at(text, stop_sequences(kwargs))
        return answers

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            f"{MODEL_NAME} answers by greedy generation only: loglikelihood requests (tasks with "
            "output_type loglikelihood or multiple_choice) are not supported; run the task's "
            "generate_until variant"
        )

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError(
            f"{MODEL_NAME} answers single-turn questions only: multi-round generation "
            "(output_type generate_until_multi_round) is not supported"
        )


class Row:
    """One `generate_until` request, with the doc's visual looked up on demand."""

    def __init__(
        self,
        index: int,
        question: str,
        generation_kwargs: dict[str, Any] | None,
        doc_to_visual: Any,
        doc_id: int,
        task: str,
        split: str,
    ) -> None:
        self.index, self.question = index, question
        self.generation_kwargs = dict(generation_kwargs or {})
        self.doc_to_visual, self.doc_id, self.task, self.split = doc_to_visual, doc_id, task, split
        refuse_sampling(task, self.generation_kwargs)
        # Requests are batched only with others of their task, split and generation kwargs.
        self.group = json.dumps([task, split, self.generation_kwargs], sort_keys=True, default=str)

    def visual(self, model: Any) -> Any:
        """The doc's one image (a PIL image), or None for a text-only question."""
        doc = model.task_dict[self.task][self.split][self.doc_id]
        visuals = list(flatten(self.doc_to_visual(doc)))
        if not visuals:
            return None
        if len(visuals) > 1 or isinstance(visuals[0], str):
            raise NotImplementedError(
                f"{MODEL_NAME} takes one image per question; doc {self.doc_id} of task "
                f"{self.task!r} gives {len(visuals)} visual(s) of type {type(visuals[0]).__name__}"
            )
        return visuals[0]

    def image_marker(self, model: Any) -> str | None:
        """An empty path for a question with an image, None without: `batches` keeps the two
        apart as it does for our evaluator's queries."""
        return None if self.visual(model) is None else ""

    def query(self, model: Any) -> Query:
        image = self.visual(model)
        file = None if image is None else as_file(image)
        return Query(self.task, str(self.doc_id), self.question, file, "")


def refuse_sampling(task: str, kwargs: dict[str, Any]) -> None:
    if kwargs.get("do_sample") or int(kwargs.get("num_beams") or 1) > 1:
        raise NotImplementedError(
            f"{MODEL_NAME} decodes greedily; task {task!r} asks for "
            f"{json.dumps(kwargs, default=str)}"
        )


def as_file(image: Any) -> Any:
    """The image as an in-memory PNG file: `EvalActor` opens each query's image with `Image.open`
    and converts it to RGB, so an RGB PNG hands it the harness's pixels exactly. (Goes once
    `EvalActor` answers decoded images directly.)"""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def flatten(visuals: Any) -> Iterator[Any]:
    for visual in visuals or []:
        if isinstance(visual, list | tuple):
            yield from flatten(visual)
        elif visual is not None:
            yield visual


def max_new_tokens(kwargs: dict[str, Any], default: int) -> int:
    return whole_number(kwargs.get("max_new_tokens", default), "max_new_tokens")


def stop_sequences(kwargs: dict[str, Any]) -> list[str]:
    until = kwargs.get("until") or []
    return [until] if isinstance(until, str) else [s for s in until if s]


def cut_at(text: str, stops: list[str]) -> str:
    """The text before the first stop sequence (greedy text is the same prefix either way)."""
    ends = [text.find(s) for s in stops if s in text]
    return text[: min(ends)] if ends else text


def whole_number(value: int | str, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number <= 0:
        raise LlavaCError(
            f"{MODEL_NAME}: {name}={value!r} is not a positive whole number",
            fix=f"pass {name} as a number, e.g. 16 ('auto' batch sizes are not supported)",
        )
    return number
