"""Conversation templates and tokenisation with labels on the assistant answers only.

`vicuna_v1` is what LLaVA-1.5 trains with: a system line, then `USER: … ASSISTANT: …</s>` turns.
`plain` is LLaVA's pre-training format: the image, then the answer. A conversation is tokenised in
segments — each prompt segment, then each answer segment — so the prompt that generation later
sees is tokenised exactly as in training. The first segment goes through the model's HF processor,
which expands `<image>` into the image tokens exactly as transformers' LLaVA processor does.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from PIL import Image

from llava_c_ray.data.records import IMAGE_TOKEN, Record
from llava_c_ray.errors import LlavaCError

IGNORE_INDEX = -100
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
Template = Literal["vicuna_v1", "plain"]
TEMPLATES = ("vicuna_v1", "plain")


def with_instruction(question: str, instruction: str) -> str:
    """Append a task instruction unless the question already ends with it."""
    if not instruction or question.rstrip().endswith(instruction):
        return question
    return f"{question}\n{instruction}"


def prompt_segment(human: str, template: Template, first: bool) -> str:
    """The text of one user turn up to (and including) the assistant tag."""
    if template == "plain":
        return IMAGE_TOKEN if IMAGE_TOKEN in human else ""
    if template != "vicuna_v1":
        raise LlavaCError(
            f"unknown template {template!r}", fix=f"use one of: {', '.join(TEMPLATES)}"
        )
    head = f"{SYSTEM} " if first else ""
    return f"{head}USER: {human} ASSISTANT:"


def answer_segment(answer: str, template: Template) -> str:
    return f"{answer}</s>" if template == "plain" else f" {answer}</s>"


def prompt_text(question: str, template: Template = "vicuna_v1", image: bool = False) -> str:
    """The generation prompt for a single question (with `<image>` first when there is an image)."""
    human = f"{IMAGE_TOKEN}\n{question}" if image and IMAGE_TOKEN not in question else question
    return prompt_segment(human, template, first=True)


def encode_example(
    record: Record,
    processor: Any,
    image: Image.Image | None,
    template: Template = "vicuna_v1",
    *,
    instruction: str = "",
    max_length: int | None = None,
) -> dict[str, Any]:
    """input_ids, labels (-100 except answers + their `</s>`) and pixel_values (None if no image)."""
    tokenizer = processor.tokenizer
    turns = record.conversations
    ids: list[int] = []
    labels: list[int] = []
    pixel_values = None
    for i in range(0, len(turns), 2):
        human = turns[i].value if i else with_instruction(turns[0].value, instruction)
        prompt = prompt_segment(human, template, first=i == 0)
        if i == 0:
            first = encode_first(processor, prompt, image)
            prompt_ids, pixel_values = first["input_ids"], first.get("pixel_values")
        else:
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids += prompt_ids
        labels += [IGNORE_INDEX] * len(prompt_ids)
        if i + 1 < len(turns):
            answer_ids = tokenizer(
                answer_segment(turns[i + 1].value, template), add_special_tokens=False
            )["input_ids"]
            ids += answer_ids
            labels += answer_ids
    if max_length is not None and len(ids) > max_length:
        ids, labels = truncate(ids, labels, max_length, processor)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}


def encode_first(processor: Any, prompt: str, image: Image.Image | None) -> dict[str, Any]:
    """Tokenise the first segment through the processor (BOS added, `<image>` expanded)."""
    if image is None:
        return {"input_ids": processor.tokenizer(prompt)["input_ids"]}
    out = processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt")
    return {"input_ids": out["input_ids"][0].tolist(), "pixel_values": out["pixel_values"][0]}


def truncate(
    ids: list[int], labels: list[int], max_length: int, processor: Any
) -> tuple[list[int], list[int]]:
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id in ids[max_length:]:
        raise LlavaCError(
            f"a record needs more than max_length={max_length} tokens to hold its image",
            fix="raise training.max_length",
        )
    return ids[:max_length], labels[:max_length]


def encode_prompts(
    questions: list[str],
    processor: Any,
    images: list[Image.Image] | None,
    template: Template = "vicuna_v1",
) -> dict[str, torch.Tensor]:
    """A left-padded generation batch of prompts (all with images, or all text-only)."""
    prompts = [prompt_text(q, template, image=images is not None) for q in questions]
    processor.tokenizer.padding_side = "left"
    if images is None:
        return processor.tokenizer(prompts, return_tensors="pt", padding=True)
    return processor(
        text=prompts, images=[im.convert("RGB") for im in images], return_tensors="pt", padding=True
    )
