"""Drawing primitives of the built-in world: shapes, words, icons, bar charts and line plots (PIL)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 96
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
GRID = 2  # objects sit on a 2×2 grid of cells: each covers 4 of the 16 image tokens
CELL = IMAGE_SIZE // GRID


@dataclass(frozen=True)
class Thing:
    """One drawn object: shape, colour and the grid cell it occupies."""

    shape: str
    color: str
    row: int
    col: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Normalised [x1, y1, x2, y2] of the object's cell."""
        return (
            self.col / GRID,
            self.row / GRID,
            (self.col + 1) / GRID,
            (self.row + 1) / GRID,
        )

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def canvas(
    background: tuple[int, int, int] = (255, 255, 255),
) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    return image, ImageDraw.Draw(image)


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, color: str, box: tuple[int, int, int, int]
) -> None:
    x1, y1, x2, y2 = box
    fill = COLORS[color]
    if shape in ("circle", "ring"):
        draw.ellipse(box, fill=None if shape == "ring" else fill, outline=fill, width=4)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=fill)
    elif shape == "diamond":
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    elif shape == "cross":
        w = max(2, (x2 - x1) // 4)
        cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
        draw.rectangle((cx - w, y1, cx + w, y2), fill=fill)
        draw.rectangle((x1, cy - w, x2, cy + w), fill=fill)
    elif shape == "star":
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = 3.14159 * (i / 5 - 0.5)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def cell_box(row: int, col: int, margin: int = 6) -> tuple[int, int, int, int]:
    return (
        col * CELL + margin,
        row * CELL + margin,
        (col + 1) * CELL - margin,
        (row + 1) * CELL - margin,
    )


def scatter_things(
    rng: random.Random, count: int, shapes=SHAPES, colors=tuple(COLORS)
) -> list[Thing]:
    """`count` objects in distinct grid cells with random shapes and colours."""
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], count)
    return [Thing(rng.choice(shapes), rng.choice(colors), r, c) for r, c in cells]


def jitter(
    box: tuple[int, int, int, int], rng: random.Random, amount: int = 4
) -> tuple[int, int, int, int]:
    """Shift and resize a box by a few pixels, so no two drawings of the same content are identical."""
    dx, dy, grow = (rng.randint(-amount, amount) for _ in range(3))
    x1, y1, x2, y2 = box
    return (x1 + dx - grow // 2, y1 + dy - grow // 2, x2 + dx + grow // 2, y2 + dy + grow // 2)


def draw_things(things: list[Thing], rng: random.Random, background=(255, 255, 255)) -> Image.Image:
    image, draw = canvas(background)
    for thing in things:
        draw_shape(draw, thing.shape, thing.color, jitter(cell_box(thing.row, thing.col), rng))
    return image


CENTER_BOX = (14, 14, IMAGE_SIZE - 14, IMAGE_SIZE - 14)
LEFT_BOX = (4, 26, 44, 66)
RIGHT_BOX = (52, 26, 92, 66)


def draw_boxes(
    items: list[tuple[str, str, tuple[int, int, int, int]]],
    rng: random.Random,
    background=(255, 255, 255),
) -> Image.Image:
    """Shapes at (jittered) fixed boxes: (shape, colour, box) each."""
    image, draw = canvas(background)
    for shape, color, box in items:
        draw_shape(draw, shape, color, jitter(box, rng))
    return image


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def draw_word(word: str, rng: random.Random, *, sign: str | None = None) -> Image.Image:
    """A word in a dark ink on a light paper; when `sign` is a colour, the word is white on a
    sign of that colour with small shapes below it.

    Words vary in size and colours but sit at a fixed place: a tiny vision tower trained from
    scratch in minutes learns to read words of any size there, not words that slide across its
    24-px patches (in a single-domain trial of 300 steps, OCR of words shifted by ±2 px reached
    about 50%, by ±8 px chance, against 100% unshifted).
    """
    center = IMAGE_SIZE // 2
    if sign is None:
        image, draw = canvas(rng.choice(PAPERS))
        ink, size = rng.choice(INKS), rng.randint(22, 30)
        draw.text((center, center), word, fill=ink, font=font(size), anchor="mm")
        return image
    image, draw = canvas()
    draw.rectangle((6, 28, IMAGE_SIZE - 6, 68), fill=COLORS[sign])
    draw.text((center, 48), word, fill=(255, 255, 255), font=font(rng.randint(20, 24)), anchor="mm")
    for x in (4, CELL + 4):
        draw_shape(draw, rng.choice(SHAPES), rng.choice(list(COLORS)), (x, 74, x + 16, 90))
    return image


INKS = ((0, 0, 0), (20, 30, 90), (20, 70, 30), (90, 40, 10))
PAPERS = ((255, 255, 255), (250, 245, 225), (230, 240, 250), (238, 238, 238))


def draw_bars(values: list[int], colors: list[str]) -> Image.Image:
    """A bar chart: one bar per colour, heights from `values` (1..8)."""
    image, draw = canvas()
    width = (IMAGE_SIZE - 12) // len(values)
    for i, (value, color) in enumerate(zip(values, colors, strict=True)):
        x1 = 6 + i * width
        draw.rectangle(
            (x1 + 2, IMAGE_SIZE - 6 - value * 10, x1 + width - 2, IMAGE_SIZE - 6),
            fill=COLORS[color],
        )
    draw.line((4, IMAGE_SIZE - 5, IMAGE_SIZE - 4, IMAGE_SIZE - 5), fill=(0, 0, 0), width=1)
    return image


def draw_line_plot(ys: list[float], color: str) -> Image.Image:
    """A line plot of `ys` (values in 0..1) with axes, on a light grey background."""
    image, draw = canvas((235, 235, 235))
    draw.line((8, 8, 8, IMAGE_SIZE - 8), fill=(0, 0, 0), width=1)
    draw.line((8, IMAGE_SIZE - 8, IMAGE_SIZE - 8, IMAGE_SIZE - 8), fill=(0, 0, 0), width=1)
    step = (IMAGE_SIZE - 20) / (len(ys) - 1)
    points = [(12 + i * step, IMAGE_SIZE - 12 - y * (IMAGE_SIZE - 24)) for i, y in enumerate(ys)]
    draw.line(points, fill=COLORS[color], width=3)
    return image
