"""Validation of LLaVA records: every problem found, each with file, record index, id and class."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from llava_c_ray.data.records import IMAGE_TOKEN, Record
from llava_c_ray.errors import LlavaCError

ROLES = ("human", "gpt")

# Largest image (width × height) a record may carry, read from the file header before decoding.
# LLaVA-style sets top out near 12 MP for photos and ~30 MP for tall infographics, and the model
# sees 336² anyway; 50 MP (150 MB as RGB) leaves room for those and stays under PIL's own
# decompression-bomb threshold (~89 MP), so workers never meet PIL's check on a validated image.
MAX_IMAGE_PIXELS = 50_000_000


@dataclass(frozen=True)
class Problem:
    file: Path
    index: int
    id: str | None
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.file} record {self.index} (id {self.id!r}): [{self.kind}] {self.message}"


@dataclass
class ValidationReport:
    file: Path
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def summary(self, limit: int = 50) -> str:
        lines = [f"{len(self.problems)} invalid record(s), {len(self.records)} valid:"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)

    def fix(self, skip_hint: str | None = None) -> str:
        """What to do about the problems; `skip_hint` names the caller's way to drop bad records
        (e.g. "pass --mode skip"), when it has one."""
        fix = "correct these records"
        if any(p.kind == "oversized_image" for p in self.problems):
            fix += " (downscale oversized images, or raise the pixel limit)"
        if skip_hint:
            fix += f", or {skip_hint} to drop them (their ids are written out)"
        return fix

    def write_skipped(self, path: Path) -> None:
        skipped = [
            {"index": p.index, "id": p.id, "kind": p.kind, "reason": p.message}
            for p in self.problems
        ]
        if path.is_dir():
            raise LlavaCError(
                "the skipped-records file is a directory", path=path, fix="name a .json file"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(skipped, indent=2))


def validate_records(
    raw: list[Any],
    path: Path,
    image_folder: Path | None,
    *,
    require_answers: bool = True,
    check_images: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> ValidationReport:
    """Check shape, ids, turn order, empty turns, `<image>` placement and image files."""
    report = ValidationReport(path)
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        record_id = str(entry.get("id")) if isinstance(entry, dict) and "id" in entry else None
        found = record_problems(entry, image_folder, require_answers, check_images, max_pixels)
        if record_id is not None and record_id in seen:
            found.append(("duplicate_id", "this id was used by an earlier record"))
        if found:
            report.problems += [Problem(path, index, record_id, k, m) for k, m in found]
        else:
            seen.add(record_id)
            report.records.append(Record.from_raw(entry))
    return report


def record_problems(
    entry: Any,
    image_folder: Path | None,
    require_answers: bool,
    check_images: bool,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list[tuple[str, str]]:
    """The (kind, message) problems of one raw record; empty when it is valid."""
    shape = shape_problem(entry)
    if shape:
        return [("shape", shape)]
    turns = entry["conversations"]
    problems = turn_problems(turns, require_answers)
    image = entry.get("image")
    count = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    first_count = turns[0]["value"].count(IMAGE_TOKEN)
    if image is not None and (count != 1 or first_count != 1):
        problems.append(
            (
                "image_token",
                f"has an image but {count} `<image>` token(s); needs exactly one, in the first human turn",
            )
        )
    if image is None and count:
        problems.append(("image_token", f"has {count} `<image>` token(s) but no image"))
    if image is not None and check_images:
        problems += image_problems(image, image_folder, max_pixels)
    return problems


def shape_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"a record must be an object, got {type(entry).__name__}"
    if not isinstance(entry.get("id"), str | int) or isinstance(entry.get("id"), bool):
        return "missing or non-string `id`"
    if "image" in entry and not isinstance(entry["image"], str | None):
        return "`image` must be a relative path string"
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "`conversations` must be a non-empty list"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return f"turn {i} must be an object with a string `value`"
        if turn.get("from") not in ROLES:
            return f"turn {i} has `from` {turn.get('from')!r}; expected 'human' or 'gpt'"
    return None


def turn_problems(turns: list[dict], require_answers: bool) -> list[tuple[str, str]]:
    problems = []
    order = [t["from"] for t in turns]
    wrong = next((i for i, role in enumerate(order) if role != ROLES[i % 2]), None)
    if wrong is not None:
        problems.append(
            (
                "turn_order",
                f"turn {wrong} is from {order[wrong]!r}; turns must alternate human, gpt, ...",
            )
        )
    elif require_answers and order[-1] != "gpt":
        problems.append(("turn_order", "the conversation must end with a gpt answer"))
    empty = [i for i, t in enumerate(turns) if not t["value"].replace(IMAGE_TOKEN, "").strip()]
    if empty:
        problems.append(("empty_turn", f"turn(s) {empty} are empty"))
    return problems


def image_problems(
    image: str, image_folder: Path | None, max_pixels: int = MAX_IMAGE_PIXELS
) -> list[tuple[str, str]]:
    if image_folder is None:
        return [("missing_image", f"image {image!r} given but no image folder")]
    path = image_path(image, image_folder)
    if path is None:
        return [
            (
                "outside_image_folder",
                f"image {image!r} leaves the image folder {image_folder}; "
                "give a path relative to it that stays inside",
            )
        ]
    if not path.is_file():
        return [("missing_image", f"image file not found: {path}")]
    try:
        with warnings.catch_warnings():
            # The pixel limit below replaces PIL's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    return [("oversized_image", oversized(path, width, height, max_pixels))]
                img.verify()
    except Image.DecompressionBombError as exc:
        return [("oversized_image", f"image {path} exceeds PIL's pixel limit: {exc}")]
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return [("unreadable_image", f"cannot read image {path}: {exc}")]
    return []


def image_path(image: str, image_folder: Path) -> Path | None:
    """The resolved file of `image` (symlinks followed), or None when it lies outside the folder."""
    folder = Path(image_folder).resolve()
    path = (folder / image).resolve()
    if Path(image).is_absolute() or not path.is_relative_to(folder):
        return None
    return path


def oversized(path: Path, width: int, height: int, max_pixels: int) -> str:
    return (
        f"image {path} is {width}×{height} = {width * height:,} pixels, over the limit of "
        f"{max_pixels:,}; downscale it, or raise the pixel limit (`data.max_image_pixels` in a "
        "job, --max-image-pixels on the command line)"
    )
