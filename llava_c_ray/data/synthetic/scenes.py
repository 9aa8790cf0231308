"""Captioned scenes of the built-in world, for the tiny vision tower's contrastive pre-training.

A real LLaVA's CLIP has seen charts, counts, shapes and text long before any continual task. These
scenes give the tiny tower the same kind of breadth: objects of every shape (the continual tasks'
new shapes and stars included) in counts of one to four, two sizes, every colour and background;
bar charts of two to four bars; line plots of five trends; written words and signs. Each caption
describes what is drawn in plain sentences. No caption asks a question, carries a task's suffix or
names an option letter, and the scenes are drawn from their own seed, not from any split.

Scenes come in *groups* that share their style (shapes, colours, background, ink) and differ in one
property: how many objects, which bar is tallest, the trend, the word. A batch of
whole groups holds hard negatives (as in NegCLIP, Yuksekgonul et al., 2023), so telling the
captions apart needs the property itself; with independent scenes, colours alone separate most
captions and a tiny tower learns little of counts or heights.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from llava_c_ray.data.synthetic import draw
from llava_c_ray.data.synthetic.draw import COLORS, GRID, SHAPES

GROUP = 4
"""Scenes per group (one style, one varied property)."""
ALL_SHAPES = (*SHAPES, "diamond", "cross", "ring", "star")
COLOR_NAMES = tuple(COLORS)
BACKGROUNDS = {
    "white": (255, 255, 255),
    "dark": (60, 60, 70),
    "beige": (250, 240, 220),
    "grey": (235, 235, 235),
}
COUNT_WORDS = ("no", "one", "two", "three", "four")
HEIGHT_WORDS = ("", "tiny", "short", "short", "medium", "medium", "tall", "tall")
SMALL_MARGIN, LARGE_MARGIN = 14, 4  # pixels between an object and its grid cell's edge
TRENDS = {
    "goes up": lambda x: x,
    "goes down": lambda x: 1 - x,
    "stays level": lambda x: 0.5,
    "rises then falls": lambda x: 1 - abs(2 * x - 1),
    "falls then rises": lambda x: abs(2 * x - 1),
}
WORD_POOL = (
    "cat", "dog", "sun", "map", "box", "cup", "key", "pen", "hat", "bus", "egg", "fox",
    "red", "one", "top", "art", "sky", "owl",
)  # fmt: skip


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    caption: str


def plural(word: str, count: int) -> str:
    if count == 1:
        return word
    return word + ("es" if word.endswith(("s", "x")) else "s")


def objects_group(rng: random.Random) -> list[Scene]:
    """One to four objects in cells of the 2×2 grid; the group's scenes differ in how many.
    Half the groups are icon sets (one shape in one colour), half mixed objects."""
    style = rng.random()
    icons = rng.random() < 0.5
    return [objects(random.Random(style), count, icons) for count in range(1, GRID * GRID + 1)]


def objects(rng: random.Random, count: int, icons: bool) -> Scene:
    """The first `count` objects of the scene `rng` draws (a larger count adds objects)."""
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], GRID * GRID)[:count]
    shape, color = rng.choice(ALL_SHAPES), rng.choice(COLOR_NAMES)
    background = rng.choice(list(BACKGROUNDS))
    image, canvas = draw.canvas(BACKGROUNDS[background])
    drawn = []
    for row, col in cells:
        thing = (shape, color) if icons else (rng.choice(ALL_SHAPES), rng.choice(COLOR_NAMES))
        size = rng.choice(("small", "large"))
        box = draw.cell_box(row, col, margin=SMALL_MARGIN if size == "small" else LARGE_MARGIN)
        draw.draw_shape(canvas, thing[0], thing[1], draw.jitter(box, rng, 3))
        drawn.append((*thing, size))
    if count == 1:
        shape, color, size = drawn[0]
        return Scene(image, f"A {size} {color} {shape} on {background}.")
    groups = Counter((color, shape) for shape, color, _ in drawn)
    parts = ", ".join(
        f"{COUNT_WORDS[n]} {color} {plural(shape, n)}" for (color, shape), n in groups.items()
    )
    return Scene(image, f"{COUNT_WORDS[count].capitalize()} objects on {background}: {parts}.")


def bars_group(rng: random.Random) -> list[Scene]:
    """Bar charts of two to four bars with one set of colours; the heights differ per scene."""
    n = rng.randint(2, 4)
    colors = rng.sample(COLOR_NAMES, n)
    return [bars(colors, rng.sample(range(1, 8), n)) for _ in range(GROUP)]


def bars(colors: list[str], values: list[int]) -> Scene:
    described = ", ".join(f"{HEIGHT_WORDS[v]} {c}" for c, v in zip(colors, values, strict=True))
    tallest = colors[values.index(max(values))]
    shortest = colors[values.index(min(values))]
    return Scene(
        draw.draw_bars(values, colors),
        f"Bars: {described}. Tallest {tallest}, shortest {shortest}.",
    )


def lines_group(rng: random.Random) -> list[Scene]:
    """Line plots in one colour; the trend differs per scene."""
    color = rng.choice(COLOR_NAMES)
    return [lines(rng, color, trend) for trend in rng.sample(list(TRENDS), GROUP)]


def lines(rng: random.Random, color: str, trend: str) -> Scene:
    curve = TRENDS[trend]
    ys = [min(1.0, max(0.0, 0.1 + 0.8 * curve(i / 5) + rng.uniform(-0.04, 0.04))) for i in range(6)]
    return Scene(draw.draw_line_plot(ys, color), f"A {color} line that {trend}.")


def words_group(rng: random.Random) -> list[Scene]:
    """One ink and size (or one sign colour); the word differs per scene."""
    style, sign = rng.random(), rng.choice([None, *COLOR_NAMES])
    return [words(random.Random(style), word, sign) for word in rng.sample(WORD_POOL, GROUP)]


def words(rng: random.Random, word: str, sign: str | None) -> Scene:
    if sign is None:
        return Scene(draw.draw_word(word, rng), f"The word {word} on paper.")
    return Scene(draw.draw_word(word, rng, sign=sign), f"A {sign} sign saying {word}.")


KINDS = (objects_group, objects_group, bars_group, lines_group, words_group)
"""Objects twice: counts, sizes and shapes vary most."""


def draw_scenes(groups: int, seed: int) -> list[Scene]:
    """`groups` × GROUP captioned scenes from their own seed, group by group (scenes
    GROUP·i … GROUP·i + GROUP − 1 form group i). Same seed → the same scenes."""
    rng = random.Random(f"scenes-{seed}")
    return [scene for _ in range(groups) for scene in rng.choice(KINDS)(rng)]
