"""Conversation templates and tokenisation with labels on the assistant answers only.

`vicuna_v1` is what LLaVA-1.5 trains with: a system line, then `USER: … ASSISTANT: …</s>` turns.
`plain` is LLaVA's pre-training format: the image, then the answer. A conversation is tokenised in
segments — each prompt segment, then each answer segment — so the prompt that generation later
sees is tokenised exactly as in training. The first segment goes through the model's HF processor,
which expands `<image>` into the image tokens exactly as transformers' LLaVA processor does.
`CHAT_TEMPLATES` are the same two formats as Jinja chat templates, so that a checkpoint prompts
other HF tools (`apply_chat_template`) with the very text these segments make.
"""

from __future__ import annotations

import json
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


def unknown_template(template: str) -> LlavaCError:
    return LlavaCError(f"unknown template {template!r}", fix=f"use one of: {', '.join(TEMPLATES)}")


def prompt_segment(human: str, template: Template, first: bool) -> str:
    """The text of one user turn up to (and including) the assistant tag."""
    if template == "plain":
        return IMAGE_TOKEN if IMAGE_TOKEN in human else ""
    if template != "vicuna_v1":
        raise unknown_template(template)
    head = f"{SYSTEM} " if first else ""
    return f"{head}USER: {human} ASSISTANT:"


def answer_segment(answer: str, template: Template) -> str:
    return f"{answer}</s>" if template == "plain" else f" {answer}</s>"


def prompt_text(question: str, template: Template = "vicuna_v1", image: bool = False) -> str:
    """The generation prompt for a single question (with `<image>` first when there is an image)."""
    human = f"{IMAGE_TOKEN}\n{question}" if image and IMAGE_TOKEN not in question else question
    return prompt_segment(human, template, first=True)


# Jinja for HF's `apply_chat_template`: the text of `prompt_segment` / `answer_segment` turn by turn.
# Content is a string (used verbatim) or a list of parts; text parts are joined by "\n" (a question
# and its instruction, as `with_instruction` joins them), and an image part puts `<image>\n` before
# the text unless the text holds `<image>` already (as `prompt_text` does).
_CONTENT_MACROS = r"""
{%- macro text_of(content) -%}
  {%- if content is string -%}{{ content }}
  {%- else -%}{{ content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\n') }}
  {%- endif -%}
{%- endmacro -%}
{%- macro image_tokens(content) -%}
  {%- if content is not string and '<image>' not in text_of(content) -%}
    {%- for part in content if part['type'] in ['image', 'image_url'] -%}{{ '<image>\n' }}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
"""
# vicuna_v1: a leading system message replaces the default system line (an empty one drops it).
_VICUNA_V1_BODY = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = text_of(messages[0]['content']) -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- if system -%}{{ system ~ ' ' }}{%- endif -%}
{%- for message in turns -%}
  {%- if message['role'] == 'user' -%}
    {{- 'USER: ' ~ image_tokens(message['content']) ~ text_of(message['content']) ~ ' ' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- 'ASSISTANT: ' ~ text_of(message['content']) ~ '</s>' -}}
  {%- else -%}
    {{- raise_exception('vicuna_v1 takes user and assistant turns after an optional first system message, not ' ~ message['role']) -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}
"""
# plain (LLaVA pre-training): `<image>` for a user turn with an image, the answer, `</s>`; no text
# of the user's and no system line.
_PLAIN_BODY = r"""
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}
    {%- if image_tokens(message['content']) or '<image>' in text_of(message['content']) -%}{{ '<image>' }}{%- endif -%}
  {%- elif message['role'] == 'assistant' -%}
    {{- text_of(message['content']) ~ '</s>' -}}
  {%- endif -%}
{%- endfor -%}
"""
CHAT_TEMPLATES: dict[str, str] = {
    "vicuna_v1": (
        f"{{%- set system = {json.dumps(SYSTEM)} -%}}" + _CONTENT_MACROS + _VICUNA_V1_BODY
    ).strip(),
    "plain": (_CONTENT_MACROS + _PLAIN_BODY).strip(),
}
# What every checkpoint written here carries as its processor's and tokenizer's chat template.
CHAT_TEMPLATE = CHAT_TEMPLATES["vicuna_v1"]


def chat_template(template: Template) -> str:
    """The Jinja chat template rendering `template`'s prompt text (see `CHAT_TEMPLATES`)."""
    if template not in CHAT_TEMPLATES:
        raise unknown_template(template)
    return CHAT_TEMPLATES[template]


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
