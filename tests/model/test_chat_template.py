"""The chat template a checkpoint carries renders our training prompts byte for byte.

Other HF tools (lmms-eval's `llava_hf`, pipelines) prompt through `apply_chat_template`; each case
builds the messages such a tool sends and compares with the text `prompt_segment` /
`answer_segment` make (as `prompt_text` and `encode_example` tokenise it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoProcessor, AutoTokenizer

from llava_c_ray.data.template import (
    CHAT_TEMPLATE,
    CHAT_TEMPLATES,
    SYSTEM,
    answer_segment,
    chat_template,
    prompt_segment,
    prompt_text,
    with_instruction,
)
from llava_c_ray.errors import LlavaCError

QUESTION = "Which object is on the left?"
INSTRUCTION = "Answer with one word."
ASKED = with_instruction(QUESTION, INSTRUCTION)
IMAGE = {"type": "image", "url": "unused.png"}


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


def user(*parts: dict[str, str], image: bool = False) -> dict[str, Any]:
    return {"role": "user", "content": [*([IMAGE] if image else []), *parts]}


# (case, messages, the prompt our evaluator / trainer makes for them)
SINGLE_TURN = [
    ("image, list content", [user(text(ASKED), image=True)], prompt_text(ASKED, image=True)),
    ("text only, list content", [user(text(ASKED))], prompt_text(ASKED)),
    (
        "question and instruction as two text parts",
        [user(text(QUESTION), text(INSTRUCTION), image=True)],
        prompt_text(ASKED, image=True),
    ),
    (
        "image token in string content (lmms-eval llava_hf)",
        [{"role": "user", "content": f"<image>\n{ASKED}"}],
        prompt_text(ASKED, image=True),
    ),
    ("text only, string content", [{"role": "user", "content": ASKED}], prompt_text(ASKED)),
    (
        "image part and <image> already in the text",
        [user(text(f"<image>\n{ASKED}"), image=True)],
        prompt_text(f"<image>\n{ASKED}", image=True),
    ),
    (
        "the default system line given explicitly, list content",
        [{"role": "system", "content": [text(SYSTEM)]}, user(text(ASKED), image=True)],
        prompt_text(ASKED, image=True),
    ),
    (
        "the default system line given explicitly, string content",
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASKED}],
        prompt_text(ASKED),
    ),
]


def other_system_cases() -> list[tuple[str, list[dict[str, Any]], str]]:
    """A system message replaces the default line; an empty one leaves no system line."""
    line = "You are a terse assistant."
    ours = prompt_text(ASKED, image=True)
    assert ours.startswith(f"{SYSTEM} ")
    replaced = ours.replace(SYSTEM, line, 1)
    return [
        (
            "custom system, list content",
            [{"role": "system", "content": [text(line)]}, user(text(ASKED), image=True)],
            replaced,
        ),
        (
            "custom system, string content",
            [{"role": "system", "content": line}, user(text(ASKED), image=True)],
            replaced,
        ),
        (
            "empty system",
            [{"role": "system", "content": ""}, user(text(ASKED), image=True)],
            ours.removeprefix(f"{SYSTEM} "),
        ),
    ]


def conversation_text(turns: list[str], template: str, image: bool) -> str:
    """The text `encode_example` tokenises for human/gpt turns, ending with the open prompt."""
    out = ""
    for i in range(0, len(turns), 2):
        human = f"<image>\n{turns[i]}" if image and i == 0 else turns[i]
        out += prompt_segment(human, template, first=i == 0)
        if i + 1 < len(turns):
            out += answer_segment(turns[i + 1], template)
    return out


TURNS = [ASKED, "cat", "And the colour?", "red", "How many?"]


def conversation(string_content: bool, image: bool) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for i, value in enumerate(TURNS):
        role = "user" if i % 2 == 0 else "assistant"
        if string_content:
            content: Any = f"<image>\n{value}" if image and i == 0 else value
        else:
            content = [*([IMAGE] if image and i == 0 else []), text(value)]
        messages.append({"role": role, "content": content})
    return messages


def cases(template: str) -> list[tuple[str, list[dict[str, Any]], str]]:
    """Every case for `template`: single turns (`prompt_text`) and multi-turn (`encode_example`)."""
    single = SINGLE_TURN + other_system_cases() if template == "vicuna_v1" else SINGLE_TURN
    out = [
        (name, messages, prompt if template == "vicuna_v1" else prompt_text_of(messages, template))
        for name, messages, prompt in single
    ]
    for string_content in (False, True):
        for image in (False, True):
            name = f"multi-turn, {'string' if string_content else 'list'} content, image={image}"
            out.append(
                (
                    name,
                    conversation(string_content, image),
                    conversation_text(TURNS, template, image),
                )
            )
    return out


def prompt_text_of(messages: list[dict[str, Any]], template: str) -> str:
    """`prompt_text` for the single user message of a case (plain ignores the system message)."""
    content = messages[-1]["content"]
    if isinstance(content, str):
        return prompt_text(content, template)
    question = "\n".join(part["text"] for part in content if part["type"] == "text")
    return prompt_text(question, template, image=any(p["type"] == "image" for p in content))


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path):
    return AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize(
    ("name", "messages", "expected"), cases("vicuna_v1"), ids=[c[0] for c in cases("vicuna_v1")]
)
def test_checkpoint_template_renders_our_prompt(
    processor, name: str, messages: list[dict[str, Any]], expected: str
) -> None:
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == expected
    # lmms-eval's llava_hf prompts through the tokenizer's template with string content.
    assert (
        processor.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        == expected
    )


@pytest.mark.parametrize(
    ("name", "messages", "expected"), cases("plain"), ids=[c[0] for c in cases("plain")]
)
def test_plain_template_renders_our_prompt(
    processor, name: str, messages: list[dict[str, Any]], expected: str
) -> None:
    rendered = processor.apply_chat_template(
        messages, chat_template=chat_template("plain"), add_generation_prompt=True, tokenize=False
    )
    assert rendered == expected


def test_answer_closes_the_turn_without_generation_prompt(processor) -> None:
    messages = [user(text(ASKED), image=True), {"role": "assistant", "content": [text("cat")]}]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    assert rendered == prompt_text(ASKED, image=True) + answer_segment("cat", "vicuna_v1")


def test_checkpoint_persists_the_template_and_tokenises_like_training(
    tiny_checkpoint: Path, processor, tmp_path: Path
) -> None:
    assert (tiny_checkpoint / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert not (tiny_checkpoint / "chat_template.json").exists()
    assert processor.chat_template == CHAT_TEMPLATE
    assert AutoTokenizer.from_pretrained(tiny_checkpoint).chat_template == CHAT_TEMPLATE

    processor.save_pretrained(tmp_path / "again")  # as a stage output saves its start's processor
    again = AutoProcessor.from_pretrained(tmp_path / "again")
    assert again.chat_template == CHAT_TEMPLATE
    messages = [user(text(ASKED), image=True)]
    rendered = again.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == prompt_text(ASKED, image=True)
    # The system line is one added token of the tiny tokenizer: the rendered text still holds it.
    ids = again.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert again.tokenizer.convert_ids_to_tokens(ids[0]) == SYSTEM


def test_a_system_message_after_the_first_turn_is_refused(processor) -> None:
    messages = [user(text(ASKED)), {"role": "system", "content": "late"}]
    with pytest.raises(Exception, match="optional first system message"):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_unknown_template_names_the_known_ones() -> None:
    assert set(CHAT_TEMPLATES) == {"vicuna_v1", "plain"}
    with pytest.raises(LlavaCError, match="vicuna_v1, plain"):
        chat_template("llama3")  # type: ignore[arg-type]
