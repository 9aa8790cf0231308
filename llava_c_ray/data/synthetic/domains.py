"""The domains of the built-in benchmark: each draws one (image, question, answer) sample from a seed.

Six *general* domains (the continual-pretraining order of the paper: text QA, captions, OCR, scene
text, spatial relations, grounding) and five *continual fine-tuning* tasks on new visual domains with
the paper's task-specific suffixes. Three of the five answer with option letters whose meaning
differs per task, and two with single words: the pressures that cause forgetting and base-model
degradation in the paper. `style="sentence"` asks for full-sentence answers, the format of the
general probe that no fine-tuning task uses.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from llava_c_ray.data.synthetic import draw
from llava_c_ray.data.synthetic.draw import COLORS, IMAGE_SIZE, SHAPES

WORD_SUFFIX = "Answer the question using a single word or phrase."
LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTER_AT_END_SUFFIX = (
    "Please answer the question and provide the correct option letter at the end."
)
CAPTION_PROMPT = "Provide a one-sentence caption for the image."
GROUNDING_PROMPT = "Provide the bounding box coordinate of the region this sentence describes:"
WORDS = ("cat", "dog", "sun", "map", "box", "cup", "key", "pen", "hat", "bus", "egg", "fox")
NEW_SHAPES = ("diamond", "cross", "ring")  # drawn only in the continual tasks
OBJECT_SIZES = ("small", "large")
# Text QA spells these: the language model learns to write every word the tasks answer with (as a
# pretrained LLM knows its words), while what they look like stays new.
SPELLED = WORDS + SHAPES + NEW_SHAPES + OBJECT_SIZES
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Sample:
    image: Image.Image | None
    question: str
    answer: str


Domain = Callable[[random.Random, str], Sample]


def options_text(options: list[str]) -> str:
    return "\n".join(f"{chr(65 + i)}. {opt}" for i, opt in enumerate(options))


def letter(options: list[str], answer: str) -> str:
    return chr(65 + options.index(answer))


# --- general domains -------------------------------------------------------------------------


def text_qa(rng: random.Random, style: str) -> Sample:
    """Text only: sums, corners of the drawn shapes, and which word a spelling spells."""
    a, b = rng.randint(0, 4), rng.randint(0, 4)
    kind = rng.choice(("plus", "corners", "spell"))
    if kind == "plus":
        question, value = f"What is {a} plus {b}?", str(a + b)
        sentence = f"{a} plus {b} is {value}."
    elif kind == "corners":
        shape = rng.choice(SHAPES)
        value = str({"circle": 0, "square": 4, "triangle": 3}[shape])
        question, sentence = (
            f"How many corners does a {shape} have?",
            f"A {shape} has {value} corners.",
        )
    else:
        value = rng.choice(SPELLED)
        spelling = "-".join(value)
        question = f"Which word is spelled {spelling}?"
        sentence = f"The word spelled {spelling} is {value}."
    if style == "sentence":
        return Sample(None, f"{question} Answer in a full sentence.", sentence)
    return Sample(None, f"{question}\n{WORD_SUFFIX}", value)


def captions(rng: random.Random, style: str) -> Sample:
    """One large centred shape; captions name its colour and shape."""
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    prompt = CAPTION_PROMPT
    if style == "sentence":
        prompt = rng.choice(
            (
                "Describe the image.",
                "What do you see in this picture?",
                "Tell me what the image shows.",
            )
        )
    image = draw.draw_boxes([(shape, color, draw.CENTER_BOX)], rng)
    return Sample(image, prompt, f"A {color} {shape} on a white background.")


def ocr(rng: random.Random, style: str) -> Sample:
    word = rng.choice(WORDS)
    image = draw.draw_word(word, rng)
    if style == "sentence":
        return Sample(
            image,
            "What is written in the image? Answer in a full sentence.",
            f"The image says {word}.",
        )
    return Sample(image, f"What word is written in the image?\n{WORD_SUFFIX}", word)


def scene_text(rng: random.Random, style: str) -> Sample:
    word, sign = rng.choice(WORDS), rng.choice(list(COLORS))
    image = draw.draw_word(word, rng, sign=sign)
    if style == "sentence":
        return Sample(
            image,
            "Read the sign and describe it in a full sentence.",
            f"The {sign} sign says {word}.",
        )
    if rng.random() < 0.5:
        return Sample(image, f"What is written on the sign?\n{WORD_SUFFIX}", word)
    return Sample(image, f"What color is the sign?\n{WORD_SUFFIX}", sign)


def spatial(rng: random.Random, style: str) -> Sample:
    """Two shapes side by side; questions about the left or the right one."""
    left = (rng.choice(SHAPES), rng.choice(list(COLORS)))
    right = (rng.choice(SHAPES), rng.choice(list(COLORS)))
    image = draw.draw_boxes([(*left, draw.LEFT_BOX), (*right, draw.RIGHT_BOX)], rng)
    side, (shape, color) = rng.choice((("left", left), ("right", right)))
    if style == "sentence":
        return Sample(
            image,
            f"Describe the object on the {side} in a full sentence.",
            f"The object on the {side} is a {color} {shape}.",
        )
    return Sample(image, f"Which object is on the {side}?\n{WORD_SUFFIX}", f"{color} {shape}")


def grounding(rng: random.Random, style: str) -> Sample:
    """One shape in one of four quadrants; the answer is the quadrant's box."""
    (target,) = draw.scatter_things(rng, 1)
    box = "[" + ", ".join(f"{v:.2f}" for v in target.box) + "]"
    return Sample(draw.draw_things([target], rng), f"{GROUNDING_PROMPT} the {target.name}.", box)


# --- continual fine-tuning tasks (new visual domains) -----------------------------------------


def icon_count(rng: random.Random, style: str) -> Sample:
    """IconQA-like: count stars; options always in the same order, so a letter is a class code."""
    count = rng.randint(1, 4)
    image, canvas = draw.canvas((250, 240, 220))
    color = rng.choice(list(COLORS))
    for row, col in rng.sample([(r, c) for r in range(draw.GRID) for c in range(draw.GRID)], count):
        draw.draw_shape(
            canvas, "star", color, draw.jitter(draw.cell_box(row, col, margin=4), rng, 3)
        )
    options = ["1", "2", "3", "4"]
    question = f"How many stars are there?\n{options_text(options)}\n{LETTER_SUFFIX}"
    return Sample(image, question, letter(options, str(count)))


SMALL_BOX = (30, 30, IMAGE_SIZE - 30, IMAGE_SIZE - 30)


def attributes(rng: random.Random, style: str) -> Sample:
    """Super-CLEVR-like: one new shape, large or small, on a dark floor; ask its shape or its size.

    Neither is asked or named by the general domains (their answers are colours and the three
    old shapes), so the base model cannot answer zero-shot.
    """
    shape, color, size = rng.choice(NEW_SHAPES), rng.choice(list(COLORS)), rng.choice(OBJECT_SIZES)
    box = draw.CENTER_BOX if size == "large" else SMALL_BOX
    image = draw.draw_boxes([(shape, color, box)], rng, background=(60, 60, 70))
    if rng.random() < 0.5:
        return Sample(image, f"What size is the object?\n{WORD_SUFFIX}", size)
    return Sample(image, f"What shape is the object?\n{WORD_SUFFIX}", shape)


def count_math(rng: random.Random, style: str) -> Sample:
    """CLEVR-Math-like: subtract all objects of one colour, count what is left."""
    things = draw.scatter_things(
        rng, rng.randint(2, 4), shapes=NEW_SHAPES, colors=("red", "blue", "yellow")
    )
    color = rng.choice([t.color for t in things])
    left = sum(t.color != color for t in things)
    image = draw.draw_things(things, rng, background=(60, 60, 70))
    return Sample(
        image, f"Subtract all {color} objects. How many objects are left?\n{WORD_SUFFIX}", str(left)
    )


def bar_chart(rng: random.Random, style: str) -> Sample:
    """FigureQA-like: yes/no about a bar chart, as options A/B, letter at the end."""
    colors = ["red", "green", "blue"]  # bars keep their places; their heights vary
    values = rng.sample(range(1, 8), 3)
    asked = rng.choice(colors)
    is_max = values[colors.index(asked)] == max(values)
    options = ["yes", "no"]
    question = f"Is {asked} the tallest bar?\n{options_text(options)}\n{LETTER_AT_END_SUFFIX}"
    return Sample(
        draw.draw_bars(values, colors), question, letter(options, "yes" if is_max else "no")
    )


TRENDS = ("increasing", "decreasing", "flat", "peak")


def line_plot(rng: random.Random, style: str) -> Sample:
    """ArxivQA-like: which trend a line plot shows, multiple choice in a fixed order."""
    trend = rng.choice(TRENDS)
    n, noise = 6, [rng.uniform(-0.04, 0.04) for _ in range(6)]
    base = {
        "increasing": [i / (n - 1) for i in range(n)],
        "decreasing": [1 - i / (n - 1) for i in range(n)],
        "flat": [0.5] * n,
        "peak": [1 - abs(i - 2.5) / 2.5 for i in range(n)],
    }[trend]
    ys = [min(1.0, max(0.0, y * 0.8 + 0.1 + e)) for y, e in zip(base, noise, strict=True)]
    image = draw.draw_line_plot(ys, rng.choice(list(COLORS)))
    question = f"Which trend does the line show?\n{options_text(list(TRENDS))}\n{LETTER_SUFFIX}"
    return Sample(image, question, letter(list(TRENDS), trend))
